"""Trends and renderings of ``zkbridge lag --watch`` (the live view runs in test_operations)."""

from __future__ import annotations

import io
import json
from dataclasses import replace

from rich.console import Console

from bridge.lag import LagRow
from bridge.lagwatch import Frame, History, Trend, as_json, plain, rich_view, summary, trend


def row(behind: int, seconds: float | None = 40.0, peer: str = "eu-west") -> LagRow:
    return LagRow("critical", peer, behind, seconds, 1.0, 0)


def test_shrinking_backlog_is_catching_up_with_rate_and_eta() -> None:
    t = trend([(0.0, 1000), (2.0, 800)], row(800))
    assert t == Trend("catching up", 100.0, 8.0)
    assert t.describe() == "catching up (100 ev/s, ~8s left)"


def test_growing_backlog_is_falling_behind() -> None:
    t = trend([(0.0, 10), (4.0, 14)], row(14))
    assert t.state == "falling behind" and t.rate == -1.0
    assert t.describe() == "falling behind (+1.0 ev/s)"


def test_unchanged_old_backlog_is_stalled_and_empty_is_caught_up() -> None:
    assert trend([(0.0, 7), (9.0, 7)], row(7)).state == "stalled"
    assert trend([(0.0, 7), (1.0, 0)], row(0, None)).state == "caught up"
    assert trend([(0.0, 7)], row(7)).state == "measuring"


def test_a_young_event_in_flight_is_not_falling_behind() -> None:
    assert trend([(0.0, 0), (1.0, 1)], row(1, seconds=0.4)).state == "keeping up"


def test_history_measures_the_rate_over_its_window() -> None:
    h = History(window=10.0)
    for t, behind in [(0.0, 1000), (5.0, 900), (10.0, 800), (15.0, 700), (20.0, 600)]:
        trends = h.add(t, [row(behind)])
    # The oldest kept sample is 10 s back or more: the rate is 20 ev/s either way,
    # and the deque does not grow without bound.
    assert trends[("critical", "eu-west")].rate == 20.0
    assert len(h.samples[("critical", "eu-west")]) <= 4


def _frame(*rows: LagRow, error: str | None = None) -> Frame:
    h = History()
    h.add(0.0, [row(r.events_behind + 50, peer=r.peer) for r in rows])
    return Frame(1_800_000_000.0, list(rows), h.add(5.0, list(rows)), error)


def test_summary_names_the_rows_that_need_attention() -> None:
    f = _frame(row(100, 50.0, "eu-west"), row(0, 1.0, "ap-south"))
    assert summary(f, None) == "catching up with eu-west"
    assert summary(f, 30) == "above 30s: eu-west"
    ok = _frame(row(0, 1.0, "eu-west"))
    assert summary(ok, 30) == "keeping up with every peer"


def test_plain_table_has_a_stamp_and_a_trend_column() -> None:
    text = plain(_frame(row(100)), "us-east", None)
    head, table = text.splitlines()[0], text.splitlines()[1:]
    assert head == "# 2027-01-15 08:00:00Z  us-east: catching up with eu-west"
    assert table[0].split()[-1] == "TREND"
    assert "catching up (10 ev/s, ~10s left)" in table[1]


def test_json_lines_and_failed_samples() -> None:
    doc = json.loads(as_json(_frame(row(100), error="timed out"), "us-east"))
    assert doc["error"] == "timed out" and doc["rows"][0]["trend"] == "catching up"
    assert doc["rows"][0]["eta_seconds"] == 10.0
    assert "sample failed" in plain(_frame(row(1), error="timed out"), "us-east", None)


def test_rich_view_renders_every_row() -> None:
    buf = io.StringIO()
    Console(file=buf, width=140, color_system=None).print(
        rich_view(_frame(row(100), row(0, 1.0, "ap-south")), "us-east", 2.0, 30.0))
    out = buf.getvalue()
    assert "every 2s" in out and "Ctrl-C" in out
    assert "catching up" in out and "caught up" in out and "above 30s: eu-west" in out


def test_a_topic_that_lost_records_is_explained_under_the_table() -> None:
    from bridge.lag import table

    rows = [LagRow("critical", "r1", 12, 3.0, 1.0, 0,
                   note="zkb.critical.r1[0] lost records: position 500 above end 12; the bridge "
                   "rewinds to 0"), LagRow("critical", "r3", 0, 1.0, 1.0, 0)]
    text = table(rows)
    assert text.splitlines()[-1] == ("! critical/r1: zkb.critical.r1[0] lost records: position "
                                     "500 above end 12; the bridge rewinds to 0")
    assert len(text.splitlines()) == 4


def test_an_overflowed_outbox_is_shown_explained_and_exits_1_under_max_seconds() -> None:
    from bridge.lag import OVERFLOW_NOTE, attention, table

    rows = [LagRow("critical", "r1", 0, 1.0, 1.0, 2500, True, OVERFLOW_NOTE),
            LagRow("critical", "r3", 0, 1.0, 1.0, 2500, True)]
    text = table(rows).splitlines()
    assert text[1].split()[-2:] == ["2500", "OVERFLOWED"]
    assert text[-1] == f"! critical/r1: {OVERFLOW_NOTE}" and len(text) == 4
    assert attention(rows, 30.0) == ["outbox overflowed: critical"]
    assert attention(rows, 0.5) == ["lag above 0.5s", "outbox overflowed: critical"]
    assert attention([replace(r, outbox_overflowed=False) for r in rows], 30.0) == []
    frame = Frame(0.0, rows, History().add(0.0, rows))
    assert "outbox overflowed: critical" in summary(frame, None)
