"""Pure vector-clock and hybrid-logical-clock arithmetic."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from bridge.model import VectorClock


class Order(enum.Enum):
    EQUAL = "equal"
    BEFORE = "before"  # left happened before right (right dominates)
    AFTER = "after"  # left dominates right
    CONCURRENT = "concurrent"


def compare(left: VectorClock, right: VectorClock) -> Order:
    a, b = left.as_dict(), right.as_dict()
    less = greater = False
    for region in a.keys() | b.keys():
        x, y = a.get(region, 0), b.get(region, 0)
        if x < y:
            less = True
        elif x > y:
            greater = True
    if less and greater:
        return Order.CONCURRENT
    if less:
        return Order.BEFORE
    if greater:
        return Order.AFTER
    return Order.EQUAL


def merge(left: VectorClock, right: VectorClock) -> VectorClock:
    a, b = left.as_dict(), right.as_dict()
    return VectorClock.of({r: max(a.get(r, 0), b.get(r, 0)) for r in a.keys() | b.keys()})


# Hybrid logical clock: milliseconds in the high bits, a logical counter in the
# low 16, so a timestamp is one int that sorts like (wall time, counter).
LOGICAL_BITS = 16


def hlc_from_ms(ms: int) -> int:
    return ms << LOGICAL_BITS


def hlc_to_ms(ts: int) -> int:
    return ts >> LOGICAL_BITS


class HybridClock:
    """Monotonic timestamps that also move past every timestamp observed.

    Conflict rules order versions by these timestamps; because a local write
    always gets a stamp above the stamp of the version it replaces, the order
    respects causality, which keeps last-writer-wins convergent when a region
    resolves against a state that was itself the winner of an earlier conflict.
    """

    def __init__(self, wall_ms: Callable[[], int] | None = None) -> None:
        self._last = 0
        self._wall: Callable[[], int] = wall_ms or (lambda: int(time.time() * 1000))

    def wall_ms(self) -> int:
        return int(self._wall())

    def now(self, after: int = 0) -> int:
        """A fresh timestamp above ``after`` and above every earlier one."""
        candidate = max(hlc_from_ms(int(self._wall())), self._last + 1, after + 1)
        self._last = candidate
        return candidate

    def observe(self, ts: int) -> None:
        self._last = max(self._last, ts)
