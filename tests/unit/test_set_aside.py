"""A joining subtree sets aside the znodes it held unrecorded (``bridge.joining``).

No servers: the scan's result and the store's metadata cache are built by hand.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from bridge import joining, joinlist, startup, statecodec
from bridge.clock import HybridClock
from bridge.layout import Layout
from bridge.model import NodeMeta, VectorClock, content_hash
from bridge.plan import MetaEntry
from bridge.scan import ScanResult
from bridge.statecodec import MAX_REREAD_PATHS
from bridge.store import SubtreeStore
from bridge.zk import Create, Delete, Node, SetData, Stat


class NoWrites:
    """A capture that reaches ZooKeeper fails the test."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"unexpected ZooKeeper call: {name}")


MARKER = 10  # the joining marker's czxid: the copy's znodes were last written below it


def node(data: bytes, mzxid: int) -> Node:
    return Node(data, Stat(version=0, cversion=0, num_children=0, ephemeral=False,
                           czxid=mzxid, mzxid=mzxid))


def store(joining_: bool) -> SubtreeStore:
    s = SubtreeStore(NoWrites(), Layout("/zkbridge", "s", "/app"),  # type: ignore[arg-type]
                     region="r4", clock=HybridClock(lambda: 1), max_data_bytes=1 << 20)
    s.metas = {"/": MetaEntry(None, 0)}
    s.joining = {} if joining_ else None
    s.join_zxid = MARKER if joining_ else 0
    return s


def recorded(data: bytes) -> NodeMeta:
    return NodeMeta(vc=VectorClock.of({"r1": 1}), data_hash=content_hash(data), deleted=False,
                    writer="r1", ts=1)


def scan(**reads: Node) -> ScanResult:
    rels = {f"/{k}": v for k, v in reads.items()}
    return ScanResult(tuple(rels), len(rels), 0, 0, 0.1, tuple(rels),
                      {r: (n, 7) for r, n in rels.items()})


def test_a_subtree_not_joining_captures_everything_the_scan_found() -> None:
    s = store(False)
    assert joining.set_aside(s, scan(a=node(b"1", 5))) == {"/a"}
    assert not s.pre_join("/a", node(b"1", 5))


def test_the_first_scan_sets_aside_every_unrecorded_znode() -> None:
    s = store(True)
    s.metas["/changed"] = MetaEntry(recorded(b"before"), 0)  # a peer's version, then changed here
    now = joining.set_aside(s, scan(a=node(b"1", 5), b=node(b"2", 6), changed=node(b"x", 12)))
    assert now == {"/changed"}
    assert s.joining == {"/a": (node(b"1", 5), 7), "/b": (node(b"2", 6), 7)}
    assert s.pre_join("/a", node(b"1", 5))
    # Written here since the marker was made: an application's write.
    assert not s.pre_join("/a", node(b"1", 11))
    assert not s.pre_join("/a", None)
    # Once a peer's version is applied over it, it is recorded: no longer set aside.
    s.metas["/b"] = MetaEntry(recorded(b"2"), 0)
    assert not s.pre_join("/b", node(b"2", 6))


def test_a_later_scan_sets_aside_only_what_is_unchanged() -> None:
    """A rescan after a reconnect: /a is as the first scan read it, /b was written
    meanwhile, /c was created meanwhile (neither notified, the connection was down)."""
    s = store(True)
    joining.set_aside(s, scan(a=node(b"1", 5), b=node(b"2", 6)))
    now = joining.set_aside(s, scan(a=node(b"1", 5), b=node(b"3", 11), c=node(b"new", 12)))
    assert now == {"/b", "/c"}
    assert set(s.joining or {}) == {"/a"}


def test_the_capture_leaves_a_set_aside_znode_alone_and_takes_a_changed_one() -> None:
    """A capture that reads a set-aside znode (an audit's suspect, say) does not publish
    it; one written since the scan it does (it goes on to ZooKeeper, which this store
    refuses)."""
    s = store(True)
    joining.set_aside(s, scan(a=node(b"1", 5)))
    assert asyncio.run(s._capture({"/a": node(b"1", 5)})) == []
    assert s.unannounced({"/a": node(b"1", 5)}) == []  # an apply may write over it
    assert s.unannounced({"/a": node(b"2", 11)}) == ["/a"]  # not over a write made here
    with pytest.raises(AssertionError, match="unexpected ZooKeeper call"):
        asyncio.run(s._capture({"/a": node(b"2", 11)}))


