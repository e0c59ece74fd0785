"""The fault campaign's pure parts: the seeded schedule and the lost-write checker's rules."""

from __future__ import annotations

from bridge.clock import hlc_from_ms
from tests.chaos.checkers import Snapshot, check_lost_writes
from tests.chaos.nemesis import INCLUDES, KINDS_ALL, Excluded, schedule
from tests.chaos.workload import History, Op


def _op(region: str, path: str, value: str | None, outcome: str = "ok", t: float = 1.0) -> Op:
    return Op(region, path, "put" if value is not None else "delete", value, outcome, None,
              t, t + 0.01, "test")


def _snap(data: dict[str, bytes], meta: dict[str, dict[str, object]] | None = None) -> Snapshot:
    return Snapshot(data=data, children={}, ephemerals=[], meta=dict(meta or {}))


def _history(*ops: Op) -> History:
    h = History()
    for o in ops:
        h.add(o)
    return h


def test_schedule_is_a_function_of_the_seed() -> None:
    assert schedule(7, 60, KINDS_ALL) == schedule(7, 60, KINDS_ALL)
    assert schedule(7, 60, KINDS_ALL) != schedule(8, 60, KINDS_ALL)
    faults = schedule(7, 60, KINDS_ALL)
    assert all(0 < f.at < 60 for f in faults)
    assert all(f.kind in KINDS_ALL for f in faults)


def test_single_writer_path_must_end_at_its_last_acknowledged_write() -> None:
    h = _history(_op("r1", "/r1/k", "r1:1"), _op("r1", "/r1/k", "r1:2"))
    assert check_lost_writes(h, _snap({"/r1/k": b"r1:2"})).passed
    lost = check_lost_writes(h, _snap({"/r1/k": b"r1:1"}))
    assert not lost.passed and "/r1/k" in lost.details[0]


def test_unknown_outcome_allows_either_value_and_refusals_change_nothing() -> None:
    h = _history(_op("r1", "/r1/k", "r1:1"), _op("r1", "/r1/k", None, "unknown"),
                 _op("r1", "/r1/k", "r1:3", "fail"))
    assert check_lost_writes(h, _snap({"/r1/k": b"r1:1"})).passed
    assert check_lost_writes(h, _snap({})).passed
    assert not check_lost_writes(h, _snap({"/r1/k": b"r1:3"})).passed


def test_a_path_whose_only_writes_are_unknown_may_keep_its_earlier_state() -> None:
    # Seen in seed 632105: a create whose answer was lost never happened.
    h = _history(_op("r3", "/r3/d62", "r3:300", "unknown"))
    assert check_lost_writes(h, _snap({})).passed
    assert check_lost_writes(h, _snap({"/r3/d62": b"r3:300"})).passed


def test_contended_path_winner_must_be_consistent_with_lww() -> None:
    h = _history(_op("r1", "/shared/c", "r1:1", t=100.0), _op("r2", "/shared/c", "r2:1", t=200.0))
    late = {"/shared/c": {"w": "r2", "ts": hlc_from_ms(200_500)}}
    assert check_lost_writes(h, _snap({"/shared/c": b"r2:1"}, late)).passed
    # r1's write won with a timestamp older than r2's acknowledged write: not LWW.
    early = {"/shared/c": {"w": "r1", "ts": hlc_from_ms(100_500)}}
    assert not check_lost_writes(h, _snap({"/shared/c": b"r1:1"}, early)).passed
    # A value nobody wrote last.
    assert not check_lost_writes(h, _snap({"/shared/c": b"r3:9"}, late)).passed


def test_a_contended_write_held_while_excluded_may_lose_only_to_a_peer_s_version_since() -> None:
    # r2 excluded /shared from t=1000 until its include took effect at t=1100.
    held = [Excluded("r2", "/shared", 1000.0, 1100.0)]
    h = _history(_op("r1", "/shared/c", "r1:1", t=1050.0), _op("r2", "/shared/c", "r2:1", t=1060.0))
    r1_won = {"/shared/c": {"w": "r1", "ts": hlc_from_ms(1_050_500)}}
    # r2's later write was held: r1's version since the exclude goes over it.
    assert check_lost_writes(h, _snap({"/shared/c": b"r1:1"}, r1_won), excluded=held).passed
    assert not check_lost_writes(h, _snap({"/shared/c": b"r1:1"}, r1_won)).passed
    # Held, it may not lose to a version from well before the exclude.
    old = _history(_op("r1", "/shared/c", "r1:1", t=900.0),
                   _op("r2", "/shared/c", "r2:1", t=1060.0))
    r1_old = {"/shared/c": {"w": "r1", "ts": hlc_from_ms(900_500)}}
    lost = check_lost_writes(old, _snap({"/shared/c": b"r1:1"}, r1_old), excluded=held)
    assert not lost.passed and "before the exclude" in lost.details[0]
    # After the include took effect, a write is compared as any other.
    after = _history(_op("r1", "/shared/c", "r1:1", t=1050.0),
                     _op("r2", "/shared/c", "r2:1", t=1200.0))
    assert not check_lost_writes(after, _snap({"/shared/c": b"r1:1"}, r1_won),
                                 excluded=held).passed


def test_a_single_writer_path_excluded_for_a_while_still_ends_at_its_last_write() -> None:
    held = [Excluded("r2", "/r2", 1000.0, None)]
    h = _history(_op("r2", "/r2/k", "r2:1", t=990.0), _op("r2", "/r2/k", "r2:2", t=1010.0))
    assert check_lost_writes(h, _snap({"/r2/k": b"r2:2"}), excluded=held).passed
    assert not check_lost_writes(h, _snap({"/r2/k": b"r2:1"}), excluded=held).passed


def test_an_exclude_fault_names_a_path_of_the_workload() -> None:
    faults = [f for seed in range(40) for f in schedule(seed, 120, ("exclude",))]
    assert faults and all(f.kind == "exclude" for f in faults)
    assert {f.detail.split(" ", 1)[0] for f in faults} >= {"/shared", "/r1", "/r2", "/r3"}
    assert {f.detail.split(" ", 1)[1] for f in faults} == set(INCLUDES)
    assert all(8.0 <= f.duration <= 20.0 for f in faults)


def test_the_summary_counts_held_writes_that_took_a_peer_s_version() -> None:
    held = [Excluded("r2", "/shared", 1000.0, 1100.0)]
    h = _history(_op("r1", "/shared/c", "r1:1", t=1050.0), _op("r2", "/shared/c", "r2:1", t=1060.0))
    r1_won = {"/shared/c": {"w": "r1", "ts": hlc_from_ms(1_050_500)}}
    check = check_lost_writes(h, _snap({"/shared/c": b"r1:1"}, r1_won), excluded=held)
    assert "1 later writes, held while excluded" in check.summary
