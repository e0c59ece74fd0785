"""A capture's next piece is planned while the piece before it is being written.

No servers. The metadata a piece writes is committed to the cache only once
its ``multi`` answered, so the next piece, planned meanwhile, must see it
through ``before``: a directory created by the first piece is not created
again, and a path it wrote is updated at the version that write leaves.
"""

from __future__ import annotations

from bridge.acl import AclPolicy
from bridge.clock import HybridClock
from bridge.layout import Layout
from bridge.model import NodeMeta, VectorClock, content_hash
from bridge.plan import MetaEntry, Plan, Planner
from bridge.zk import Create, SetData


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
