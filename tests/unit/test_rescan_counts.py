"""Counts over the metadata cache hold still while a scan rebuilds it.

No servers. A scan empties the cache and fills it again level by level; the
status record and the tombstone gauge, read meanwhile, would show a dip at
every rescan on a dashboard.
"""

from __future__ import annotations

import asyncio

import pytest

from bridge.clock import HybridClock
from bridge.config import MassDeleteSettings
from bridge.errors import ZooKeeperError
from bridge.layout import Layout
from bridge.model import NodeMeta, VectorClock, content_hash
from bridge.plan import MetaEntry
from bridge.scan import Scanner
from bridge.store import SubtreeStore


def tombstone(n: int) -> MetaEntry:
    return MetaEntry(NodeMeta(vc=VectorClock.of({"r1": n}), data_hash=content_hash(None),
                              deleted=True, writer="r1", ts=n), 0)


class SyncFails:
    """A ZooKeeper stand-in whose ``sync`` notes the store's state, then fails."""

    def __init__(self) -> None:
        self.store: SubtreeStore | None = None
        self.seen: list[tuple[bool, int]] = []

    async def sync(self, path: str) -> None:
        assert self.store is not None
        self.seen.append((self.store.rebuilding, self.store.tombstones_held()))
        raise ZooKeeperError("connection lost")


def store_with(zk: object) -> SubtreeStore:
    store = SubtreeStore(zk, Layout("/zkbridge", "s", "/app"),  # type: ignore[arg-type]
                         region="r1", clock=HybridClock(lambda: 1), max_data_bytes=1 << 20)
    store.metas = {"/": MetaEntry(None, 0), "/a": tombstone(1), "/b": tombstone(2)}
    return store


def test_the_last_count_stands_while_the_cache_is_rebuilt() -> None:
    store = store_with(object())
    assert store.tombstones_held() == 2
    store.rebuilding = True
    store.metas = {"/": MetaEntry(None, 0)}  # a scan's first step
    assert store.tombstones_held() == 2
    store.rebuilding = False
    assert store.tombstones_held() == 0


def test_a_scan_marks_the_rebuild_and_clears_the_mark_when_it_fails() -> None:
    zk = SyncFails()
    store = zk.store = store_with(zk)
    assert store.tombstones_held() == 2
    with pytest.raises(ZooKeeperError):
        asyncio.run(Scanner(store, MassDeleteSettings()).scan())
    assert zk.seen == [(True, 2)]
    assert not store.rebuilding
