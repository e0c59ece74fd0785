"""``zkbridge lag --watch``: re-measure every few seconds and show which way each row moves.

On a terminal the table is redrawn in place (rich's Live display); anywhere
else one plain table (or, with ``--json``, one JSON line) per interval, so a
log or a pipe keeps the whole history. The trend of a row comes from its own
recent samples, so it needs no state from the bridge.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from bridge.config import Settings
from bridge.errors import BridgeError
from bridge.lag import HEADINGS, LagProbe, LagRow, cells, overflow_reason, table

# Rates are measured over this much history: long enough to smooth out the
# heartbeat that lands between two samples, short enough to follow a change.
WINDOW_S = 20.0
# Events this young are in flight between a fetch and its stored position.
IN_FLIGHT_S = 3.0

Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Trend:
    state: str  # measuring | caught up | keeping up | catching up | falling behind | stalled
    rate: float | None  # events/s the backlog shrinks (negative: grows)
    eta: float | None  # seconds until caught up at that rate

    def describe(self) -> str:
        if self.state == "catching up" and self.rate:
            eta = f", ~{_duration(self.eta)} left" if self.eta is not None else ""
            return f"catching up ({self.rate:.0f} ev/s{eta})"
        if self.state == "falling behind" and self.rate:
            return f"falling behind (+{-self.rate:.1f} ev/s)"
        return self.state


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def trend(history: Sequence[tuple[float, int]], row: LagRow) -> Trend:
    """How ``row`` moves, given earlier (monotonic time, events behind) samples of it.

    ``history`` ends with the current sample; the rate is taken against the
    oldest sample kept.
    """
    behind = row.events_behind
    if behind == 0:
        return Trend("caught up", 0.0, 0.0)
    if row.seconds_behind is not None and row.seconds_behind < IN_FLIGHT_S:
        return Trend("keeping up", None, None)
    if len(history) < 2:
        return Trend("measuring", None, None)
    (t0, b0), (t1, _) = history[0], history[-1]
    rate = (b0 - behind) / (t1 - t0) if t1 > t0 else 0.0
    if rate > 0:
        return Trend("catching up", rate, behind / rate)
    if rate < 0:
        return Trend("falling behind", rate, None)
    return Trend("stalled", 0.0, None)


class History:
    """The last WINDOW_S of samples per (subtree, peer)."""

    def __init__(self, window: float = WINDOW_S) -> None:
        self.window = window
        self.samples: dict[Key, deque[tuple[float, int]]] = {}

    def add(self, at: float, rows: Sequence[LagRow]) -> dict[Key, Trend]:
        out = {}
        for r in rows:
            key = (r.subtree, r.peer)
            dq = self.samples.setdefault(key, deque())
            dq.append((at, r.events_behind))
            while len(dq) > 2 and at - dq[1][0] >= self.window:
                dq.popleft()
            out[key] = trend(dq, r)
        return out


@dataclass(frozen=True, slots=True)
class Frame:
    """One refresh: what was measured, and what went wrong measuring it."""

    at: float  # wall time
    rows: list[LagRow]
    trends: dict[Key, Trend]
    error: str | None = None


def summary(frame: Frame, max_seconds: float | None) -> str:
    worse = [f"{p}" for (_, p), t in frame.trends.items()
             if t.state in ("falling behind", "stalled")]
    over = [r.peer for r in frame.rows if max_seconds is not None and
            max(r.seconds_behind or 0.0, r.heartbeat_age or 0.0) > max_seconds]
    parts = overflow_reason(frame.rows)
    if over:
        parts.append(f"above {max_seconds:g}s: {', '.join(sorted(set(over)))}")
    if worse:
        parts.append(f"not keeping up: {', '.join(sorted(set(worse)))}")
    if not parts:
        catching = [p for (_, p), t in frame.trends.items() if t.state == "catching up"]
        parts.append(f"catching up with {', '.join(sorted(set(catching)))}" if catching
                     else "keeping up with every peer")
    return "; ".join(parts)


def _stamp(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))


def plain(frame: Frame, region: str, max_seconds: float | None) -> str:
    trends = [frame.trends[(r.subtree, r.peer)].describe() for r in frame.rows]
    lines = [f"# {_stamp(frame.at)}  {region}: {summary(frame, max_seconds)}"]
    if frame.error:
        lines.append(f"# sample failed, previous one shown: {frame.error}")
    lines.append(table(frame.rows, ("TREND", trends)))
    return "\n".join(lines) + "\n"


def as_json(frame: Frame, region: str) -> str:
    rows = []
    for r in frame.rows:
        t = frame.trends[(r.subtree, r.peer)]
        rows.append({**r.as_dict(), "trend": t.state, "rate": t.rate, "eta_seconds": t.eta})
    return json.dumps({"at": _stamp(frame.at), "region": region, "error": frame.error,
                       "rows": rows})


_STYLE = {"caught up": "green", "keeping up": "green", "catching up": "cyan",
          "falling behind": "bold red", "stalled": "yellow", "measuring": "dim"}


def rich_view(frame: Frame, region: str, interval: float,
              max_seconds: float | None) -> Group:
    t = Table(title=f"zkbridge lag  {region}  {_stamp(frame.at)}  every {interval:g}s"
                    "  (Ctrl-C to quit)", title_justify="left")
    for i, head in enumerate((*HEADINGS, "TREND")):
        t.add_column(head, justify="right" if 2 <= i <= 5 else "left")
    for r in frame.rows:
        tr = frame.trends[(r.subtree, r.peer)]
        over = max_seconds is not None and max(
            r.seconds_behind or 0.0, r.heartbeat_age or 0.0) > max_seconds
        t.add_row(*cells(r), Text(tr.describe(), style=_STYLE.get(tr.state, "")),
                  style="red" if over else None)
    parts: list[Text | Table] = [t, Text(summary(frame, max_seconds))]
    if frame.error:
        parts.append(Text(f"last sample failed ({frame.error}); previous one shown",
                          style="bold red"))
    return Group(*parts)


async def watch(
    settings: Settings,
    interval: float,
    *,
    out: TextIO,
    terminal: bool,
    json_lines: bool = False,
    max_seconds: float | None = None,
    sample_timeout: float = 30.0,
    stop_after: int | None = None,
) -> None:
    """Runs until cancelled (Ctrl-C) or ``stop_after`` frames. Connecting may raise."""
    history = History()
    async with LagProbe(settings) as probe:
        last: list[LagRow] = []

        async def frame() -> Frame:
            nonlocal last
            error = None
            try:
                async with asyncio.timeout(sample_timeout):
                    last = await probe.sample()
            except (BridgeError, TimeoutError, OSError) as exc:
                error = str(exc) or type(exc).__name__
            return Frame(time.time(), last, history.add(time.monotonic(), last), error)

        async def loop(show: Callable[[Frame], None]) -> None:
            shown = 0
            while stop_after is None or shown < stop_after:
                started = time.monotonic()
                show(await frame())
                shown += 1
                if stop_after is None or shown < stop_after:
                    await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

        if terminal and not json_lines:
            console = Console(file=out)
            with Live(console=console, auto_refresh=False) as live:
                await loop(lambda f: live.update(
                    rich_view(f, settings.region, interval, max_seconds), refresh=True))
        else:
            def emit(f: Frame) -> None:
                out.write((as_json(f, settings.region) + "\n") if json_lines
                          else plain(f, settings.region, max_seconds) + "\n")
                out.flush()

            await loop(emit)
