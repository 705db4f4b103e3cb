"""Journal records travel between the processes of a Dask cluster.

``cloudio.dask.install(client)`` wires three parts together:

* the client forwards every change it records to the scheduler over its own
  batched stream, *before* the graph it submits next (one FIFO stream);
* a worker forwards every change a task records to the scheduler over the
  worker's batched stream, before that task's "task-finished" message;
* the scheduler relays each change at once to every other worker and to every
  other client installed on, again before anything it sends later (a
  dependent task's "compute-task").

Only clients installed on hear (``install`` tells the scheduler, by a
request of its own), and never in the scheduler's first batch to them:
distributed's client requires that batch to hold its "stream-start" alone.
A change for a client still connecting (the client ``get_client`` opens
inside a task that writes, as a Dask-backed ``to_zarr`` on a worker does,
or an installed client reconnecting under its id) waits, in order, until
that batch has gone.

So a task that runs after another task wrote (a dependency, or anything the
client submits after seeing the result) always has the change in its
process's journal first, and its caches are invalidated before it reads.
Each receiver replays changes into its own journal without echoing them back.

A worker that joins later (scaled up, restarted) starts with empty caches,
but a store's consolidated metadata is on the server: what made it stale
(an ``invalidate``, a metadata write or delete) must reach the new worker
too. The scheduler keeps those changes (:data:`_KEPT_MAX`, older ones
folded into an invalidation of their bucket) and a worker replays them
before it runs its first task.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from cloudio._journal import Change, journal
from cloudio.errors import ConfigurationError

if TYPE_CHECKING:
    from distributed import Client, Scheduler, Worker
    from distributed.batched import BatchedSend

__all__ = ["install"]

log = logging.getLogger(__name__)
_OP = "cloudio-journal"
_LISTEN_OP = "cloudio_journal_listen"
_PLUGIN = "cloudio-journal"
_KEPT_OP = "cloudio_journal_kept"
#: changes the scheduler keeps for workers that join later; past that, folded into one invalidation per bucket
_KEPT_MAX = 4096
#: installed clients the scheduler remembers while they are away (to reconnect); past that, the connected ones
_LISTENING_MAX = 10_000
#: seconds between looks at a connecting client's stream, for the changes waiting for its first batch to go
_WAIT = 0.005


def _encode(change: Change) -> dict[str, Any]:
    return asdict(change)


def _replay(changes: list[dict[str, Any]]) -> None:
    journal().replay(Change(**c) for c in changes)


try:
    from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin
except ImportError:  # pragma: no cover - optional dependency
    SchedulerPlugin = WorkerPlugin = object  # type: ignore[assignment,misc]


class _RelayPlugin(SchedulerPlugin):  # type: ignore[misc,valid-type]
    """Scheduler side: relay each change to every worker and listening client but its sender."""

    name = _PLUGIN
    idempotent = True

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.kept: list[dict[str, Any]] = []  # what a worker joining later replays (_ForwardPlugin.setup)
        self.listening: set[str] = set()  # the clients installed on, by id (one reconnects under its id)
        self.waiting: dict[str, list[dict[str, Any]]] = {}  # for clients whose stream's first batch is yet to go
        scheduler.stream_handlers[_OP] = self._relay
        scheduler.handlers[_LISTEN_OP] = self._listen
        scheduler.handlers[_KEPT_OP] = lambda **_: list(self.kept)

    def _listen(self, client: str, **_: Any) -> None:
        self.listening.add(client)
        if len(self.listening) > _LISTENING_MAX:
            self.listening &= set(self.scheduler.client_comms)

    def _relay(self, changes: list[dict[str, Any]], worker: str | None = None, client: str | None = None) -> None:
        self._keep(changes)
        msg = {"op": _OP, "changes": changes}
        for address, stream in list(self.scheduler.stream_comms.items()):
            if address != worker:
                _send(stream, dict(msg))
        for client_id, stream in list(self.scheduler.client_comms.items()):
            if client_id in self.listening and client_id != client:
                self._to_client(client_id, stream, dict(msg))

    def _to_client(self, client_id: str, stream: BatchedSend, msg: dict[str, Any]) -> None:
        """Send ``msg`` to a client, after what waits for it, once its stream's first batch has gone."""
        waiting = self.waiting.get(client_id)
        if waiting is not None:
            waiting.append(msg)
        elif stream.batch_count:
            _send(stream, msg)
        else:
            self.waiting[client_id] = [msg]
            asyncio.get_running_loop().call_later(_WAIT, self._flush, client_id)

    def _flush(self, client_id: str) -> None:
        stream = self.scheduler.client_comms.get(client_id)
        if stream is None:  # gone (it hears nothing until it is back)
            self.waiting.pop(client_id, None)
        elif stream.batch_count:
            _send(stream, *self.waiting.pop(client_id, []))
        else:
            asyncio.get_running_loop().call_later(_WAIT, self._flush, client_id)

    def _keep(self, changes: list[dict[str, Any]]) -> None:
        """Keep what a new worker's empty caches do not make up for: what a store's consolidated copy may not
        know (:func:`cloudio._zarr.consumer.lasting`)."""
        from cloudio._zarr.consumer import bucket_of, lasting

        self.kept += (c for c in changes if lasting(Change(**c)))
        if len(self.kept) > _KEPT_MAX:  # coarser, never lost
            buckets = sorted({bucket_of(c["url"]) for c in self.kept})
            self.kept = [_encode(Change(url=b, kind="invalidate", seq=0, prefix=True)) for b in buckets]


