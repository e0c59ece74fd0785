"""When the leader audits (every ``audit_interval`` after the last check) and rescans
(when asked: a reconnect, a reload).

No servers: the audits and scans are recorded, not run (they are tested
against real servers in test_acl.py and test_faults.py).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bridge.watching import Watching


@dataclass
class Settings:
    audit_interval: float


class FakeBridge:
    def __init__(self, interval: float) -> None:
        self.settings = Settings(interval)
        self.stores = {"a": None, "b": None}

    async def retry(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        return await fn()


Scans = list[tuple[float, str, str]]  # (seconds since the start, subtree, audit or rescan)


async def until(scans: Scans, n: int) -> None:
    """Until ``n`` scans were made (a loaded machine may be slow to run them), 5 s at most."""
    for _ in range(500):
        if len(scans) >= n:
            return
        await asyncio.sleep(0.01)


def run(interval: float, script: Callable[[Watching, FakeBridge, Scans], Awaitable[None]]
        ) -> Scans:
    """The audits and scans made while ``script`` runs."""
    scans: Scans = []

    async def main() -> None:
        bridge = FakeBridge(interval)
        w = Watching(bridge)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def scan(name: str, *, watched: bool = False) -> None:
            assert watched
            scans.append((loop.time() - t0, name, "rescan"))

        async def audit(name: str) -> None:
            scans.append((loop.time() - t0, name, "audit"))

        w.scan = scan  # type: ignore[method-assign]
        w.audit = audit  # type: ignore[method-assign]
        task = asyncio.create_task(w.rescanner())
        try:
            await script(w, bridge, scans)
        finally:
            task.cancel()

    asyncio.run(main())
    return scans


def test_every_interval_each_subtree_is_audited() -> None:
    async def wait(w: Watching, b: FakeBridge, scans: Scans) -> None:
        await until(scans, 6)

    scans = run(0.1, wait)
    assert [(name, what) for _, name, what in scans[:6]] == [
        ("a", "audit"), ("b", "audit")] * 3
    starts = [t for t, name, _ in scans if name == "a"]
    assert starts[0] >= 0.1
    assert all(later - earlier >= 0.1 for earlier, later in itertools.pairwise(starts))


def test_zero_rescans_only_when_asked() -> None:
    async def ask(w: Watching, b: FakeBridge, scans: Scans) -> None:
        await asyncio.sleep(0.3)
        assert scans == []
        w.request()
        await until(scans, 2)

    scans = run(0, ask)
    assert [(name, what) for _, name, what in scans] == [("a", "rescan"), ("b", "rescan")]


def test_a_reload_to_a_shorter_interval_counts_from_the_last_scan() -> None:
    async def shorten(w: Watching, b: FakeBridge, scans: Scans) -> None:
        await asyncio.sleep(0.2)
        b.settings.audit_interval = 0.1  # already due
        w.retime()
        await until(scans, 2)

    scans = run(600, shorten)
    assert [(name, what) for _, name, what in scans] == [("a", "audit"), ("b", "audit")]


def test_a_request_made_before_the_rescanner_runs_is_kept() -> None:
    # A reconnect during a term's start asks before the term's tasks run.
    scans: list[str] = []

    async def main() -> None:
        w = Watching(FakeBridge(600))  # type: ignore[arg-type]

        async def scan(name: str, *, watched: bool = False) -> None:
            scans.append(name)

        w.scan = scan  # type: ignore[method-assign]
        w.request()
        task = asyncio.create_task(w.rescanner())
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(main())
    assert scans == ["a", "b"]
