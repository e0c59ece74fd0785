"""The bounded publish queue: when a subtree spills, and how the feeder reads the outbox back.

No servers: a stand-in store serves outbox listings and payloads from a
dict, a stand-in bridge retries by calling once. What is checked is the
ordering contract: entries are queued in capture order (flat entries of the
previous release first, then the buckets), each once, and nothing is queued
directly while the feeder has not caught up.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from bridge import codec, queueing, statecodec
from bridge.model import Event, Op, VectorClock
from bridge.outbound import Outbound
from bridge.outbox import outbox_key
from bridge.overflow import Overflow
from bridge.queueing import START

ROOT = "/zkbridge/subtrees/s/outbox"


def payload(n: int) -> bytes:
    return codec.encode(Event(origin="r1", subtree="s", path=f"/n{n}", op=Op.PUT,
                              vc=VectorClock.of({"r1": n + 1}), ts=1000 + n, writer="r1",
                              data=b"%d" % n))


class FakeOutbox:
    def __init__(self, entries: dict[str, bytes]) -> None:
        self.entries = entries

    def key(self, path: str) -> tuple[int, str]:
        return outbox_key(ROOT, path)

    async def dirs(self) -> list[tuple[int, str]]:
        dirs = {p.rsplit("/", 1)[0] for p in self.entries}
        return sorted((-1 if d == ROOT else int(d.rsplit("-", 1)[1]), d) for d in dirs)

    async def depth(self) -> int:
        return len(self.entries)

    async def names(self, index: int, directory: str) -> list[str]:
        return sorted(p.rsplit("/", 1)[1] for p in self.entries if p.rsplit("/", 1)[0] == directory)

    async def read(self, paths: Sequence[str]) -> list[tuple[str, list[bytes]]]:
        return [(p, statecodec.decode_outbox(statecodec.encode_outbox([self.entries[p]])))
                for p in paths if p in self.entries]


class FakeBridge:
    region = "r1"
    incarnation = "ab12"

    def __init__(self, outbox: FakeOutbox) -> None:
        self.stores: dict[str, Any] = {"s": SimpleNamespace(outbox=outbox, overflow=None,
                                                             overflow_marked=False)}
        self.locks = {"s": asyncio.Lock()}
        self.stats: Counter[str] = Counter()
        self.settings = SimpleNamespace(outbox_max_mb=256.0, state_path="/zkbridge")
        self.reannounce = SimpleNamespace(busy=lambda name: False)
        self.overflow = Overflow(self)  # type: ignore[arg-type]

    async def retry(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        return await fn()


def entry(bucket: int | None, seq: int) -> str:
    return f"{ROOT}/b-{seq:010d}" if bucket is None else f"{ROOT}/q-{bucket:010d}/b-{seq:010d}"


def queued_paths(out: Outbound) -> list[str | None]:
    return [u.outbox_path for u in out.queues["s"]._queue]  # type: ignore[attr-defined]


def test_keys_put_flat_entries_first_then_buckets_in_order() -> None:
    keys = [outbox_key(ROOT, p) for p in (entry(None, 5), entry(0, 9), entry(1, 0), entry(10, 2))]
    assert keys == sorted(keys) and keys[0] > START


def test_a_full_queue_spills_and_later_entries_wait_for_the_feeder(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queueing, "QUEUE_RECORDS", 2)
    out = Outbound(FakeBridge(FakeOutbox({})))  # type: ignore[arg-type]
    for seq in range(4):
        out.enqueue("s", entry(0, seq), [(b"/k", b"v")])
    assert queued_paths(out) == [entry(0, 0), entry(0, 1)]
    assert out.draining["s"] and out.spilled["s"].is_set()
    assert out.cursor["s"] == outbox_key(ROOT, entry(0, 1))  # the feeder goes on after it
    out.enqueue("s", None, [(b"/", b"heartbeat")])  # not an outbox entry: queued
    assert queued_paths(out)[-1] is None


def test_large_values_spill_by_bytes_long_before_the_record_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queueing, "QUEUE_BYTES", 1000)
    out = Outbound(FakeBridge(FakeOutbox({})))  # type: ignore[arg-type]
    big = b"x" * 398  # with its 2-byte key, 400 bytes a record
    for seq in range(4):
        out.enqueue("s", entry(0, seq), [(b"/k", big)] if seq != 1 else [(b"/k", big)] * 2)
    # 400, then 800 more: past the bound, so the third entry spills (a batch over, never split).
    assert queued_paths(out) == [entry(0, 0), entry(0, 1)]
    assert out.queued["s"] == 3 and out.queued_bytes["s"] == 1200
    assert out.draining["s"] and out.full("s")
    out.enqueue("s", None, [(b"/", big * 10)])  # heartbeats and re-announcements: not counted
    assert out.queued_bytes["s"] == 1200


def three_entries() -> tuple[FakeOutbox, Outbound]:
    """An outbox holding three entries of bucket 0, and an Outbound over it."""
    store = FakeOutbox({entry(0, i): payload(i) for i in range(3)})
    return store, Outbound(FakeBridge(store))  # type: ignore[arg-type]


def test_the_feeder_waits_until_the_queue_is_half_empty_in_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queueing, "QUEUE_BYTES", 1000)
    monkeypatch.setattr(queueing, "FEED_GROUP", 1)
    _, out = three_entries()
    out.spill("s", start=True)

    async def run() -> list[int]:
        out.queued_bytes["s"] = 500  # half the bound: the feeder waits
        task = asyncio.ensure_future(out._feed_pass("s", wait=True))
        for _ in range(20):
            await asyncio.sleep(0)
        waited = len(queued_paths(out))
        out.queued_bytes["s"] = 0  # the publisher was acked
        async with out._room:
            out._room.notify_all()
        await asyncio.wait_for(task, 5)
        return [waited, len(queued_paths(out))]

    assert asyncio.run(run()) == [0, 3]


def test_while_spilled_the_backlog_counts_the_outbox_and_keeps_counting_while_waiting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queueing, "QUEUE_BYTES", 1000)
    monkeypatch.setattr(queueing, "COUNT_EVERY", 0.01)
    store, out = three_entries()
    out.enqueue("s", entry(0, 0), [(b"/k", b"x" * 2000)])  # over the bound: the next spills
    out.enqueue("s", entry(0, 1), [(b"/k", b"v")])
    assert out.draining["s"] and out.backlog("s") == 1  # not counted yet

    async def run() -> list[int]:
        task = asyncio.ensure_future(out._feed_pass("s", wait=True))  # Kafka is away
        await asyncio.sleep(0.05)
        seen = [out.backlog("s")]
        for i in range(3, 8):  # captured meanwhile: only in the outbox
            store.entries[entry(0, i)] = payload(i)
        await asyncio.sleep(0.05)
        seen.append(out.backlog("s"))
        task.cancel()
        return seen

    assert asyncio.run(run()) == [3, 8]
    out.draining["s"] = False
    assert out.backlog("s") == 1  # caught up: the queue is the whole backlog


def test_the_feeder_queues_what_follows_the_cursor_in_capture_order() -> None:
    paths = [entry(None, 3), entry(0, 0), entry(0, 1), entry(1, 0), entry(1, 1), entry(2, 0)]
    store = FakeOutbox({p: payload(i) for i, p in enumerate(paths)})
    out = Outbound(FakeBridge(store))  # type: ignore[arg-type]
    out.spill("s", start=True)
    assert asyncio.run(out._feed_pass("s", wait=False)) == len(paths)
    assert queued_paths(out) == paths
    # Entries captured meanwhile (a new bucket, and one after the cursor in
    # the last) are taken by the next pass, once.
    store.entries[entry(2, 1)] = payload(7)
    store.entries[entry(3, 0)] = payload(8)
    assert asyncio.run(out._feed_pass("s", wait=False)) == 2
    assert queued_paths(out)[-2:] == [entry(2, 1), entry(3, 0)]
    assert asyncio.run(out._feed_pass("s", wait=False)) == 0


def test_the_feeder_catches_up_under_the_lock_and_direct_queueing_resumes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queueing, "FEED_CHUNK", 2)
    paths = [entry(0, i) for i in range(5)]
    store = FakeOutbox({p: payload(i) for i, p in enumerate(paths)})
    out = Outbound(FakeBridge(store))  # type: ignore[arg-type]
    out.spill("s", start=True)
    out.enqueue("s", entry(0, 4), [(b"/n4", b"v")])  # captured while spilled: waits

    async def run() -> None:
        task = asyncio.ensure_future(out.feeder("s"))
        while out.draining["s"]:
            await asyncio.sleep(0)
            # The publisher empties the queue as the feeder fills it.
            out.queued["s"] = 0
        task.cancel()

    asyncio.run(run())
    assert queued_paths(out) == paths
    out.enqueue("s", entry(0, 5), [(b"/n5", b"v")])
    assert queued_paths(out)[-1] == entry(0, 5)


def test_null_entries_are_queued_as_null_records() -> None:
    tomb = Event(origin="r1", subtree="s", path="/gone", op=Op.DELETE,
                 vc=VectorClock.of({"r2": 3}), ts=50, writer="r2")
    store = FakeOutbox({})
    out = Outbound(FakeBridge(store))  # type: ignore[arg-type]
    nulls = statecodec.decode_outbox(statecodec.encode_null_entry([tomb]))
    out.enqueue_pending("s", [(entry(0, 0), nulls)])
    unit = out.queues["s"].get_nowait()
    assert unit.nulls and unit.records[0][0] == b"/gone"
    assert codec.decode(unit.records[0][1]).vc == tomb.vc


class BigEntryOutbox(FakeOutbox):
    """Entries of a start-up capture: a thousand events each; records what each read asked for."""

    def __init__(self, entries: dict[str, bytes], out: list[tuple[int, int]]) -> None:
        super().__init__(entries)
        self.reads = out
        self.outbound: Outbound | None = None

    async def read(self, paths: Sequence[str]) -> list[tuple[str, list[bytes]]]:
        assert self.outbound is not None
        self.reads.append((len(paths), self.outbound.queued["s"]))
        return [(p, [self.entries[p]] * 1000) for p in paths if p in self.entries]


def test_the_feeder_reads_large_entries_a_few_at_a_time_as_room_appears() -> None:
    """A spilled start-up capture (bench `--large`): never hundreds of 700 KB reads at once."""
    paths = [entry(0, i) for i in range(100)]
    reads: list[tuple[int, int]] = []
    store = BigEntryOutbox({p: payload(i) for i, p in enumerate(paths)}, reads)
    out = Outbound(FakeBridge(store))  # type: ignore[arg-type]
    store.outbound = out
    out.spill("s", start=True)

    async def run() -> None:
        task = asyncio.ensure_future(out.feeder("s"))
        while out.draining["s"]:
            await asyncio.sleep(0)
            if out.queued["s"] >= queueing.QUEUE_RECORDS // 2:
                # The publisher acknowledges everything queued so far.
                while not out.queues["s"].empty():
                    out.queues["s"].get_nowait()
                async with out._room:
                    out.queued["s"] = 0
                    out._room.notify_all()
        task.cancel()

    asyncio.run(run())
    assert sum(n for n, _ in reads) == 100
    assert max(n for n, _ in reads) <= queueing.FEED_GROUP
    # Each read waited for room: the queue never held much more than its bound.
    assert all(queued < queueing.QUEUE_RECORDS // 2 for _, queued in reads[:-1])