def test_a_set_aside_znode_deleted_here_is_a_delete_to_publish() -> None:
    """An application deleted /a during the join: the apply must not bring a peer's
    version back first, and the capture publishes the delete (it goes on to
    ZooKeeper, which this store refuses). Once a peer's delete or version is
    recorded, the path is the apply's, not the application's."""
    s = store(True)
    joining.set_aside(s, scan(a=node(b"1", 5)))
    assert s.join_gone("/a", None) and not s.join_gone("/a", node(b"1", 5))
    assert s.unannounced({"/a": None}) == ["/a"]
    with pytest.raises(AssertionError, match="unexpected ZooKeeper call"):
        asyncio.run(s._capture({"/a": None}))
    assert not s.join_gone("/b", None)  # not part of the copy
    s.metas["/a"] = MetaEntry(NodeMeta(vc=VectorClock.of({"r1": 2}), data_hash=b"",
                                       deleted=True, writer="r1", ts=2), 0)
    assert not s.join_gone("/a", None) and s.unannounced({"/a": None}) == []


def test_a_recorded_znode_deleted_before_the_marker_is_set_aside() -> None:
    """Deleted while its path was excluded (its parent's pzxid, read after the listing
    that lacked it, is below the marker): a peer's version goes over its absence, and
    the delete is published only if none does. Above the marker, the delete may be an
    application's since: captured now, like a write made then."""
    s = store(True)
    for rel in ("/old", "/new", "/unknown"):
        s.metas[rel] = MetaEntry(recorded(b"v"), 0)
    result = ScanResult(("/old", "/new", "/unknown"), 0, 3, 3, 0.1, (), {},
                        {"/old": MARKER - 1, "/new": MARKER + 1})
    assert joining.set_aside(s, result) == {"/new", "/unknown"}
    assert s.joining == {"/old": None}
    assert s.pre_join("/old", None) and not s.join_gone("/old", None)
    assert s.unannounced({"/old": None}) == []  # a peer's version may be applied over it
    assert asyncio.run(s._capture({"/old": None})) == []  # not published during the join
    # A rescan after a reconnect, its bound moved past the marker by a sibling's create.
    later = ScanResult(("/old",), 0, 3, 1, 0.1, (), {}, {"/old": MARKER + 5})
    assert joining.set_aside(s, later) == set() and s.joining == {"/old": None}
    # Created again here since the marker: an application's write.
    assert not s.pre_join("/old", node(b"again", MARKER + 2))
    assert s.unannounced({"/old": node(b"again", MARKER + 2)}) == ["/old"]
    # A peer's version landed: the apply's, no longer set aside.
    s.metas["/old"] = MetaEntry(NodeMeta(vc=VectorClock.of({"r1": 2}),
                                         data_hash=content_hash(b"p"), deleted=False,
                                         writer="r1", ts=2), 0)
    assert not s.pre_join("/old", None)


def test_a_znode_of_the_join_s_list_gone_after_a_crash_is_a_delete_to_publish() -> None:
    """The join's first run set aside /a and /b and wrote them in its list, then died;
    an application deleted /a before the bridge was back. The next scan does not find
    /a: it is an application's delete, captured now (it goes on to ZooKeeper, which
    this store refuses), and the apply must not bring a peer's version back first."""
    s = store(True)
    s.join_held = frozenset({"/a", "/b"})
    assert joining.set_aside(s, scan(b=node(b"2", 5))) == {"/a"}
    assert s.join_gone("/a", None) and s.unannounced({"/a": None}) == ["/a"]
    with pytest.raises(AssertionError, match="unexpected ZooKeeper call"):
        asyncio.run(s._capture({"/a": None}))
    # A peer's version or delete recorded: the path is the apply's.
    s.metas["/a"] = MetaEntry(recorded(b"p"), 0)
    assert not s.join_gone("/a", None)
    assert joining.set_aside(s, scan(b=node(b"2", 5))) == set()  # not the list's to capture


def test_the_join_s_list_is_written_in_pieces_a_znode_can_hold() -> None:
    paths = [f"/p{i:06d}" for i in range(10_000)]
    pieces = list(joinlist.chunks(paths))
    assert [p for piece in pieces for p in piece] == paths
    assert all(len(piece) <= MAX_REREAD_PATHS for piece in pieces) and len(pieces) == 3
    long = [f"/{'x' * 100_000}{i}" for i in range(12)]
    pieces = list(joinlist.chunks(long))
    assert all(len(statecodec.encode_paths(piece)) < 1_000_000 for piece in pieces)
    assert [p for piece in pieces for p in piece] == long


