"""A capture's next piece is planned (and its ACLs read) while the piece before it is
being written.

No servers. The metadata a piece writes is committed to the cache only once
its ``multi`` answered, so the next piece, planned meanwhile, must see it
through ``before``: a directory created by the first piece is not created
again, and a path it wrote is updated at the version that write leaves.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from bridge import capture
from bridge.acl import AclPolicy
from bridge.clock import HybridClock
from bridge.errors import NoPermission, ZooKeeperError
from bridge.layout import Layout
from bridge.model import NodeMeta, Op, VectorClock, content_hash
from bridge.plan import CapturedBatch, MetaEntry, NeedRead, Plan, Planner
from bridge.store import SubtreeStore
from bridge.zk import WORLD_ALL, AclRead, Create, Delete, Node, SetData, Stat


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


class Commits:
    """A ZooKeeper stand-in that records the ``multi``s it is given."""

    def __init__(self) -> None:
        self.commits: list[list[object]] = []

    async def commit(self, ops: list[object]) -> tuple[list[object], int]:
        self.commits.append(list(ops))
        return [*([None] * (len(ops) - 1)), "/zkbridge/s/outbox/q-0000000000/b-0000000000"], 1

    async def children(self, path: str) -> list[str]:
        return []

    async def exists(self, path: str) -> None:
        return None

    async def get_acls_many(self, paths: list[str]) -> list[AclRead]:
        return [AclRead(WORLD_ALL, 0, 1)] * len(paths)


def placeholder_store(zk: object) -> SubtreeStore:
    """/p: a tombstoned placeholder the bridge kept (znode czxid 5) for children that
    were never in the metadata (an application's ephemeral znodes)."""
    store = SubtreeStore(zk, Layout("/zkbridge", "s", "/app"),  # type: ignore[arg-type]
                         region="r1", clock=HybridClock(lambda: 1), max_data_bytes=1 << 20)
    store.metas = {"/": MetaEntry(None, 0),
                   "/p": MetaEntry(replace(meta(1), deleted=True, placeholder=True,
                                           placeholder_czxid=5), 3)}
    return store


def empty_node(czxid: int) -> Node:
    return Node(b"", Stat(version=1, cversion=2, num_children=0, ephemeral=False, czxid=czxid,
                          mzxid=czxid, pzxid=9))


def test_a_placeholder_left_empty_by_an_ephemeral_child_is_removed_and_stays_deleted() -> None:
    zk = Commits()
    store = placeholder_store(zk)
    assert asyncio.run(store._capture({"/p": empty_node(5)})) == []
    [[delete, unmark]] = zk.commits  # no outbox entry
    assert delete == Delete("/app/p", 1)
    assert isinstance(unmark, SetData) and unmark.version == 3
    left = store.metas["/p"].meta
    assert left is not None and left.deleted
    # Whether a delete left a placeholder depends on each region's children then;
    # once the znode is gone, the tombstone must not say so (seed 6514's difference).
    assert not left.placeholder and left.placeholder_czxid == 0
    assert left.vc == meta(1).vc


def test_a_placeholder_the_application_deleted_itself_is_unmarked() -> None:
    zk = Commits()
    store = placeholder_store(zk)
    assert asyncio.run(store._capture({"/p": None})) == []
    [[unmark]] = zk.commits
    assert isinstance(unmark, SetData) and unmark.path == store.layout.meta("/p")
    left = store.metas["/p"].meta
    assert left is not None and left.deleted and not left.placeholder


def test_an_absent_tombstone_not_a_placeholder_writes_nothing() -> None:
    store = placeholder_store(NoWrites())
    store.metas["/p"] = MetaEntry(replace(meta(1), deleted=True), 3)
    assert asyncio.run(store._capture({"/p": None})) == []


def test_an_empty_znode_created_anew_over_a_placeholders_tombstone_is_a_write() -> None:
    zk = Commits()
    store = placeholder_store(zk)
    [batch] = asyncio.run(store._capture({"/p": empty_node(8)}))
    assert [(e.op, e.path) for e in batch.events] == [(Op.PUT, "/p")]
    assert not any(isinstance(op, Delete) for op in zk.commits[0])


def test_the_child_that_goes_has_its_placeholder_parent_read() -> None:
    store = placeholder_store(NoWrites())
    with pytest.raises(NeedRead) as info:
        asyncio.run(store._capture({"/p/eph": None}))
    assert info.value.rels == {"/p"}


class Pieces:
    """A ZooKeeper stand-in for a capture cut into pieces: it logs the ``multi``s and ACL
    reads in the order they happen; the second group's ACLs come only when released."""

    def __init__(self, fail_second_group: bool = False) -> None:
        self.log: list[str] = []
        self.release = asyncio.Event()
        self.fail = fail_second_group
        self.groups = 0
        self.connected = True

    async def children(self, path: str) -> list[str]:
        return []

    async def exists(self, path: str) -> None:
        return None

    async def sync(self, path: str) -> None:
        self.log.append("sync")

    async def ensure_path(self, path: str) -> None:
        self.log.append(f"mark {path}")

    async def commit(self, ops: list[object]) -> tuple[list[object], int]:
        n = len([x for x in self.log if x.startswith("multi")])
        entry = any("/outbox/" in getattr(op, "path", "") for op in ops)
        self.log.append(f"multi{n + 1}" + ("" if entry else " without an entry"))
        self.release.set()
        return [*([None] * (len(ops) - 1)), f"/zkbridge/s/outbox/q-0000000000/b-{n:010d}"], 1

    async def get_acls_many(self, paths: list[str]) -> list[AclRead]:
        self.groups += 1
        group = self.groups
        if group == 2:
            await self.release.wait()
            if self.fail:
                raise ZooKeeperError("connection loss")
        self.log.append(f"acl{group}")
        return [AclRead(WORLD_ALL, 0, 1)] * len(paths)


def large_capture(monkeypatch: pytest.MonkeyPatch, zk: Pieces
                  ) -> tuple[SubtreeStore, dict[str, Node | NoPermission | None]]:
    monkeypatch.setattr(capture, "ACL_GROUP", 2)
    store = SubtreeStore(zk, Layout("/zkbridge", "s", "/app"),  # type: ignore[arg-type]
                         region="r1", clock=HybridClock(lambda: 1), max_data_bytes=1 << 20)
    store.acl_reader = zk  # type: ignore[assignment]
    store.metas = {"/": MetaEntry(None, 0)}
    reads: dict[str, Node | NoPermission | None] = {
        f"/n{i}": Node(b"v", Stat(version=0, cversion=0, num_children=0, ephemeral=False,
                                  czxid=10 + i, mzxid=10 + i)) for i in range(6)}
    return store, reads


def test_a_piece_goes_before_the_next_pieces_acls_are_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without local deletes no piece carries a cleanup, so none waits to know whether
    it is the last: the next one's ACL reads overlap its multi."""
    zk = Pieces()
    store, reads = large_capture(monkeypatch, zk)
    batches: list[object] = []
    asyncio.run(asyncio.wait_for(store._capture(reads, batches.append), 10))
    assert zk.log[0] == "sync"  # the second session, before its first ACL read
    assert zk.log.index("multi1") < zk.log.index("acl2")  # (acl3 is read ahead: no wait)
    assert [x for x in zk.log if x.startswith("multi")] == ["multi1", "multi2", "multi3"]
    assert len(batches) == 3


def test_acls_that_fail_after_a_piece_went_leave_that_piece_recorded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The piece in flight committed: it is handed on (to be queued in order) before the
    error ends the capture, which is then made again."""
    zk = Pieces(fail_second_group=True)
    store, reads = large_capture(monkeypatch, zk)
    batches: list[CapturedBatch] = []
    with pytest.raises(ZooKeeperError):
        asyncio.run(asyncio.wait_for(store._capture(reads, batches.append), 10))
    assert [x for x in zk.log if x.startswith("multi")] == ["multi1"]
    assert [e.path for b in batches for e in b.events] == ["/n0", "/n1"]
    assert set(store.metas) == {"/", "/n0", "/n1"}  # committed to the cache


def test_a_large_capture_whose_acls_are_known_reads_none_and_asks_no_sync(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Updates to znodes whose ACLs were read before: nothing to read, so no ``sync`` on
    the second session either. Under a writer's burst that round trip waited behind its
    writes (100 ms once, traced in `scripts/bench`'s steady phase). Still in pieces."""
    zk = Pieces()
    store, reads = large_capture(monkeypatch, zk)
    for rel, node in reads.items():
        assert isinstance(node, Node)
        store.acl._seen[rel] = AclRead(WORLD_ALL, node.stat.aversion, node.stat.czxid)
    batches: list[CapturedBatch] = []
    asyncio.run(asyncio.wait_for(store._capture(reads, batches.append), 10))
    assert zk.log == ["multi1", "multi2", "multi3"]
    assert [[e.path for e in b.events] for b in batches] == [
        ["/n0", "/n1"], ["/n2", "/n3"], ["/n4", "/n5"]]


def test_one_unknown_acl_still_reads_on_the_second_session_after_a_sync(
        monkeypatch: pytest.MonkeyPatch) -> None:
    zk = Pieces()
    store, reads = large_capture(monkeypatch, zk)
    for rel, node in reads.items():
        assert isinstance(node, Node)
        if rel != "/n5":  # the last one's ACL was never read
            store.acl._seen[rel] = AclRead(WORLD_ALL, node.stat.aversion, node.stat.czxid)
    asyncio.run(asyncio.wait_for(store._capture(reads, lambda _: None), 10))
    assert zk.log[0] == "sync"
    assert zk.groups == 1  # one read, the group holding /n5


def test_pieces_after_the_outbox_overflowed_write_no_entry_and_the_marker_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first piece's entry takes the outbox to its bound (``Overflow`` sets
    ``store.overflow`` when it is queued): the later pieces update only the metadata,
    after the marker that tells a restart to publish the whole state again."""
    zk = Pieces()
    store, reads = large_capture(monkeypatch, zk)
    batches: list[CapturedBatch] = []

    def queued(batch: CapturedBatch) -> None:
        batches.append(batch)
        store.overflow = "/zkbridge/overflow/s"

    asyncio.run(asyncio.wait_for(store._capture(reads, queued), 10))
    assert [x for x in zk.log if not x.startswith(("acl", "sync"))] == [
        "multi1", "mark /zkbridge/overflow/s", "multi2 without an entry",
        "multi3 without an entry"]
    assert [b.outbox_path is None for b in batches] == [False, True, True]
    assert set(store.metas) == {"/", *reads}  # every piece's metadata committed
