"""A capture's next piece is planned while the piece before it is being written.

No servers. The metadata a piece writes is committed to the cache only once
its ``multi`` answered, so the next piece, planned meanwhile, must see it
through ``before``: a directory created by the first piece is not created
again, and a path it wrote is updated at the version that write leaves.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from bridge.acl import AclPolicy
from bridge.clock import HybridClock
from bridge.errors import NoPermission
from bridge.layout import Layout
from bridge.model import NodeMeta, VectorClock, content_hash
from bridge.plan import MetaEntry, Plan, Planner
from bridge.store import SubtreeStore
from bridge.zk import Create, Node, SetData, Stat


class FakePlanner(Planner):
    def __init__(self) -> None:
        self.layout = Layout("/zkbridge", "s", "/app")
        self.clock = HybridClock(lambda: 1)
        self.max_data_bytes = 1 << 20
        self.exclude = ()
        self.acl = AclPolicy("copy", None)
        self.metas = {"/": MetaEntry(None, 0)}
        self.oversized = {}
        self.held_back = {}
        self.held_events = {}


def meta(n: int) -> NodeMeta:
    return NodeMeta(vc=VectorClock.of({"r1": n}), data_hash=content_hash(b"x"), deleted=False,
                    writer="r1", ts=n)


def test_the_next_piece_sees_what_the_piece_ahead_writes() -> None:
    p = FakePlanner()
    first = Plan()
    p._meta_op(first, "/d/a", meta(1))
    assert [type(op) for op in first.ops] == [Create, Create]  # /d's directory, then /d/a

    second = Plan()
    p._meta_op(second, "/d/b", meta(1), first.metas)
    p._meta_op(second, "/d", meta(1), first.metas)
    assert [op.path for op in second.ops] == [p.layout.meta("/d/b"), p.layout.meta("/d")]
    assert isinstance(second.ops[0], Create)
    assert isinstance(second.ops[1], SetData) and second.ops[1].version == 0
    assert p.metas == {"/": MetaEntry(None, 0)}  # nothing committed by planning


def test_without_the_piece_ahead_the_directory_would_be_created_twice() -> None:
    p = FakePlanner()
    first = Plan()
    p._meta_op(first, "/d/a", meta(1))
    second = Plan()
    p._meta_op(second, "/d/b", meta(1))
    assert [type(op) for op in second.ops] == [Create, Create]  # the bug `before` prevents


class NoWrites:
    """A ZooKeeper stand-in for a capture that must write nothing."""

    async def multi(self, ops: object) -> object:
        raise AssertionError("a capture with nothing to announce wrote")

    async def get_acls_many(self, paths: list[str]) -> list[object]:
        assert not paths, "no put, no ACL to read"
        return []


def test_a_capture_with_only_a_placeholder_cleanup_due_writes_nothing() -> None:
    """The placeholder /p (tombstoned, kept for its child) is empty now, but the child's
    deletion cannot be announced yet (its read was refused): nothing to announce, so no
    piece to plan (67d2820: the first piece of an empty split was indexed) and no write;
    the cleanup rides on the batch that announces the child."""
    store = SubtreeStore(NoWrites(), Layout("/zkbridge", "s", "/app"),  # type: ignore[arg-type]
                         region="r1", clock=HybridClock(lambda: 1), max_data_bytes=1 << 20)
    store.metas = {"/": MetaEntry(None, 0),
                   "/p": MetaEntry(replace(meta(1), deleted=True), 0),
                   "/p/c": MetaEntry(meta(1), 0)}
    empty = Node(b"", Stat(version=0, cversion=2, num_children=0, ephemeral=False, czxid=5,
                           mzxid=5, pzxid=9))
    reads: dict[str, Node | NoPermission | None] = {"/p": empty, "/p/c": NoPermission("/p/c")}

    assert asyncio.run(store._capture(reads)) == []
    assert store.held_back == {"/p/c": "read"}
    assert store.metas["/p"].meta is not None and store.metas["/p"].meta.deleted
