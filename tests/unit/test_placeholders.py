"""A tombstone's placeholder mark lasts only while its znode does.

No servers. A delete applied over a znode with children keeps it as an empty
placeholder; whether it does depends on what this region held at the time,
so two regions can apply the same deletes, one with a placeholder on the
way and one without. Once the znode is gone their tombstones must be the
same (a fault campaign, seed 6514, found one left marked); while it stands,
a parent created again over its tombstone is marked as well.
"""

from __future__ import annotations

from bridge.model import Event, NodeMeta, Op, VectorClock, content_hash
from bridge.plan import MetaEntry
from bridge.zk import Create, Delete, Node, SetData, Stat
from tests.unit.test_null_records import FakePlanner


def live(writer: str, n: int) -> MetaEntry:
    return MetaEntry(NodeMeta(vc=VectorClock.of({writer: n}), data_hash=content_hash(b"x"),
                              deleted=False, writer=writer, ts=n), 2)


def delete(path: str, n: int) -> Event:
    return Event(origin="r3", subtree="s", path=path, op=Op.DELETE,
                 vc=VectorClock.of({"r3": n}), ts=100 + n, writer="r3")


def node(children: int, version: int = 5, czxid: int = 9) -> Node:
    return Node(b"x" if children == 0 else b"", Stat(
        version=version, cversion=0, num_children=children, ephemeral=False, czxid=czxid,
        mzxid=czxid))


def apply(planner: FakePlanner, event: Event, reads: dict[str, Node | None]) -> list[object]:
    plan, _ = planner._plan_apply([event], dict(reads))
    planner.metas.update(plan.metas)
    return list(plan.ops)


def test_the_last_child_gone_removes_the_placeholder_and_its_mark() -> None:
    p = FakePlanner({"/t": live("r3", 1), "/t/c": live("r3", 1)})
    apply(p, delete("/t", 2), {"/t": node(children=1)})
    kept = p.metas["/t"].meta
    assert kept is not None and kept.deleted and kept.placeholder and kept.placeholder_czxid == 9

    ops = apply(p, delete("/t/c", 3), {"/t/c": node(children=0, version=1),
                                       "/t": Node(b"", Stat(version=6, cversion=0,
                                                            num_children=1, ephemeral=False,
                                                            czxid=9, mzxid=9))})
    unmark = [i for i, op in enumerate(ops)
              if isinstance(op, SetData) and op.path == p.layout.meta("/t")]
    assert unmark and ops.index(Delete("/app/t", 6)) < unmark[0]
    left = p.metas["/t"].meta
    assert left is not None and left.deleted and not left.placeholder
    assert left.placeholder_czxid == 0


def test_regions_that_did_and_did_not_keep_a_placeholder_end_with_the_same_tombstone() -> None:
    # r1 held /t/c when /t's delete came (a placeholder on the way); r2 did not.
    r1 = FakePlanner({"/t": live("r3", 1), "/t/c": live("r3", 1)})
    gone = NodeMeta(vc=VectorClock.of({"r3": 3}), data_hash=content_hash(None), deleted=True,
                    writer="r3", ts=103)
    r2 = FakePlanner({"/t": live("r3", 1), "/t/c": MetaEntry(gone, 2)})
    apply(r1, delete("/t", 2), {"/t": node(children=1)})
    apply(r1, delete("/t/c", 3), {"/t/c": node(children=0, version=1),
                                  "/t": Node(b"", Stat(version=6, cversion=0, num_children=1,
                                                       ephemeral=False, czxid=9, mzxid=9))})
    apply(r2, delete("/t", 2), {"/t": node(children=0)})
    assert r1.metas["/t"].meta == r2.metas["/t"].meta


def test_a_parent_created_again_over_its_tombstone_is_marked_as_a_placeholder() -> None:
    gone = NodeMeta(vc=VectorClock.of({"r3": 2}), data_hash=content_hash(None), deleted=True,
                    writer="r3", ts=102)
    p = FakePlanner({"/t": MetaEntry(gone, 4)})
    put = Event(origin="r2", subtree="s", path="/t/new", op=Op.PUT,
                vc=VectorClock.of({"r2": 1}), ts=50, writer="r2", data=b"new")
    ops = apply(p, put, {"/t/new": None, "/t": None})
    assert ops[0] == Create("/app/t", b"")
    kept = p.metas["/t"].meta
    assert kept is not None and kept.deleted and kept.placeholder
    assert kept.placeholder_czxid == 0  # not known before the create commits
    assert kept.vc == gone.vc and kept.ts == gone.ts
