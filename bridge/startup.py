"""What a leadership term's start is doing, for the status record, the log and systemd.

A term's start (the Kafka checks, the start-up scan and its capture, the
catch-up with what peers published meanwhile) takes seconds on a small
subtree and minutes on a large one or a new region. Before, the status
record was not written until it ended: ``status`` called the leader STALE,
"stuck, or cut off from ZooKeeper" (or, after a restart, HEALTHY from the
record the previous process left), the log said nothing between
``epoch_taken`` and ``bridge_ready``, and systemd killed a start that
outlasted ``TimeoutStartSec`` (READY=1 comes once caught up).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

import structlog

from bridge.status import now_ms

if TYPE_CHECKING:
    from bridge.engine import Bridge

T = TypeVar("T")

log = structlog.get_logger("bridge.startup")

# How often a start still running says so in the log, and to systemd (STATUS=,
# which `systemctl status` shows).
PROGRESS_EVERY = 10.0
NOTIFY_EVERY = 2.0
# A start whose description (its step, its counts) has not changed for this
# long is not moving: waiting on something, or stuck.
STILL_AFTER = 30.0


class StartUp:
    def __init__(self) -> None:
        # Steps under way, each with what to say about it now (counts change).
        self._steps: dict[str, Callable[[], str]] = {}
        self.since_ms = 0  # the term's start; 0 when not starting
        # Told what the start is doing and whether it moved in the last STILL_AFTER
        # seconds, every NOTIFY_EVERY (the daemon: systemd).
        self.on_progress: Callable[[str, bool], None] = lambda text, moving: None
        # Whether what is left to wait for is an outage: partitions without a
        # leader (set by the engine).
        self.outage: Callable[[], bool] = lambda: False

    def begin(self) -> None:
        self._steps.clear()
        self.since_ms = now_ms()

    def end(self) -> float:
        """The start is over; returns how long it took, in seconds (0: none was running)."""
        took = round((now_ms() - self.since_ms) / 1000, 1) if self.running else 0.0
        self._steps.clear()
        self.since_ms = 0
        return took

    @property
    def running(self) -> bool:
        return self.since_ms > 0

    @contextlib.contextmanager
    def step(self, key: str, describe: Callable[[], str]) -> Iterator[None]:
        self._steps[key] = describe
        try:
            yield
        finally:
            self._steps.pop(key, None)

    async def during(self, key: str, describe: Callable[[], str], work: Awaitable[T]) -> T:
        with self.step(key, describe):
            return await work

    def waits_on_outage(self) -> bool:
        """Only the catch-up is left, and it waits on partitions without a leader alone.

        A restart cannot mend that: under systemd such a start is reported
        ready (``Daemon``), not timed out and restarted, over and over, for as
        long as the outage lasts, each time dropping what it applies meanwhile.
        """
        return self.running and set(self._steps) == {"catch-up"} and self.outage()

    def doing(self) -> tuple[str, ...]:
        """The steps under way, said now; () once the term is started."""
        if not self.running:
            return ()
        return (tuple(describe() for describe in self._steps.values())
                or ("taking over: the epoch, the region's state and outbox",))

    async def report(self, every: float = PROGRESS_EVERY, notify: float = NOTIFY_EVERY,
                     still: float = STILL_AFTER) -> None:
        """While the start runs: ``on_progress`` at once and every ``notify`` seconds, a log
        line every ``every`` seconds (journalctl and `systemctl status` show it moving)."""
        clock = asyncio.get_running_loop().time
        logged = changed = clock()
        said = ""
        while self.running:
            text = "starting: " + "; ".join(self.doing())
            if text != said:
                said, changed = text, clock()
            self.on_progress(text, clock() - changed < still)
            await asyncio.sleep(min(notify, every))
            now = clock()
            if self.running and now - logged >= every:
                logged = now
                log.info("start_up_progress", seconds=round((now_ms() - self.since_ms) / 1000),
                         doing=list(self.doing()))


def kafka_checks() -> str:
    return "connecting to Kafka and checking the topics"


def scanning(bridge: Bridge, name: str) -> Callable[[], str]:
    """The start-up scan of ``name``, then the capture of what it found."""
    scanner = bridge.scanners[name]
    captured = capturing(bridge, name, lambda: scanner.found or 0)

    def say() -> str:
        if scanner.found is None:
            return f"scanning {name}: {scanner.read:,} znodes and metadata records read"
        return captured()

    return say


def capturing(bridge: Bridge, name: str, total: Callable[[], int],
              what: str = "changes the scan found") -> Callable[[], str]:
    """A capture of ``total()`` changes of ``name`` under way, counted from now."""
    key = f"captured:{name}"
    before = bridge.stats[key]

    def say() -> str:
        done = min(total(), bridge.stats[key] - before)
        return f"capturing {name}: {done:,} of {total():,} {what}"

    return say


def catching_up(bridge: Bridge) -> Callable[[], str]:
    def say() -> str:
        joining = [f"{n} ({len(st.joining):,} znodes held before)"
                   for n, st in bridge.stores.items() if st.joining is not None]
        unknown = sorted(bridge.inbound.catch_up_unknown)
        waiting = ", ".join(f"{t} partition {p}" for t, p in unknown)
        held = ", ".join(f"{bridge.topic(n, bridge.region)} (this region's own: {n} "
                         "publishes nothing until then)"
                         for n in sorted(bridge.inbound.own_unsurveyed))
        waiting = ", ".join(w for w in (waiting, held) if w)
        return (f"applying what peers published before this start: "
                f"{bridge.inbound.to_catch_up():,} records to go"
                + (f", and waiting for a leader of {waiting}" if waiting else "")
                + (f"; joining {', '.join(joining)}" if joining else ""))

    return say