def test_after_a_crash_a_write_made_while_the_bridge_was_down_is_not_taken_for_the_copy() -> None:
    """The join's bridge crashed; an application wrote /b and created /c before it
    started again. The new term's scan tells them from the copy by the marker's
    czxid, which outlived the crash: the scan's reads of the last term did not."""
    s = store(True)
    now = joining.set_aside(s, scan(a=node(b"1", 5), b=node(b"3", 14), c=node(b"new", 15)))
    assert now == {"/b", "/c"}
    assert set(s.joining or {}) == {"/a"}


def test_paths_included_again_set_aside_only_what_is_under_them() -> None:
    """A reload no longer excludes /tmp: what the region wrote there meanwhile is set
    aside, an unrecorded znode elsewhere (a create not captured yet) is not."""
    s = store(True)
    s.join_scope = ("/tmp",)
    now = joining.set_aside(s, scan(tmp=node(b"", 3), **{"tmp/a": node(b"1", 5)},
                                    tmpfile=node(b"x", 6)))
    assert now == {"/tmpfile"}
    assert set(s.joining or {}) == {"/tmp", "/tmp/a"}
    assert s.joins("/tmp/a") and not s.joins("/tmpfile") and not s.joins("/")


def test_a_recorded_znode_changed_while_excluded_is_set_aside_until_a_peer_s_version_lands(
) -> None:
    """/tmp/r was replicated before /tmp was excluded, then changed here while it was:
    set aside like an unrecorded one, not published as a change of its record. A
    peer's version applied over it (a new record) ends that; the same record
    with the content as the scan read it is still the region's to publish."""
    s = store(True)
    s.join_scope = ("/tmp",)
    s.metas["/tmp/r"] = MetaEntry(recorded(b"replicated"), 0)
    s.metas["/tmp/same"] = MetaEntry(recorded(b"same"), 0)
    now = joining.set_aside(s, scan(**{"tmp/r": node(b"changed here", 7),
                                       "tmp/same": node(b"same", 4)}))
    assert now == {"/tmp/same"}  # unchanged: nothing to publish, the capture sees that
    assert s.pre_join("/tmp/r", node(b"changed here", 7))
    assert s.unannounced({"/tmp/r": node(b"changed here", 7)}) == []  # an apply may write
    s.metas["/tmp/r"] = MetaEntry(NodeMeta(vc=VectorClock.of({"r1": 2}),
                                           data_hash=content_hash(b"peer's"), deleted=False,
                                           writer="r1", ts=2), 0)
    assert not s.untouched("/tmp/r") and not s.pre_join("/tmp/r", node(b"peer's", 12))


def test_a_path_joining_before_the_marker_was_widened_keeps_its_line() -> None:
    """/tmp began joining at zxid 10; the marker was made again at 20 for /etc (and
    /tmp/x, excluded apart until then). A write under /tmp at 15 is an application's,
    made since /tmp's join began; under /etc or /tmp/x it was made while excluded."""
    s = store(True)
    s.join_scope, s.join_zxid, s.join_lines = ("/etc", "/tmp", "/tmp/x"), 20, {"/tmp": MARKER}
    assert [s.join_line(r) for r in ("/tmp/a", "/etc/a", "/tmp/x/a", "/other")] == [
        MARKER, 20, 20, 20]
    assert not s.pre_join("/tmp/a", node(b"since", 15))
    assert s.pre_join("/tmp/a", node(b"before", 5))
    assert s.pre_join("/etc/a", node(b"while excluded", 15))
    assert s.pre_join("/tmp/x/a", node(b"while excluded", 15))
    s.metas["/tmp/d"] = MetaEntry(recorded(b"replicated"), 0)
    s.metas["/etc/d"] = MetaEntry(recorded(b"replicated"), 0)
    assert not s.gone_before("/tmp/d", 15) and s.gone_before("/etc/d", 15)


