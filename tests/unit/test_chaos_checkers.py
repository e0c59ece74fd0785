"""The fault campaign's pure parts: the seeded schedule and the lost-write checker's rules."""

from __future__ import annotations

from bridge.clock import hlc_from_ms
from tests.chaos.checkers import Snapshot, check_lost_writes
from tests.chaos.nemesis import KINDS_ALL, schedule
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
