"""The bookkeeping behind frame-numbered notifications (``Outbound``): no servers.

Capture closes a batch on the first frame a path was notified with since it
was taken; an apply settles a path only when its latest notification came
before the apply's reply. A path given back without frames is never settled.
"""

from __future__ import annotations

from bridge.outbound import Outbound
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
