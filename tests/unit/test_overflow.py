"""The outbox's bound (bridge.overflow): when a subtree overflows, and how it ends.

No servers: a stand-in bridge whose ZooKeeper records the writes it is asked
for and whose re-announcer records the re-announces started. The capture
side (no entry while overflowed) and the re-announce that follows run
against real servers in tests/integration/test_outbox.py.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

from bridge.layout import Layout
from bridge.overflow import ENTRY_OVERHEAD, Overflow
from bridge.startup import StartUp
from bridge.zk import Delete

MB = 1 << 20
MARKER = "/zkbridge/overflow/s"


class FakeZk:
    def __init__(self, existing: set[str] | None = None) -> None:
        self.existing = existing or set()
        self.multis: list[list[Any]] = []

    async def exists(self, path: str) -> object | None:
        # The overflow marker was created at zxid 42.
        return SimpleNamespace(czxid=42) if path in self.existing else None

    async def ensure_path(self, path: str) -> None:
        assert path == "/zkbridge/reannounce"

    async def multi(self, ops: list[Any]) -> list[Any]:
        self.multis.append(ops)
        return []


class FakeOutbox:
    def __init__(self, entries: int, size: int) -> None:
        self.measured = (entries, size)

    async def size(self, progress: Callable[[int], None]) -> tuple[int, int]:
        progress(self.measured[0])
        return self.measured


class FakeReannounce:
    def __init__(self) -> None:
        self.started: list[tuple[str, Callable[[], Awaitable[int | None]] | None]] = []
        self.running = False
        self.why: str | None = None
        self.prior: int | None = None  # what a re-announce marker left asks for

    async def read_since(self, name: str) -> int | None:
        return self.prior

    def marker(self, name: str) -> str:
        return f"/zkbridge/reannounce/{name}"

    def marker_op(self, name: str, prior: int | None, since: int) -> Any:
        return ("mark", name, prior, since)

    def busy(self, name: str) -> bool:
        return self.running

    def cause(self, name: str) -> str | None:
        return self.why if self.running else None

    def start(self, name: str, before: Callable[[], Awaitable[int | None]] | None = None, *,
              cause: str = "") -> None:
        assert cause == "outbox overflowed"
        self.started.append((name, before))
        self.running, self.why = True, cause


class FakeBridge:
    def __init__(self, zk: FakeZk | None = None, outbox: FakeOutbox | None = None) -> None:
        self.stores: dict[str, Any] = {"s": SimpleNamespace(
            overflow=None, overflow_marked=False, outbox=outbox or FakeOutbox(0, 0),
            layout=Layout("/zkbridge", "s", "/app"))}
        self.settings = SimpleNamespace(outbox_max_mb=1.0, state_path="/zkbridge")
        self.stats: Counter[str] = Counter()
        self.locks = {"s": asyncio.Lock()}
        self.zk = zk or FakeZk()
        self.reannounce = FakeReannounce()
        self.start_up = StartUp()

    async def retry(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        return await fn()


def overflowed(size: int = MB) -> tuple[FakeBridge, Overflow]:
    b = FakeBridge()
    over = Overflow(b)  # type: ignore[arg-type]
    over.written("s", size)
    return b, over


def test_an_outbox_at_its_bound_overflows_and_says_so() -> None:
    b = FakeBridge()
    over = Overflow(b)  # type: ignore[arg-type]
    over.written("s", MB // 2)
    over.written("s", MB // 2 - 2 * ENTRY_OVERHEAD - 1)
    assert b.stores["s"].overflow is None and not over.active("s")
    over.written("s", 1)
    # The next capture writes the marker before its first batch without an entry.
    assert b.stores["s"].overflow == MARKER and over.active("s")
    assert b.stats["outbox_overflows:s"] == 1
    over.written("s", MB)  # entered once
    assert b.stats["outbox_overflows:s"] == 1


def test_it_ends_below_half_the_bound_through_one_reannounce() -> None:
    b, over = overflowed()
    b.stores["s"].overflow_marked = True  # a capture without an entry committed
    over.acked("s", MB // 2)  # at half: not yet
    assert b.reannounce.started == []
    over.acked("s", 1)
    assert [name for name, _ in b.reannounce.started] == ["s"]
    over.acked("s", 1)  # started once
    assert len(b.reannounce.started) == 1
    _, before = b.reannounce.started[0]
    assert before is not None
    b.zk.existing.add(MARKER)
    # One multi: the re-announce marker asks for what changed since the overflow's
    # marker was created, which goes.
    assert asyncio.run(before()) == 42
    assert b.zk.multis == [[("mark", "s", None, 42), Delete(MARKER)]]
    assert b.stores["s"].overflow is None and not b.stores["s"].overflow_marked
    # Until the whole state is out, heartbeats carry no `applied` and nothing is collected.
    assert over.active("s")
    b.reannounce.running = False
    assert not over.active("s")


def test_an_unfinished_reannounce_asking_for_more_is_kept() -> None:
    b, over = overflowed()
    b.stores["s"].overflow_marked = True
    b.zk.existing.add(MARKER)
    b.reannounce.prior = 7  # an earlier overflow's re-announce, not finished
    over.acked("s", MB)
    [(_, before)] = b.reannounce.started
    assert before is not None
    assert asyncio.run(before()) == 7
    assert b.zk.multis == [[("mark", "s", 7, 7), Delete(MARKER)]]

    b, over = overflowed()  # ... or one of the whole state (after topic loss)
    b.stores["s"].overflow_marked = True
    b.zk.existing.add(MARKER)
    b.reannounce.prior = 0
    over.acked("s", MB)
    [(_, before)] = b.reannounce.started
    assert before is not None
    assert asyncio.run(before()) == 0
    assert b.zk.multis == [[("mark", "s", 0, 0), Delete(MARKER)]]


def test_an_overflow_no_capture_marked_ends_without_a_write() -> None:
    b, over = overflowed()
    over.acked("s", MB)
    [(_, before)] = b.reannounce.started
    assert before is not None
    assert asyncio.run(before()) is None  # nothing kept out: nothing to re-announce
    assert b.zk.multis == [] and b.stores["s"].overflow is None
    b.reannounce.prior = 5  # but an unfinished re-announce is carried on
    assert asyncio.run(before()) == 5 and b.zk.multis == []


def test_a_new_term_finds_the_marker_and_measures_what_was_left() -> None:
    left = (1000, int(1.5 * MB))
    b = FakeBridge(FakeZk({MARKER}), FakeOutbox(*left))
    over = Overflow(b)  # type: ignore[arg-type]
    asyncio.run(over.start_term("s", pending=True))
    assert over.bytes["s"] == left[1] + left[0] * ENTRY_OVERHEAD
    assert b.stores["s"].overflow == MARKER and b.stores["s"].overflow_marked
    assert b.reannounce.started == []  # over half the bound: still overflowed
    # Published meanwhile: the end starts with the acks that take it below half.
    over.acked("s", MB)
    assert b.reannounce.started == []
    over.acked("s", MB)
    assert [name for name, _ in b.reannounce.started] == ["s"]


def test_a_new_term_with_the_marker_and_an_empty_outbox_ends_it_at_once() -> None:
    b = FakeBridge(FakeZk({MARKER}))
    over = Overflow(b)  # type: ignore[arg-type]
    asyncio.run(over.start_term("s", pending=False))
    assert [name for name, _ in b.reannounce.started] == ["s"]


def test_a_term_end_forgets_it_all() -> None:
    b, over = overflowed()
    over.reset()
    assert over.bytes["s"] == 0 and b.stores["s"].overflow is None
    b.reannounce.running = False
    assert not over.active("s")


def test_a_reannounce_after_topic_loss_is_no_overflow_but_holds_applied_back() -> None:
    b = FakeBridge()
    over = Overflow(b)  # type: ignore[arg-type]
    b.reannounce.running = True  # started by the own-topic checks, not by an overflow
    assert not over.active("s")  # neither `status` nor the gauge says OVERFLOWED
    assert over.unannounced("s")  # but heartbeats carry no `applied`, nothing is collected
    b.reannounce.running = False
    assert not over.unannounced("s")
