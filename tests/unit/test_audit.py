"""The periodic audit: the tree's listings against the metadata cache.

No servers: a stand-in answers the audit's reads from a dict. What the
suspects then become (held back, replicated, deleted) is tested against real
servers in test_acl.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from bridge.clock import HybridClock
from bridge.config import MassDeleteSettings
from bridge.errors import NoPermission
from bridge.layout import Layout
from bridge.model import NodeMeta, VectorClock, content_hash
from bridge.plan import MetaEntry
from bridge.scan import Scanner
from bridge.store import SubtreeStore
from bridge.zk import Node, Stat

MOUNT = "/app"


def entry(deleted: bool = False) -> MetaEntry:
    return MetaEntry(NodeMeta(vc=VectorClock.of({"r1": 1}),
                              data_hash=content_hash(None if deleted else b"v"),
                              deleted=deleted, writer="r1", ts=1), 0)


class Tree:
    """rel → "open", "ephemeral" or "locked" (no READ for the bridge)."""

    def __init__(self, nodes: dict[str, str]) -> None:
        self.nodes = {"/": "open", **nodes}
        self.ops: list[tuple[str, str]] = []

    async def read_all(self, ops: Sequence[tuple[str, str]],
                       progress: Callable[[int], None] | None = None
                       ) -> tuple[list[Any], list[int]]:
        self.ops += ops
        if progress is not None:
            progress(len(ops))
        return [self._answer(kind, path[len(MOUNT):] or "/") for kind, path in ops], [1] * len(ops)

    def _answer(self, kind: str, rel: str) -> Any:
        what = self.nodes.get(rel)
        if what is None:
            return None
        if what == "locked":
            return NoPermission(rel)
        if kind == "children":
            prefix = "/" if rel == "/" else rel + "/"
            return [r[len(prefix):] for r in self.nodes
                    if r.startswith(prefix) and "/" not in r[len(prefix):] and r != "/"]
        return Node(b"v", Stat(version=0, cversion=0, num_children=0,
                               ephemeral=what == "ephemeral", czxid=1, mzxid=1))


def audit(tree: Tree, metas: dict[str, MetaEntry], exclude: tuple[str, ...] = (),
          held: dict[str, str] | None = None) -> tuple[str, ...]:
    store = SubtreeStore(tree, Layout("/zkbridge", "s", MOUNT),  # type: ignore[arg-type]
                         region="r1", clock=HybridClock(lambda: 1), max_data_bytes=1 << 20,
                         exclude=exclude)
    store.metas = {"/": MetaEntry(None, 0), **metas}
    store.held_back = dict(held or {})
    return asyncio.run(Scanner(store, MassDeleteSettings()).audit()).suspects


def test_a_tree_that_matches_the_cache_has_no_suspects_and_no_data_is_read() -> None:
    tree = Tree({"/d": "open", "/d/a": "open", "/e": "ephemeral"})
    assert audit(tree, {"/d": entry(), "/d/a": entry()}) == ()
    # One listing per znode; only the name the cache does not know is read (ephemeral).
    assert sorted(tree.ops) == sorted([("children", "/app"), ("children", "/app/d"),
                                       ("children", "/app/d/a"), ("children", "/app/e"),
                                       ("data", "/app/e")])


def test_what_the_watch_misses_is_suspect() -> None:
    tree = Tree({"/d": "open", "/d/new": "open", "/d/locked": "locked", "/x": "locked",
                 "/tomb": "open"})
    metas = {"/d": entry(), "/gone": entry(), "/x": entry(), "/tomb": entry(deleted=True),
             "/dead": entry(deleted=True)}
    assert audit(tree, metas) == (
        "/d/locked",  # created unreadable: no event
        "/d/new",  # unknown to the cache and persistent
        "/gone",  # live in the cache, absent from the tree
        "/x",  # its listing refused
    )  # not /tomb (a placeholder kept for children) nor /dead (a tombstone, absent)


def test_excluded_paths_are_not_suspect_paths_held_back_from_reading_are() -> None:
    tree = Tree({"/tmp": "open", "/tmp/x": "locked", "/d": "open"})
    metas = {"/d": entry(), "/tmp/old": entry()}
    assert audit(tree, metas, exclude=("/tmp",), held={"/far": "read", "/w": "write"}) == (
        "/far",)