def _send(stream: BatchedSend, *msgs: dict[str, Any]) -> None:
    """Send on a stream the scheduler still lists, which may have closed already (it keeps a client's for a
    moment after its connection closed): that receiver hears nothing more, and the others must still hear.
    distributed guards its own sends the same way."""
    from distributed.comm.core import CommClosedError

    try:
        stream.send(*msgs)
    except CommClosedError as e:
        log.debug("cloudio journal: not relayed to a closed stream (%s)", e)


class _ForwardPlugin(WorkerPlugin):  # type: ignore[misc,valid-type]
    """Worker side: forward local changes to the scheduler, replay the others'."""

    name = _PLUGIN
    idempotent = True

    async def setup(self, worker: Worker) -> None:
        self._worker = worker
        worker.stream_handlers[_OP] = lambda changes, **_: _replay(changes)
        # before this worker's first task (distributed sets plugins up before it reads the scheduler's stream)
        _replay(await getattr(worker.scheduler, _KEPT_OP)())
        journal().add_listener(self._forward)

    def teardown(self, worker: Worker) -> None:
        journal().remove_listener(self._forward)

    def _forward(self, change: Change) -> None:
        worker = self._worker
        # tasks record from executor threads; the stream belongs to the event loop
        worker.loop.add_callback(worker.batched_send, {"op": _OP, "changes": [_encode(change)]})


class _ClientForwarder:
    """Client side: forward this process's changes to the scheduler, while the client is open.

    Holds the client weakly: a closed client is let go (its listener taken
    off the journal at its next change, or when it is collected).
    """

    def __init__(self, client: Client) -> None:
        self.client = weakref.ref(client)

    def __call__(self, change: Change) -> None:
        client = self.client()
        if client is None or client.status in ("closing", "closed"):
            journal().remove_listener(self)
            return
        if client.status in ("running", "connecting", "newly-created"):
            client._send_to_scheduler({"op": _OP, "changes": [_encode(change)]})


#: the clients installed on, each with its forwarder (weakly: a client collected drops out)
_installed: weakref.WeakKeyDictionary[Client, _ClientForwarder] = weakref.WeakKeyDictionary()


def install(client: Client) -> None:
    """Make journal records travel between ``client``'s process and every worker.

    Call once per client, before submitting work that writes through cloudio.
    Workers started later get the plugin too. Idempotent. Closing the client
    undoes it in this process.

    Notes
    -----
    Workers need cloudio installed and, for an emulator, ``STORAGE_EMULATOR_HOST``
    in their environment (cloudio configures GDAL and gcsfs from it by itself).
    """
    if client in _installed:
        return
    if client.status in ("closing", "closed"):  # distributed would fail on the scheduler it let go
        raise ConfigurationError(
            f"cloudio.dask.install({client!r}): the client is {client.status}. Install on an open client, "
            "before submitting work that writes (e.g. inside its `with Client(...)` block)"
        )
    if client.asynchronous:
        raise ConfigurationError(
            f"cloudio.dask.install({client!r}): the client is asynchronous, and install registers its plugins "
            "before it returns. Install on a synchronous Client (asynchronous=False) of the same scheduler; "
            "the workers, and every client installed on, then hear each other's changes."
        )
    client.register_plugin(_RelayPlugin())
    client.register_plugin(_ForwardPlugin())
    forwarder = _ClientForwarder(client)
    client._stream_handlers[_OP] = lambda changes, **_: _replay(changes)
    client.sync(getattr(client.scheduler, _LISTEN_OP), client=client.id)
    journal().add_listener(forwarder)
    _installed[client] = forwarder
    weakref.finalize(client, journal().remove_listener, forwarder)
    log.info("cloudio: journal relay installed on %s", client.scheduler.address if client.scheduler else client)
