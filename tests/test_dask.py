"""Journal records travel between Dask worker processes (cloudio.dask.install)."""

from __future__ import annotations

import pytest

distributed = pytest.importorskip("distributed")


def _workers(client) -> list[str]:
    """The addresses of the cluster's two workers, once both are registered, asked of the scheduler
    itself (``scheduler_info()["workers"]`` once came back empty in a loaded full run)."""
    client.wait_for_workers(2, timeout=60)
    return sorted(client.nthreads())


def _ls(prefix: str) -> list[str]:
    """A raw gcsfs listing through the worker's long-lived (cached) instance."""
    from cloudio._gcs.client import gcs_filesystem

    return sorted(p.rsplit("/", 1)[-1] for p in gcs_filesystem().ls(prefix))


def _write(url: str, data: bytes) -> str:
    import cloudio

    cloudio.filesystem(url).pipe(url, data)
    return url


def _pid() -> int:
    import os

    return os.getpid()


def test_a_write_on_one_worker_is_seen_by_a_dependent_task_on_another(proc_client, gcs_bucket):
    client = proc_client
    w1, w2 = _workers(client)
    pid1 = client.submit(_pid, workers=[w1], pure=False).result()
    assert pid1 != client.submit(_pid, workers=[w2], pure=False).result()
    prefix = f"{gcs_bucket}/d"
    _write(f"{prefix}/a.bin", b"a")

    # w1 lists d/ and caches the listing
    assert client.submit(_ls, prefix, workers=[w1], allow_other_workers=False, pure=False).result() == ["a.bin"]
    # w2 writes a new object; w1 lists again in a task that depends on the write
    wrote = client.submit(_write, f"{prefix}/b.bin", b"b", workers=[w2], allow_other_workers=False, pure=False)
    after = client.submit(lambda _, p: _ls(p), wrote, prefix, workers=[w1], allow_other_workers=False, pure=False)
    assert after.result() == ["a.bin", "b.bin"]


def test_a_write_in_the_client_reaches_the_workers(proc_client, gcs_bucket):
    client = proc_client
    w1 = _workers(client)[0]
    prefix = f"{gcs_bucket}/e"
    _write(f"{prefix}/a.bin", b"a")
    assert client.submit(_ls, prefix, workers=[w1], pure=False).result() == ["a.bin"]
    _write(f"{prefix}/c.bin", b"c")
    assert client.submit(_ls, prefix, workers=[w1], pure=False).result() == ["a.bin", "c.bin"]


def test_a_write_on_a_worker_reaches_the_client(proc_client, gcs_bucket):
    client = proc_client
    w1 = _workers(client)[0]
    prefix = f"{gcs_bucket}/f"
    _write(f"{prefix}/a.bin", b"a")
    assert _ls(prefix) == ["a.bin"]
    client.submit(_write, f"{prefix}/z.bin", b"z", workers=[w1], pure=False).result()
    assert _ls(prefix) == ["a.bin", "z.bin"]


@pytest.mark.characterization
def test_without_install_a_worker_keeps_its_stale_listing(gcs_emulator, gcs_bucket):
    """The 'before': journals are per process, so without the relay a worker never hears."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            prefix = f"{gcs_bucket}/g"
            _write(f"{prefix}/a.bin", b"a")
            assert client.submit(_ls, prefix, pure=False).result() == ["a.bin"]
            _write(f"{prefix}/b.bin", b"b")  # journaled in this process only
            assert client.submit(_ls, prefix, pure=False).result() == ["a.bin"]


def _origin() -> tuple[int, str]:
    import os

    from cloudio import _journal

    return os.getpid(), _journal.ORIGIN


def test_forked_workers_hear_the_clients_writes(gcs_emulator, gcs_bucket):
    """Workers forked from the client's process (``multiprocessing-method: fork``) get a copy of its
    journal module: each must still name its own changes apart, or every change relayed to it looks like
    its own echo and is dropped."""
    import dask
    from distributed import Client, LocalCluster

    import cloudio.dask

    with dask.config.set({"distributed.worker.multiprocessing-method": "fork"}):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            with Client(cluster) as client:
                w1, w2 = _workers(client)
                cloudio.dask.install(client)
                prefix = f"{gcs_bucket}/forked"
                _write(f"{prefix}/a.bin", b"a")
                assert client.submit(_ls, prefix, workers=[w1], pure=False).result() == ["a.bin"]
                assert client.submit(_ls, prefix, workers=[w2], pure=False).result() == ["a.bin"]
                _write(f"{prefix}/b.bin", b"b")  # in the client
                wrote = client.submit(_write, f"{prefix}/c.bin", b"c", workers=[w2], pure=False)
                after = client.submit(lambda _, p: _ls(p), wrote, prefix, workers=[w1], pure=False)
                pid, origin = client.submit(_origin, workers=[w1], pure=False).result()
                assert after.result() == ["a.bin", "b.bin", "c.bin"], f"worker {pid} names its changes {origin!r}"


def test_closing_a_client_undoes_its_install(gcs_emulator):
    """A closed client is let go: cloudio's journal listener does not keep it (and its cluster's
    connections) alive for the life of the process."""
    import gc
    import weakref

    from distributed import Client, LocalCluster

    import cloudio.dask

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        client = Client(cluster)
        cloudio.dask.install(client)
        client.close()
        ref = weakref.ref(client)
        del client
    gc.collect()
    assert ref() is None, "a closed Client is still kept alive by cloudio.dask (its journal listener)"


def test_a_client_connects_while_changes_are_relayed(gcs_emulator):
    """A change relayed while another client connects must not share the first batch the scheduler sends that
    client: distributed's Client asserts that batch holds its "stream-start" alone. Seen in CI as an
    AssertionError from the client a Dask-backed ``to_zarr`` opens on a worker (``get_client``) while that
    worker's own writes were being relayed. Here a scheduler plugin relays a change just as a client
    registers, before the scheduler's batched stream to it has sent anything."""
    import asyncio

    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin

    import cloudio.dask
    from cloudio._journal import Change

    change = cloudio.dask._encode(Change(seq=0, url="gs://cloudio-relay-race/x", kind="invalidate"))

    class RelayAsAClientConnects(SchedulerPlugin):
        name = "relay-as-a-client-connects"

        def add_client(self, scheduler, client):  # runs before the scheduler starts the client's stream
            relay = scheduler.stream_handlers["cloudio-journal"]
            asyncio.get_running_loop().call_soon(relay, [change])

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster) as first:
            cloudio.dask.install(first)
            first.register_plugin(RelayAsAClientConnects())
            with Client(cluster, set_as_default=False) as second:
                assert second.status == "running"
                assert second.submit(sum, [1, 2], pure=False).result() == 3


