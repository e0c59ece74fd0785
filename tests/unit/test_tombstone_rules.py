"""Which tombstones a collection round takes, and what metadata goes with them."""

from __future__ import annotations

from bridge import tombstones
from bridge.model import NodeMeta, VectorClock
from bridge.plan import MetaEntry


def tomb(ts: int, writer: str = "r1", **vc: int) -> MetaEntry:
    return MetaEntry(NodeMeta(vc=VectorClock.of(vc or {writer: 1}), data_hash=b"",
                              deleted=True, writer=writer, ts=ts), 3)


def live(ts: int) -> MetaEntry:
    return MetaEntry(NodeMeta(vc=VectorClock.of({"r1": 1}), data_hash=b"x", deleted=False,
                              writer="r1", ts=ts), 1)


BARE = MetaEntry(None, 0)


def test_only_stable_old_idle_tombstones_are_candidates() -> None:
    metas = {"/": BARE, "/a": tomb(10), "/b": tomb(10, "r2"), "/c": tomb(50), "/d": live(1),
             "/e": tomb(10), "/f": tomb(10, "gone")}
    stable = {"r1": 40, "r2": 5}
    got = tombstones.candidates(metas, stable=stable.get, before_ts=30, busy={"/e"})
    # /b: r2's stream is stable only below 5; /c: too young; /d: alive; /e: pending;
    # /f: its writer is outside the federation (never stable).
    assert got == ["/a"]


def test_a_delete_exactly_at_the_stable_stamp_waits() -> None:
    metas = {"/a": tomb(40)}
    assert tombstones.candidates(metas, stable={"r1": 40}.get, before_ts=99, busy=()) == []
    assert tombstones.candidates(metas, stable={"r1": 41}.get, before_ts=99, busy=()) == ["/a"]


def test_children_go_first_and_empty_directories_with_them() -> None:
    metas = {"/": BARE, "/q": BARE, "/q/x": BARE, "/q/x/1": tomb(1), "/q/x/2": tomb(1),
             "/p": tomb(1), "/p/child": live(1)}
    out = tombstones.removable(metas, ["/q/x/1", "/q/x/2", "/p"])
    assert out == ["/q/x/1", "/q/x/2", "/q/x", "/q"]  # /p keeps a live child
    assert tombstones.removable(metas, ["/q/x/1"]) == ["/q/x/1"]


def test_a_tombstone_parent_goes_with_its_tombstone_children() -> None:
    metas = {"/": BARE, "/a": tomb(1), "/a/b": tomb(1)}
    assert tombstones.removable(metas, ["/a", "/a/b"]) == ["/a/b", "/a"]


def test_the_floor_is_the_largest_own_counter_forgotten() -> None:
    metas = {"/a": tomb(1, r1=4, r2=9), "/b": tomb(1, r1=7), "/c": BARE}
    assert tombstones.floor_after(metas, ["/a", "/b", "/c"], "r1", 0) == 7
    assert tombstones.floor_after(metas, ["/a"], "r2", 12) == 12
