"""The write journal: ordered, bounded, thread-safe; consumers and listeners hear each change once."""

from __future__ import annotations

import threading

import pytest

from cloudio._journal import EVERYTHING, ORIGIN, Change, Consumer, WriteJournal, journal


@pytest.fixture
def j() -> WriteJournal:
    """A private journal, so tests neither see nor disturb the process-wide one."""
    return WriteJournal(max_records=1000)


def test_records_are_ordered_and_since_filters_by_seq_and_prefix(j):
    assert j.seq == 0 and len(j) == 0 and j.since(0) == []
    a = j.record("gs://bkt/d/a.tif", "write", generation=7, size=10)
    b = j.record("gs://bkt/e/b.tif", "write")
    c = j.record("gs://bkt/d/a.tif", "delete")
    assert [a.seq, b.seq, c.seq] == sorted({a.seq, b.seq, c.seq}) and j.seq == c.seq
    assert (a.generation, a.size, a.origin) == (7, 10, ORIGIN)
    assert j.since(0) == [a, b, c]
    assert j.since(a.seq) == [b, c]
    assert j.since(c.seq) == []
    assert j.since(0, "gs://bkt/d/") == [a, c]
    assert j.since(0, "gs://bkt/d") == [a, c]  # a prefix with or without its '/'
    assert j.since(0, "gs://bkt/d/a.tif") == [a, c]
    assert j.since(0, "gs://bkt/") == [a, b, c]
    assert j.since(0, "gs://bkt/dd/") == []  # whole path segments only


def test_prefix_changes_touch_reads_below_them(j):
    inv = j.record("gs://bkt/d/", "invalidate", prefix=True)
    assert inv.touches("gs://bkt/d/sub/x.tif")
    assert inv.touches("gs://bkt/")  # a listing of the bucket may show d/ differently
    assert not inv.touches("gs://bkt/e/x.tif")
    obj = j.record("gs://bkt/d/a.tif", "write")
    assert obj.touches("gs://bkt/d/") and obj.touches("gs://bkt/d/a.tif")
    assert not obj.touches("gs://bkt/d/a.tif.aux.xml") and not obj.touches("gs://bkt/d/sub/")
    assert j.since(0, "gs://bkt/d/sub/x.tif") == [inv]


def test_every_consumer_hears_each_change_at_once_even_if_one_fails(j):
    heard: list[Change] = []

    class Broken(Consumer):
        def on_change(self, change: Change) -> None:
            raise RuntimeError("broken cache")

    class Eager(Consumer):
        def on_change(self, change: Change) -> None:
            heard.append(change)

    j.register(Broken())
    eager = j.register(Eager())
    j.register(eager)  # registering twice is harmless
    c = j.record("gs://bkt/a", "write")
    assert heard == [c] and j.since(0) == [c]
    j.unregister(eager)
    j.record("gs://bkt/b", "write")
    assert heard == [c]


def test_listeners_and_replay_do_not_echo(j):
    sent: list[Change] = []
    j.add_listener(sent.append)
    own = j.record("gs://bkt/a", "write")
    assert sent == [own]
    remote = Change(seq=99, url="gs://bkt/b", kind="write", generation=3, origin="123@elsewhere")
    j.replay([remote, own])  # our own record coming back is skipped
    assert sent == [own]  # replayed records are not sent out again
    [got] = j.since(own.seq)
    assert (got.url, got.generation, got.origin) == ("gs://bkt/b", 3, "123@elsewhere")
    j.remove_listener(sent.append)


def test_memory_is_bounded():
    j = WriteJournal(max_records=50)
    for i in range(1000):
        j.record(f"gs://bkt{i % 3}/k{i}", "write")
    assert len(j) == 50
    got = j.since(0)
    assert (got[0].url, got[0].prefix, got[0].seq) == (EVERYTHING, True, -1)  # 950 changes are gone: say so
    assert got[0].touches("gs://any-bucket/any/key")
    assert got[1].url == "gs://bkt2/k950" and len(got) == 51  # the newest 50 remain
    assert j.since(950)[0].url == "gs://bkt2/k950"  # nothing missing after seq 950: no marker
    assert j.since(1000) == []


def test_many_writers_lose_nothing_and_get_unique_ordered_seqs():
    j = WriteJournal(max_records=100_000)
    heard: list[Change] = []

    class Counting(Consumer):
        def on_change(self, change: Change) -> None:
            heard.append(change)  # list.append is atomic: no lock needed to count

    j.register(Counting())
    n_threads, per_thread = 8, 500
    start = threading.Barrier(n_threads)

    def writer(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            j.record(f"gs://bkt/t{t}/{i}", "write")

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()

    records = j.since(0)
    assert len(records) == len(j) == n_threads * per_thread
    seqs = [c.seq for c in records]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and j.seq == seqs[-1]
    assert sorted(heard, key=lambda c: c.seq) == records  # every change heard exactly once
    for t in range(n_threads):  # each writer's own changes stay in its order
        mine = [int(c.url.rsplit("/", 1)[1]) for c in records if c.url.startswith(f"gs://bkt/t{t}/")]
        assert mine == list(range(per_thread))


def test_the_process_journal_is_one_object(journal_records):
    assert journal() is journal()
    before = journal().seq
    c = journal().record("gs://bkt-journal-test/x", "invalidate", prefix=True)
    assert c.seq > before and journal_records == [c]


def test_a_consumer_must_say_how_it_acts():
    with pytest.raises(NotImplementedError):
        Consumer().on_change(Change(seq=1, url="gs://bkt/a", kind="write"))


def test_a_write_cancelled_while_it_waits_for_a_gdal_read_lets_go_even_when_its_loop_has_closed():
    """A write on an event loop waits (in a thread) for a GDAL read of its object in flight; it is cancelled,
    and ``asyncio.run`` closes the loop before the read ends. The wait then comes to hold the object: that
    hold must be let go. It was handed back through the closed loop (asyncio drops a result for a closed
    loop silently): the object stayed marked as changing, and every later GDAL open or read of it waited
    for good."""
    import asyncio
    import time

    import cloudio._gdal.consumer  # noqa: F401  (registers the consumer whose hooks gate GDAL's I/O)
    from cloudio._gdal.gates import gates

    url = "gs://cloudio-journal-test/cancelled-wait.tif"
    vsi = "/vsigs/cloudio-journal-test/cancelled-wait.tif"
    reading, done = threading.Event(), threading.Event()

    def read() -> None:  # a GDAL read of the object in flight
        gates.enter(vsi)
        reading.set()
        done.wait(30)
        gates.exit(vsi)

    reader = threading.Thread(target=read)
    reader.start()
    assert reading.wait(10)

    async def main() -> None:
        write = asyncio.ensure_future(journal().changing_async(url))
        await asyncio.sleep(0.1)
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write

    asyncio.run(main())  # closes the loop while the wait goes on
    done.set()
    reader.join(10)
    deadline = time.monotonic() + 10
    while vsi in gates._changing and time.monotonic() < deadline:
        time.sleep(0.02)
    assert vsi not in gates._changing
    later = threading.Thread(target=lambda: (gates.enter(vsi), gates.exit(vsi)), daemon=True)
    later.start()
    later.join(5)
    assert not later.is_alive(), "a later GDAL read of the object waits for a change nobody holds"