def test_an_installed_client_reconnects_while_changes_are_relayed_and_still_hears(gcs_emulator):
    """An installed client whose connection drops registers again under its own id; a change relayed just then
    must neither share its first batch (the client would fail its "stream-start" check and stay "connecting"
    for good) nor be lost: it arrives once the client's stream is running."""
    import asyncio
    import time

    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin

    import cloudio.dask
    from cloudio._journal import Change

    url = "gs://cloudio-relay-race/reconnect"
    change = cloudio.dask._encode(Change(seq=0, url=url, kind="invalidate", origin="another-process"))

    class RelayAsAClientConnects(SchedulerPlugin):
        name = "relay-as-a-client-connects"

        def add_client(self, scheduler, client):
            relay = scheduler.stream_handlers["cloudio-journal"]
            asyncio.get_running_loop().call_soon(relay, [change])

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            cloudio.dask.install(client)
            heard: list[str] = []  # what reached this client's own stream (the worker, in this process, hears too)
            replay = client._stream_handlers["cloudio-journal"]

            def hear(changes, **kw):
                heard.extend(c["url"] for c in changes)
                return replay(changes=changes, **kw)

            client._stream_handlers["cloudio-journal"] = hear
            client.register_plugin(RelayAsAClientConnects())
            comm = client.scheduler_comm.comm

            async def drop() -> None:
                await comm.close()

            client.sync(drop)
            deadline = time.monotonic() + 20
            while not (client.status == "running" and client.scheduler_comm.comm is not comm and heard):
                assert time.monotonic() < deadline, f"client {client.status}, heard {heard}"
                time.sleep(0.05)
            assert client.submit(sum, [1, 2], pure=False).result(timeout=30) == 3
            assert heard == [url]


def test_install_on_an_asynchronous_client_is_refused_with_the_next_step(gcs_emulator):
    """install registers plugins before it returns; an asynchronous client's calls would only make coroutines
    nobody awaits, and nothing would be installed."""
    import asyncio

    from distributed import Client, LocalCluster

    import cloudio
    import cloudio.dask

    async def main() -> None:
        async with LocalCluster(n_workers=0, processes=False, asynchronous=True, dashboard_address=":0") as cluster:
            async with Client(cluster, asynchronous=True) as client:
                with pytest.raises(cloudio.ConfigurationError, match="asynchronous.*synchronous Client"):
                    cloudio.dask.install(client)
                assert not await client.run_on_scheduler(lambda dask_scheduler: "cloudio-journal" in
                                                         dask_scheduler.plugins)

    asyncio.run(main())


def test_a_change_relayed_while_a_client_goes_away_still_reaches_the_others(gcs_emulator):
    """The scheduler keeps a client's stream listed for a moment after that client's connection closed (it
    awaits the stream's close). A change relayed then met the closed stream: distributed's ``send`` raised
    CommClosedError out of the relay, so the clients after it never heard the change, and a worker whose
    message it was would have had its stream ended (the scheduler drops that worker). Here a scheduler plugin
    relays a change just as an installed client's connection is found closed."""
    import asyncio
    import time

    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin

    import cloudio.dask
    from cloudio._journal import Change

    url = "gs://cloudio-relay-race/closing"
    change = cloudio.dask._encode(Change(seq=0, url=url, kind="invalidate", origin="another-process"))

    class RelayAsAClientGoes(SchedulerPlugin):
        name = "relay-as-a-client-goes"

        def __init__(self) -> None:
            self.errors: list[str] = []

        def remove_client(self, scheduler, client):  # its stream still listed, its comm closed
            def relay() -> None:
                try:
                    scheduler.stream_handlers["cloudio-journal"]([change])
                except Exception as e:
                    self.errors.append(repr(e))

            asyncio.get_running_loop().call_soon(relay)

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster) as going, Client(cluster, set_as_default=False) as staying:
            cloudio.dask.install(going)
            cloudio.dask.install(staying)
            heard: list[str] = []
            replay = staying._stream_handlers["cloudio-journal"]

            def hear(changes, **kw):
                heard.extend(c["url"] for c in changes)
                return replay(changes=changes, **kw)

            staying._stream_handlers["cloudio-journal"] = hear
            plugin = RelayAsAClientGoes()
            staying.register_plugin(plugin)
            comm = going.scheduler_comm.comm

            async def drop() -> None:
                await comm.close()

            going.sync(drop)
            deadline = time.monotonic() + 20
            while not heard and time.monotonic() < deadline:
                time.sleep(0.05)
            errors = staying.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins[plugin.name].errors)
            assert errors == [] and heard == [url]
            assert staying.submit(sum, [1, 2], pure=False).result(timeout=30) == 3
