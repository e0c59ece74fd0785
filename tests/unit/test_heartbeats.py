"""Heartbeats: sent behind a backlog, one in flight per subtree, never held up by ZooKeeper.

No servers: a stand-in bridge whose store can make the own-topic position
write hang (an fsync-stalled ZooKeeper), and no publisher, so nothing is
acknowledged unless a test says so.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

from bridge import codec
from bridge.model import Op
from bridge.outbound import Outbound
from bridge.overflow import Overflow
from bridge.publishing import Outgoing


class HangingStore:
    """Writes of positions wait until ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.writes: list[tuple[str, dict[int, int]]] = []
        self.settled: Any = None
        self.outbox = SimpleNamespace(key=lambda path: (-1, path))
        self.overflow: str | None = None
        self.overflow_marked = False
        self.positions = SimpleNamespace(write=self.write_positions)

    async def write_positions(self, peer: str, parts: dict[int, int]) -> None:
        await self.release.wait()
        self.writes.append((peer, parts))


class Clock:
    def __init__(self) -> None:
        self.ticks = itertools.count(1000)

    def now(self) -> int:
        return next(self.ticks)


class FakeStreams:
    def applied_report(self, subtree: str) -> dict[str, Any]:
        return {}


class FakeBridge:
    region = "r1"
    incarnation = "ab12"

    def __init__(self) -> None:
        self.store = HangingStore()
        self.stores: dict[str, Any] = {"s": self.store}
        self.stats: Counter[str] = Counter()
        self.clock = Clock()
        self.streams = FakeStreams()
        self.settings = SimpleNamespace(outbox_max_mb=256.0, state_path="/zkbridge")
        self.reannounce = SimpleNamespace(busy=lambda name: False)
        self.overflow = Overflow(self)  # type: ignore[arg-type]

    async def retry(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        return await fn()


def queued(out: Outbound) -> list[Outgoing]:
    return list(out.queues["s"]._queue)  # type: ignore[attr-defined]


async def beats(out: Outbound, rounds: int) -> None:
    """Run the heartbeat loop for ``rounds`` intervals."""
    done = asyncio.Event()
    count = itertools.count(1)

    async def sleep(_: float) -> None:
        if next(count) >= rounds:
            done.set()
            await asyncio.Event().wait()  # parked until cancelled
        await asyncio.sleep(0)

    task = asyncio.ensure_future(out.heartbeats(lambda: 1.0, sleep))
    await asyncio.wait_for(done.wait(), 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_one_heartbeat_in_flight_per_subtree_and_the_next_once_it_is_acknowledged() -> None:
    async def main() -> None:
        out = Outbound(FakeBridge())  # type: ignore[arg-type]
        await beats(out, 5)
        units = queued(out)
        # Kafka is not acknowledging: five intervals, one heartbeat waiting.
        assert len(units) == 1 and units[0].outbox_path is None
        assert codec.decode(units[0].records[0][1]).op is Op.HEARTBEAT
        assert units[0].done is not None
        units[0].done.set()  # the publisher's ack
        await beats(out, 1)
        assert len(queued(out)) == 2

    asyncio.run(main())


def test_a_backlog_does_not_stop_heartbeats() -> None:
    async def main() -> None:
        out = Outbound(FakeBridge())  # type: ignore[arg-type]
        for i in range(50):  # a capture backlog the publisher has not reached yet
            out.enqueue("s", f"/outbox/b-{i}", [(b"/k", b"v")])
        await beats(out, 1)
        assert [u.outbox_path for u in queued(out)][-1] is None  # the heartbeat, behind them

    asyncio.run(main())


def test_a_hanging_position_write_holds_no_heartbeat_up() -> None:
    async def main() -> None:
        bridge = FakeBridge()
        out = Outbound(bridge)  # type: ignore[arg-type]
        out._own_ends = {"s": {0: 42}}  # what the publisher left to store
        await beats(out, 3)
        hb = queued(out)
        assert len(hb) == 1 and hb[0].done is not None
        hb[0].done.set()
        await beats(out, 3)
        # The write still hangs, and heartbeats went on; one write, not one per round.
        assert len(queued(out)) == 2 and bridge.store.writes == []
        bridge.store.release.set()
        await out.settle()
        assert bridge.store.writes == [("r1", {0: 42})]

    asyncio.run(main())
