"""A capture that a ZooKeeper connection drop interrupted commits nothing; a capture
after a scan reads again only what was notified since the scan read it.

No servers: a stand-in store whose capture "reads" across a drop (the
bridge's connection generation moves, as ``Watching.disconnected`` makes it),
then reaches its commit. Changes made while the connection was away were
never notified, so the batch would not be closed over them (chaos seed
705621 published a pointer without its record that way): the paths go back
to pending for the rescan, and a capture after a drop starts with one.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

from bridge.errors import ZooKeeperError
from bridge.outbound import Outbound
from bridge.zk import Node, Stat


class Store:
    requeue: Any = None

    def __init__(self, bridge: FakeBridge, drop: bool) -> None:
        self.outbox = SimpleNamespace(unsure=False)
        self.bridge = bridge
        self.drop = drop
        self.committed = 0
        self.fail = 0  # attempts that fail with a retriable error first
        self.given: list[tuple[set[str], Any]] = []  # (rels, prefetched) of each attempt

    async def capture(self, rels: Any, notified: Callable[[], Any], on_batch: Any,
                      unbroken: Callable[[], None], prefetched: Any = None) -> list[Any]:
        self.given.append((set(rels), prefetched))
        notified()
        if self.fail:
            self.fail -= 1
            raise ZooKeeperError("connection loss")
        if self.drop:
            self.bridge.watching.session_gen += 1  # the connection dropped while reading
        unbroken()
        self.committed += 1
        return []


class FakeWatching:
    def __init__(self) -> None:
        self.session_gen = 0
        self.rescans = 0

    async def ensure_seen(self, name: str) -> None:
        self.rescans += 1

    async def after_capture(self, name: str, rels: set[str]) -> None:
        pass


class FakeBridge:
    region = "r1"
    incarnation = "ab12"

    def __init__(self, drop: bool) -> None:
        self.watching = FakeWatching()
        self.store = Store(self, drop)
        self.stores: dict[str, Any] = {"s": self.store}
        self.stats: Counter[str] = Counter()

    async def retry(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        while True:
            try:
                return await fn()
            except ZooKeeperError:
                continue


def test_a_capture_interrupted_by_a_drop_commits_nothing_and_leaves_its_paths_pending() -> None:
    async def main() -> None:
        b = FakeBridge(drop=True)
        out = Outbound(b)  # type: ignore[arg-type]
        out.mark("s", "/data/d25")
        out.mark("s", "/ptr")
        await out.flush("s")
        assert b.store.committed == 0
        assert out.dirty["s"] == {"/data/d25", "/ptr"}
        assert b.stats["captures_deferred:s"] == 1
        assert out.queues["s"].empty()

    asyncio.run(main())


def test_a_capture_without_a_drop_commits_after_the_rescan_check() -> None:
    async def main() -> None:
        b = FakeBridge(drop=False)
        out = Outbound(b)  # type: ignore[arg-type]
        out.mark("s", "/ptr")
        await out.flush("s")
        assert b.watching.rescans == 1 and b.store.committed == 1
        assert not out.dirty["s"]

    asyncio.run(main())


def node(value: bytes) -> Node:
    return Node(value, Stat(version=0, cversion=0, num_children=0, ephemeral=False,
                            czxid=1, mzxid=1))


def test_a_scan_capture_reads_again_only_what_was_notified_since_the_scan() -> None:
    async def main() -> None:
        b = FakeBridge(drop=False)
        out = Outbound(b)  # type: ignore[arg-type]
        scanned = {"/a": (node(b"1"), 10), "/b": (node(b"2"), 11)}
        out.mark("s", "/b", 12)  # changed after the scan read it
        out.mark("s", "/c", 13)
        await out.flush("s", {"/a", "/b"}, since=0, prefetched=scanned)
        [(rels, prefetched)] = b.store.given
        assert rels == {"/a", "/b", "/c"}
        assert prefetched == {"/a": scanned["/a"]}
        assert b.store.committed == 1

    asyncio.run(main())


def test_a_retried_capture_reads_everything_again() -> None:
    """A retry's notifications start after the failed attempt took some: what the
    scan read may have changed unseen by it."""
    async def main() -> None:
        b = FakeBridge(drop=False)
        b.store.fail = 1
        out = Outbound(b)  # type: ignore[arg-type]
        await out.flush("s", {"/a"}, since=0, prefetched={"/a": (node(b"1"), 10)})
        assert [p for _, p in b.store.given] == [{"/a": (node(b"1"), 10)}, None]
        assert b.store.committed == 1

    asyncio.run(main())