class MemZk:
    """The state's znodes in memory: what marking, the join's list and its drop do."""

    def __init__(self) -> None:
        self.nodes: dict[str, tuple[bytes, int]] = {}
        self.zxid = 0

    async def get(self, path: str) -> Node | None:
        n = self.nodes.get(path)
        return None if n is None else node(n[0], n[1])

    async def exists(self, path: str) -> Stat | None:
        n = await self.get(path)
        return None if n is None else n.stat

    async def children(self, path: str) -> list[str] | None:
        if path not in self.nodes:
            return None
        return [p[len(path) + 1:] for p in self.nodes
                if p.startswith(path + "/") and "/" not in p[len(path) + 1:]]

    async def read_all(self, ops: list[tuple[str, str]]) -> tuple[list[Node | None], list[int]]:
        return [await self.get(p) for _, p in ops], [0] * len(ops)

    async def multi(self, ops: list[object]) -> None:
        for op in ops:
            self.zxid += 1
            if isinstance(op, Create):
                self.nodes[op.path] = (op.data, self.zxid)
            elif isinstance(op, SetData):
                self.nodes[op.path] = (op.data, self.nodes[op.path][1])
            elif isinstance(op, Delete):
                del self.nodes[op.path]

    def under(self, path: str) -> set[str]:
        return {p for p in self.nodes if p.startswith(path + "/")}


def test_widening_the_marker_keeps_the_lines_of_the_paths_joining_already() -> None:
    zk = MemZk()
    s = SubtreeStore(zk, Layout("/zkbridge", "s", "/app"),  # type: ignore[arg-type]
                     region="r4", clock=HybridClock(lambda: 1), max_data_bytes=1 << 20)
    lay = s.layout
    asyncio.run(s.mark_joining(("/tmp",)))
    first = s.join_zxid
    assert (s.join_scope, s.join_lines) == (("/tmp",), {})
    assert s.join_list_line is None  # no list yet
    asyncio.run(s.mark_joining(("/etc",)))
    assert s.join_zxid > first
    assert statecodec.decode_marker(zk.nodes[lay.joining][0]) == (("/etc", "/tmp"),
                                                                  {"/tmp": first})
    assert (s.join_scope, s.join_lines) == (("/etc", "/tmp"), {"/tmp": first})
    made = zk.zxid
    asyncio.run(s.mark_joining(("/tmp",)))  # nothing new: not made again
    assert zk.zxid == made


def test_a_widened_join_adds_the_new_paths_to_its_list() -> None:
    """The join of /tmp wrote its list; /etc included since: the next scan's list has
    both (before, it kept the first, and a znode of /etc deleted while a crashed
    join's bridge was down left no trace)."""
    zk = MemZk()
    s = SubtreeStore(zk, Layout("/zkbridge", "s", "/app"),  # type: ignore[arg-type]
                     region="r4", clock=HybridClock(lambda: 1), max_data_bytes=1 << 20)
    lay = s.layout
    asyncio.run(s.mark_joining(("/tmp",)))
    assert s.joining is not None
    s.joining["/tmp/a"] = (node(b"1", 1), 7)
    asyncio.run(s.save_join_held())
    assert asyncio.run(joinlist.load(zk, lay)) == ({"/tmp/a"}, s.join_zxid)
    asyncio.run(s.mark_joining(("/etc",)))
    assert s.join_list_line != s.join_zxid
    s.joining["/etc/b"] = (node(b"2", 1), 7)
    asyncio.run(s.save_join_held())
    assert asyncio.run(joinlist.load(zk, lay)) == ({"/tmp/a", "/etc/b"}, s.join_zxid)
    assert s.join_list_line == s.join_zxid
    pieces = zk.under(lay.aside)
    asyncio.run(s.save_join_held())  # whole: not again
    assert zk.under(lay.aside) == pieces


def test_a_start_after_a_crash_between_widening_and_the_list_adds_to_it() -> None:
    """The marker was widened for /etc and the bridge killed before its scan: the
    next start reads a list whole for the marker before and adds /etc's znodes
    (before, nothing told it the list lacked them). A list a crash left unfinished
    keeps what it holds and is added to, not dropped."""
    zk = MemZk()
    lay = Layout("/zkbridge", "s", "/app")

    def fresh() -> SubtreeStore:
        return SubtreeStore(zk, lay,  # type: ignore[arg-type]
                            region="r4", clock=HybridClock(lambda: 1), max_data_bytes=1 << 20)

    s = fresh()
    asyncio.run(s.mark_joining(("/tmp",)))
    assert s.joining is not None
    s.joining["/tmp/a"] = (node(b"1", 1), 7)
    asyncio.run(s.save_join_held())
    asyncio.run(s.mark_joining(("/etc",)))  # killed here
    s = fresh()  # the next start: the marker holds /etc already, not widened again
    asyncio.run(s.mark_joining(("/etc",)))
    s.join_held, s.join_list_line = asyncio.run(joinlist.load(zk, lay))
    assert s.join_held == {"/tmp/a"} and s.join_list_line != s.join_zxid
    assert s.joining is not None
    s.joining["/etc/b"] = (node(b"2", 1), 7)
    asyncio.run(s.save_join_held())
    assert asyncio.run(joinlist.load(zk, lay)) == ({"/tmp/a", "/etc/b"}, s.join_zxid)
    # Unfinished (a crash before the list was marked whole): kept, and added to.
    zk.nodes[lay.aside] = (b"", zk.nodes[lay.aside][1])
    s = fresh()
    asyncio.run(s.mark_joining())
    s.join_held, s.join_list_line = asyncio.run(joinlist.load(zk, lay))
    assert s.join_held == {"/tmp/a", "/etc/b"} and s.join_list_line is None
    assert s.joining is not None
    s.joining["/etc/c"] = (node(b"3", 1), 7)
    asyncio.run(s.save_join_held())
    assert asyncio.run(joinlist.load(zk, lay)) == ({"/tmp/a", "/etc/b", "/etc/c"}, s.join_zxid)


