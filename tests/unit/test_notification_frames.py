"""The bookkeeping behind frame-numbered notifications: no servers.

``Outbound`` keeps each path's first and latest frame since it was taken; an
apply settles a path only when its latest notification came before the
apply's reply, and a path given back without frames is never settled.
``bridge.closure`` picks the read reply a capture's batch closes at.
"""

from __future__ import annotations

from bridge.closure import close, later
from bridge.outbound import Outbound
from tests.unit.test_outbox_feed import FakeBridge, FakeOutbox


def outbound() -> Outbound:
    return Outbound(FakeBridge(FakeOutbox({})))  # type: ignore[arg-type]


def test_taken_paths_carry_their_first_and_latest_frame() -> None:
    out = outbound()
    out.mark("s", "/a", 5)
    out.mark("s", "/a", 9)
    out.mark("s", "/b", 7)
    out.mark("s", "/c")  # a per-node watch: no frame
    assert out.take_framed("s") == {"/a": (5, 9), "/b": (7, 7), "/c": None}
    assert out.take_framed("s") == {}


def test_a_frameless_notification_makes_the_path_unknown() -> None:
    out = outbound()
    out.mark("s", "/a", 5)
    out.mark("s", "/a")
    out.mark("s", "/a", 8)  # still unknown: what the frameless one saw is not numbered
    assert out.take_framed("s") == {"/a": None}


def test_an_apply_settles_only_paths_notified_before_its_reply() -> None:
    out = outbound()
    out.mark("s", "/a", 5)
    out.mark("s", "/b", 6)
    out.mark("s", "/b", 12)  # a change after the apply's reply (frame 10)
    out.mark("s", "/c")
    out.mark("s", "/d", 4)  # notified, but not written by the apply
    out.settled("s", {"/a", "/b", "/c", "/x"}, 10)
    assert out.dirty["s"] == {"/b", "/c", "/d"}
    assert out.bridge.stats["own_notifications_settled:s"] == 1


def test_paths_given_back_are_never_settled() -> None:
    out = outbound()
    out.mark("s", "/a", 5)
    out.restore("s", set(out.take_framed("s")))
    out.mark("s", "/a", 6)
    out.settled("s", {"/a"}, 10)
    assert out.dirty["s"] == {"/a"}
    assert out.take_framed("s") == {"/a": None}


# -- where a capture's batch closes (bridge.closure) -----------------------------
def test_a_read_with_nothing_notified_closes_at_its_reply() -> None:
    found = close({"/a", "/b"}, {"/a": 10, "/b": 10}, {}, [10])
    assert found.snapshot == 10
    assert found.batch == {"/a", "/b"}


def test_a_path_notified_before_the_reply_and_not_read_is_read_next() -> None:
    seen = {"/c": [(5, 5)]}
    found = close({"/a"}, {"/a": 10}, seen, [10])
    assert found.snapshot is None
    assert found.unread == {"/c"}
    found = close({"/a"}, {"/a": 10, "/c": 20}, seen, [10, 20])
    assert (found.snapshot, found.batch) == (20, {"/a", "/c"})


def test_a_writer_that_keeps_going_does_not_keep_the_capture_chasing_it() -> None:
    # /c (changed before reply 10) was read at 20; meanwhile /d changed (frame 15)
    # and is not read: reply 20 cannot close, reply 10 can, and /d waits.
    seen = {"/c": [(5, 5)], "/d": [(15, 15)]}
    at = {"/a": 10, "/c": 20}
    found = close({"/a"}, at, seen, [10, 20])
    assert (found.snapshot, found.batch) == (10, {"/a", "/c"})
    assert later(found, {"/a"}, seen) == {"/d"}


def test_a_value_read_after_the_snapshot_counts_only_if_unchanged_in_between() -> None:
    seen = {"/c": [(5, 5), (15, 15)], "/d": [(16, 16)]}  # /c changed again at 15
    at = {"/a": 10, "/c": 20}
    found = close({"/a"}, at, seen, [10, 20])
    assert found.snapshot is None  # 20 lacks /d, 10 lacks /c's value at 10
    assert found.unread == {"/d"}


def test_a_path_read_by_an_earlier_reply_and_changed_before_the_last_is_read_again() -> None:
    # A read of many paths took two replies (8 and 10); /a changed at 9.
    seen = {"/a": [(9, 9)]}
    found = close({"/a", "/b"}, {"/a": 8, "/b": 10}, seen, [10])
    assert found.snapshot is None
    assert found.unread == {"/a"}
    found = close({"/a", "/b"}, {"/a": 20, "/b": 10}, seen, [10, 20])
    assert (found.snapshot, found.batch) == (20, {"/a", "/b"})


def test_notified_on_both_sides_of_an_interval_counts_as_inside_it() -> None:
    seen = {"/a": [(5, 25)]}  # first before the read at 10, latest after the snapshot
    assert close({"/a", "/b"}, {"/a": 10, "/b": 20}, seen, [20]).snapshot is None
    assert close({"/a"}, {"/a": 20}, seen, [20]).snapshot == 20  # read by the last reply


def test_paths_notified_after_the_snapshot_or_frameless_go_to_the_next_batch() -> None:
    seen = {"/a": [(25, 25)], "/b": [None]}
    found = close({"/a"}, {"/a": 20, "/b": 20}, seen, [20])
    assert found.snapshot == 20
    assert later(found, {"/a"}, seen) == {"/a", "/b"}


def test_nothing_read_and_only_later_notifications_closes_empty() -> None:
    found = close(set(), {}, {"/a": [(7, 7)]}, [])
    assert (found.snapshot, found.batch) == (0, frozenset())
    assert close(set(), {}, {"/a": [None]}, []).unread == {"/a"}
