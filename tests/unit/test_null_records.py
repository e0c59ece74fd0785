"""Null-value records for collected tombstones: what goes out, and the receiver's rule.

No servers: the outbox entry's format (and what an older bridge makes of
it), the assembler's handling of a null between batches, and the planner's
rule that a null's collected delete applies only over a live version it
wins against.
"""

from __future__ import annotations

from bridge import codec, statecodec, tombstones
from bridge.acl import AclPolicy
from bridge.batching import Assembler, stamp
from bridge.clock import HybridClock
from bridge.layout import Layout
from bridge.model import Event, NodeMeta, Op, VectorClock, content_hash
from bridge.plan import MetaEntry, Outcome, Planner
from bridge.zk import Delete, Node, SetData, Stat

MOUNT = "/app"


def delete(path: str, writer: str = "r1", ts: int = 100, **vc: int) -> Event:
    return Event(origin="r2", subtree="s", path=path, op=Op.DELETE,
                 vc=VectorClock.of(vc or {writer: 2}), ts=ts, writer=writer)


def meta(*, deleted: bool, writer: str = "r1", ts: int = 50, data: bytes | None = b"x",
         **vc: int) -> MetaEntry:
    return MetaEntry(NodeMeta(vc=VectorClock.of(vc or {writer: 1}),
                              data_hash=content_hash(None if deleted else data),
                              deleted=deleted, writer=writer, ts=ts), 4)


class FakePlanner(Planner):
    def __init__(self, metas: dict[str, MetaEntry]) -> None:
        self.layout = Layout("/zkbridge", "s", MOUNT)
        self.clock = HybridClock(lambda: 1)
        self.max_data_bytes = 1 << 20
        self.exclude = ()
        self.acl = AclPolicy("copy", None)
        self.metas = {"/": MetaEntry(None, 0), **metas}
        self.oversized = {}
        self.held_back = {}
        self.held_events = {}


def node(data: bytes, version: int = 7, children: int = 0) -> Node:
    return Node(data, Stat(version=version, cversion=0, num_children=children, ephemeral=False,
                           czxid=1, mzxid=1))


# -- what a collection publishes -----------------------------------------------


def test_null_events_carry_the_collected_tombstones_unchanged() -> None:
    metas = {"/a": meta(deleted=True, writer="r3", ts=77, r3=5, r1=2), "/dir": MetaEntry(None, 1),
             "/b": meta(deleted=False)}
    out = tombstones.null_events(metas, ["/a", "/dir", "/b"], origin="r1", subtree="s")
    assert out == [Event(origin="r1", subtree="s", path="/a", op=Op.DELETE,
                         vc=VectorClock.of({"r3": 5, "r1": 2}), ts=77, writer="r3")]


def test_a_null_outbox_entry_is_read_by_an_older_bridge_as_a_plain_delete() -> None:
    events = [delete("/a"), delete("/b/c", writer="r3", r3=4)]
    raw = statecodec.encode_null_entry(events)
    payloads = statecodec.decode_outbox(raw)
    # What a release before null records does with the entry: decode each
    # payload as an event (the unknown marker is ignored) and publish it.
    assert [codec.decode(p) for p in payloads] == events
    assert all(statecodec.is_null_entry(p) for p in payloads)
    assert not statecodec.is_null_entry(codec.encode(events[0]))
    assert not statecodec.is_null_entry(b"\xc1garbage")


# -- the receiver: stream order ------------------------------------------------


def test_a_null_closes_no_batch_it_is_not_part_of_and_comes_out_marked() -> None:
    asm = Assembler(10)
    put = Event(origin="r2", subtree="s", path="/a", op=Op.PUT, vc=VectorClock.of({"r2": 1}),
                ts=5, writer="r2", data=b"v")
    batch = stamp([put, put], 99)
    assert asm.feed(10, batch[0]) == []
    assert [c.events for c in asm.feed(11, batch[1])] == [tuple(batch)]
    done = asm.feed(12, delete("/a"), null=True)
    assert len(done) == 1 and done[0].null and done[0].end_offset == 13
    assert asm.resume_offset == 13


def test_a_null_after_compaction_gap_releases_the_gappy_batch_first() -> None:
    asm = Assembler(0)
    put = Event(origin="r2", subtree="s", path="/a", op=Op.PUT, vc=VectorClock.of({"r2": 1}),
                ts=5, writer="r2", data=b"v")
    first = stamp([put, put, put], 7)
    assert asm.feed(0, first[0]) == []
    # Offsets 1-2 were compacted away; the null at 5 shows the batch is over.
    done = asm.feed(5, delete("/b"), null=True)
    assert [c.null for c in done] == [False, True]
    assert done[0].events == (first[0],)


# -- the receiver: the rule --------------------------------------------------------