def test_the_list_s_whole_mark_names_its_marker() -> None:
    assert joinlist.whole_for(joinlist.whole(0x1_0000_002A)) == 0x1_0000_002A
    for data in (b"", joinlist.WHOLE, b"whole:", b"whole:x1", b"half:12", b"\xff:1"):
        assert joinlist.whole_for(data) is None, data


def test_an_unreadable_list_is_dropped_and_no_list_is_made_for_nothing() -> None:
    zk = MemZk()
    lay = Layout("/zkbridge", "s", "/app")
    asyncio.run(joinlist.save(zk, lay, [], 5))
    assert lay.aside not in zk.nodes
    asyncio.run(joinlist.save(zk, lay, ["/a"], 5))
    zk.nodes[f"{lay.aside}/000000"] = (b"\xc1garbage", 1)
    assert asyncio.run(joinlist.load(zk, lay)) == (None, None)
    assert not zk.under(lay.aside) and lay.aside not in zk.nodes


def test_a_znode_of_an_included_path_is_told_from_its_read_before_any_scan() -> None:
    """A reload included /tmp; an apply (or a capture) meets /tmp/a before the rescan
    set it aside: it is the region's copy by its mzxid and record alone."""
    s = store(True)
    s.join_scope = ("/tmp",)
    assert s.pre_join("/tmp/a", node(b"old", 5))
    assert s.unannounced({"/tmp/a": node(b"old", 5)}) == []
    assert not s.pre_join("/tmp/a", node(b"new", 12))  # written since the marker
    assert not s.pre_join("/other", node(b"x", 5))  # not in what joins
    assert not s.join_gone("/tmp/b", None)  # never seen: nothing to publish


def test_after_a_first_scan_that_found_nothing_new_znodes_are_captured() -> None:
    """An empty mount joins; a znode an application creates during the join (seen by a
    rescan after a reconnect) is its write, not part of an old copy."""
    s = store(True)
    assert joining.set_aside(s, scan()) == set()
    assert joining.set_aside(s, scan(c=node(b"new", 12))) == {"/c"}
    assert s.joining == {}


def test_status_says_which_subtrees_join_while_catching_up() -> None:
    joined, joins = store(False), store(True)
    joining.set_aside(joins, scan(a=node(b"1", 5), b=node(b"2", 6)))
    inbound = SimpleNamespace(to_catch_up=lambda: 1200, catch_up_unknown=set(),
                              own_unsurveyed=set())
    bridge = SimpleNamespace(stores={"done": joined, "new": joins}, inbound=inbound,
                             region="r1", topic=lambda n, r: f"p.{n}.{r}")
    say = startup.catching_up(bridge)  # type: ignore[arg-type]
    assert say() == ("applying what peers published before this start: 1,200 records to go; "
                     "joining new (2 znodes held before)")
    inbound.catch_up_unknown = {("p.new.r2", 0)}  # a partition without a leader
    assert say() == ("applying what peers published before this start: 1,200 records to go, "
                     "and waiting for a leader of p.new.r2 partition 0; joining new (2 znodes "
                     "held before)")
    inbound.own_unsurveyed = {"done"}  # this region's own partition has none
    assert say() == ("applying what peers published before this start: 1,200 records to go, "
                     "and waiting for a leader of p.new.r2 partition 0, p.done.r1 (this "
                     "region's own: done publishes nothing until then); joining new (2 znodes "
                     "held before)")
