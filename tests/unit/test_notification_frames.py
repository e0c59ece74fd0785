"""The bookkeeping behind frame-numbered notifications (``Outbound``): no servers.

Capture closes a batch on the first frame a path was notified with since it
was taken; an apply settles a path only when its latest notification came
before the apply's reply. A path given back without frames is never settled.
"""

from __future__ import annotations

from bridge.outbound import Outbound
from bridge.store import needs_read
from tests.unit.test_outbox_feed import FakeBridge, FakeStore


def outbound() -> Outbound:
    return Outbound(FakeBridge(FakeStore({})))  # type: ignore[arg-type]


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


# -- closure of a capture over reads that took several replies ----------------
def test_a_path_never_read_must_be_read_if_notified_before_the_last_reply() -> None:
    assert needs_read([(5, 5)], None, 10)
    assert needs_read([None], None, 10)  # no frame: counts as before
    assert not needs_read([(12, 15)], None, 10)  # after: the next batch's


def test_a_path_read_by_the_last_reply_is_never_stale() -> None:
    assert not needs_read([(5, 15)], 10, 10)


def test_a_path_read_by_an_earlier_reply_is_stale_if_notified_in_between() -> None:
    # Read at frame 10, the batch's last reply at 20.
    assert needs_read([(12, 12)], 10, 20)
    assert needs_read([(3, 4), (15, 25)], 10, 20)
    assert not needs_read([(5, 9)], 10, 20)  # before its read: the read saw it
    assert not needs_read([(25, 30)], 10, 20)  # after the batch
    assert not needs_read([None], 10, 20)  # frameless: next batch, not stale
    # Notified before and after its read: whether in between is unknown, so it is.
    assert needs_read([(5, 25)], 10, 20)
