"""What a re-announce publishes: the whole state, or what an overflow changed (no servers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest

from bridge import reannounce
from bridge.layout import Layout
from bridge.reannounce import RESUMED, Reannouncer, since_data, since_of

MARKER = "/zkbridge/reannounce/s"


class FakeZk:
    def __init__(self, marker: bytes | None = None) -> None:
        self.nodes: dict[str, bytes] = {} if marker is None else {MARKER: marker}
        self.log: list[str] = []

    async def get(self, path: str) -> Any:
        data = self.nodes.get(path)
        return None if data is None else SimpleNamespace(data=data)

    async def ensure_path(self, path: str) -> None:
        self.nodes.setdefault(path, b"")

    async def set_data(self, path: str, data: bytes) -> None:
        self.log.append(f"set {data.decode()!r}")
        self.nodes[path] = data

    async def delete(self, path: str) -> None:
        self.log.append("delete")
        del self.nodes[path]


class FakeBridge:
    def __init__(self, zk: FakeZk) -> None:
        self.zk = zk
        self.stores = {"s": SimpleNamespace(layout=Layout("/zkbridge", "s", "/app"))}
        self.settings = SimpleNamespace(state_path="/zkbridge")
        self.region, self.incarnation = "r1", None

    async def retry(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        return await fn()

    async def guarded(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return await fn(*args)


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ``since`` each re-announce read the metadata with."""
    seen: list[int] = []

    async def read_meta(zk: Any, layout: Any, *, since: int = 0) -> dict[str, Any]:
        seen.append(since)
        return {}

    async def state_events(*args: Any, **kwargs: Any) -> AsyncIterator[list[Any]]:
        return
        yield []

    monkeypatch.setattr(reannounce, "read_meta", read_meta)
    monkeypatch.setattr(reannounce, "state_events", state_events)
    return seen


def run(r: Reannouncer, *starts: Callable[[], None]) -> None:
    async def main() -> None:
        for start in starts:
            start()
        await asyncio.gather(*r.running.values())

    asyncio.run(main())


def test_the_marker_data_round_trips_and_an_old_marker_asks_for_everything() -> None:
    assert since_of(since_data(123)) == 123
    assert since_data(0) == b"" and since_of(b"") == 0
    assert since_of(b"garbage") == 0 and since_of(b"since x") == 0


def test_an_overflows_end_publishes_what_changed_since_its_marker(asked: list[int]) -> None:
    zk = FakeZk()
    r = Reannouncer(FakeBridge(zk))  # type: ignore[arg-type]

    async def before() -> int:
        zk.nodes[MARKER] = since_data(42)  # as Overflow._leave writes it
        return 42

    run(r, lambda: r.start("s", before=before, cause="outbox overflowed"))
    assert asked == [42] and MARKER not in zk.nodes


def test_an_overflow_that_kept_nothing_out_publishes_nothing(asked: list[int]) -> None:
    zk = FakeZk()
    r = Reannouncer(FakeBridge(zk))  # type: ignore[arg-type]

    async def before() -> None:
        return None

    run(r, lambda: r.start("s", before=before, cause="outbox overflowed"))
    assert asked == [] and zk.log == []


def test_a_topic_loss_joining_an_overflows_end_makes_it_whole(asked: list[int]) -> None:
    zk = FakeZk()
    r = Reannouncer(FakeBridge(zk))  # type: ignore[arg-type]

    async def before() -> int:
        zk.nodes[MARKER] = since_data(42)
        return 42

    run(r, lambda: r.start("s", before=before, cause="outbox overflowed"), lambda: r.start("s"))
    # The whole state is asked for first (a crash keeps that), the overflow's ask
    # is met by it.
    assert asked == [0] and zk.log[0] == "set ''" and MARKER not in zk.nodes


def test_a_resumed_reannounce_does_what_its_marker_asks(asked: list[int]) -> None:
    for data, since in ((since_data(9), 9), (b"", 0)):
        zk = FakeZk(marker=data)
        r = Reannouncer(FakeBridge(zk))  # type: ignore[arg-type]
        run(r, lambda r=r: r.start("s", cause=RESUMED))  # type: ignore[misc]
        assert asked.pop() == since and zk.log == ["delete"]
