"""Causal stability bookkeeping: what counts as applied, and the federation's minimum."""

from __future__ import annotations

from bridge.stability import EVERYTHING, Stability


def three() -> Stability:
    return Stability("r1", ("r2", "r3"))


def test_a_heartbeat_counts_only_once_applied_past() -> None:
    s = three()
    s.heard("r2", 0, offset=10, ts=500, applied=[("r1", 100), ("r3", 40)])
    s.passed("r2", 0, position=10)  # the record at 10 is not applied yet
    assert s.own == {}
    assert s.reports == {}
    s.passed("r2", 0, position=11)
    assert s.own == {"r2": 500}
    assert s.reports == {"r2": {"r1": 100, "r3": 40}}


def test_stable_is_the_minimum_over_every_other_region() -> None:
    s = three()
    # r1 itself has applied r2 through 300 and r3 through 200.
    s.heard("r2", 0, 5, 300, [("r1", 900), ("r3", 250)])
    s.heard("r3", 0, 7, 200, [("r1", 700), ("r2", 120)])
    s.passed("r2", 0, 6)
    s.passed("r3", 0, 8)
    # r1's own stream: r2 says 900, r3 says 700.
    assert s.stable("r1") == 700
    # r2's stream: r1 applied through 300, r3 through 120.
    assert s.stable("r2") == 120
    # r3's stream: r1 through 200, r2 through 250.
    assert s.stable("r3") == 200


def test_a_region_that_never_reported_keeps_everything_unstable() -> None:
    s = three()
    s.heard("r2", 0, 5, 300, [("r1", 900)])
    s.passed("r2", 0, 6)
    assert s.stable("r1") is None  # r3 said nothing yet
    assert s.stable("r2") is None  # nor about r2
    # Status names who is awaited (a region down, or a name in peers nobody runs).
    assert s.unreported("r1") == ("r3",)
    assert s.unreported("r2") == ("r3",)
    assert s.unreported("r3") == ("r1", "r2")  # r1 has not applied r3, r2 not said


def test_a_silent_region_holds_the_minimum_where_it_was() -> None:
    s = Stability("r1", ("r2",))
    s.heard("r2", 0, 1, 100, [("r1", 50)])
    s.passed("r2", 0, 2)
    assert s.stable("r1") == 50
    # r2 goes quiet (stopped, partitioned): r1 writes on, nothing moves.
    assert s.stable("r1") == 50
    s.heard("r2", 0, 9, 400, [("r1", 350)])
    s.passed("r2", 0, 10)
    assert s.stable("r1") == 350


def test_reports_never_go_back() -> None:
    s = Stability("r1", ("r2",))
    s.heard("r2", 0, 1, 100, [("r1", 80)])
    s.passed("r2", 0, 2)
    # Re-read after a rewind: older heartbeats again, at lower offsets.
    s.heard("r2", 0, 0, 90, [("r1", 60)])
    s.passed("r2", 0, 1)
    assert s.stable("r1") == 80
    assert s.own["r2"] == 100


def test_a_rewind_drops_heartbeats_not_yet_counted() -> None:
    s = Stability("r1", ("r2",))
    s.heard("r2", 0, 50, 500, [("r1", 450)])
    # The topic was re-created: offsets start again below the pending one.
    s.heard("r2", 0, 3, 510, [("r1", 460)])
    s.passed("r2", 0, 4)
    assert s.own == {"r2": 510}
    assert s.stable("r1") == 460
    s.forget_pending()
    s.heard("r2", 0, 8, 600, [])
    s.forget_pending("r2")
    s.passed("r2", 0, 100)
    assert s.own == {"r2": 510}


def test_report_names_peers_only() -> None:
    s = Stability("r1", ("r2",))
    s.heard("r2", 0, 1, 100, [])
    s.passed("r2", 0, 2)
    assert s.report() == (("r2", 100),)


def test_unknown_origins_are_never_stable_and_a_lone_region_needs_nobody() -> None:
    assert three().stable("gone") is None
    assert Stability("solo", ()).stable("solo") == EVERYTHING