def test_a_null_over_an_absent_or_deleted_path_is_a_no_op() -> None:
    planner = FakePlanner({"/gone": meta(deleted=True, r1=2)})
    events = [delete("/never"), delete("/gone")]
    reads: dict[str, Node | None] = {"/never": None, "/gone": None}
    plan, applied = planner._plan_apply(events, dict(reads), frozenset({0, 1}))
    assert plan.ops == []
    assert [o for _, o in applied.outcomes] == [Outcome.SKIPPED, Outcome.SKIPPED]


def test_without_the_null_mark_the_same_delete_would_recreate_a_tombstone() -> None:
    # Why the rule exists: a region that collected the path already must not
    # get the tombstone back (it would collect it again, and null it again).
    planner = FakePlanner({})
    plan, applied = planner._plan_apply([delete("/never")], {"/never": None})
    assert [o for _, o in applied.outcomes] == [Outcome.APPLIED]
    assert plan.metas["/never"].meta is not None


def test_a_null_removes_a_stale_live_version_it_wins_against() -> None:
    # A region that bootstrapped read another topic's old put after the
    # delete's own record was compacted away: the null's delete dominates it.
    planner = FakePlanner({"/k": meta(deleted=False, writer="r3", r3=1)})
    d = delete("/k", writer="r1", ts=100, r3=1, r1=1)
    plan, applied = planner._plan_apply([d], {"/k": node(b"x")}, frozenset({0}))
    assert [o for _, o in applied.outcomes] == [Outcome.APPLIED]
    assert isinstance(plan.ops[0], Delete) and plan.ops[0].path == f"{MOUNT}/k"
    left = plan.metas["/k"].meta
    assert left is not None and left.deleted and left.vc == d.vc  # collected later, as usual


def test_a_null_never_removes_a_version_written_after_the_delete() -> None:
    # A new write after the collection starts above the floor and is stamped
    # later (tombstone_grace > max_clock_skew): it wins, the null is a no-op.
    planner = FakePlanner({"/k": meta(deleted=False, writer="r2", ts=500, r2=9)})
    d = delete("/k", writer="r1", ts=100, r1=3)
    plan, applied = planner._plan_apply([d], {"/k": node(b"x")}, frozenset({0}))
    # Not even the merged clock a lost conflict leaves: the regions that
    # collected the delete never see this conflict, and their clocks would differ.
    assert applied.outcomes[0][1] is Outcome.SKIPPED and plan.ops == []
    assert applied.conflicts == ()
    dominated = FakePlanner({"/k": meta(deleted=False, writer="r2", ts=500, r1=3, r2=1)})
    plan, applied = dominated._plan_apply([d], {"/k": node(b"x")}, frozenset({0}))
    assert applied.outcomes[0][1] is Outcome.SKIPPED and plan.ops == []


def test_a_null_beats_a_concurrent_older_version_by_the_usual_rule() -> None:
    planner = FakePlanner({"/k": meta(deleted=False, writer="r3", ts=40, r3=2)})
    d = delete("/k", writer="r1", ts=100, r3=1, r1=1)
    plan, applied = planner._plan_apply([d], {"/k": node(b"x")}, frozenset({0}))
    assert applied.outcomes[0][1] is Outcome.CONFLICT_REMOTE
    left = plan.metas["/k"].meta
    assert left is not None and left.deleted and left.vc == VectorClock.of({"r3": 2, "r1": 1})


def test_a_null_over_a_node_with_live_children_leaves_a_deleted_placeholder() -> None:
    planner = FakePlanner({"/k": meta(deleted=False, writer="r3", r3=1),
                           "/k/c": meta(deleted=False, writer="r2", r2=1)})
    d = delete("/k", writer="r1", ts=100, r3=1, r1=1)
    plan, applied = planner._plan_apply([d], {"/k": node(b"x", children=1)}, frozenset({0}))
    assert applied.outcomes[0][1] is Outcome.APPLIED
    assert next(op for op in plan.ops if isinstance(op, SetData | Delete)) == SetData(
        f"{MOUNT}/k", b"", 7)
    left = plan.metas["/k"].meta
    assert left is not None and left.deleted and left.placeholder
    assert left.placeholder_czxid == 1  # the znode kept: a leftover is told by it


def test_a_null_after_a_put_of_the_same_batch_group_sees_that_put() -> None:
    # Stream order inside one apply multi: the peer's put first, its null after.
    planner = FakePlanner({})
    put = Event(origin="r2", subtree="s", path="/k", op=Op.PUT,
                vc=VectorClock.of({"r2": 1}), ts=40, writer="r2", data=b"old")
    d = delete("/k", writer="r1", ts=100, r2=1, r1=1)
    plan, applied = planner._plan_apply([put, d], {"/k": None}, frozenset({1}))
    assert [o for _, o in applied.outcomes] == [Outcome.APPLIED, Outcome.APPLIED]
    left = plan.metas["/k"].meta
    assert left is not None and left.deleted
