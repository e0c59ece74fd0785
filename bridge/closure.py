"""Where a capture's batch can close: pure logic over the frames of reads and notifications.

ZooKeeper sends a session the notification of a change before the reply to
any later request, and the adapter numbers every frame it receives in order
(``bridge.zk.wire.Connection``). So for any read reply at frame L, a change is
notified below L exactly when it is at or before the zxid that reply saw.

A batch closed at reply L holds every path that changed at or before L (the
paths taken when the capture began, and those notified below L), each with a
value that was current at L: read by a reply with no notification of it
between that reply and L. A capture reads the paths it took, then only what
the latest candidate still lacks; every earlier reply stays a candidate, so
a writer that keeps changing new paths does not keep the capture chasing it
as long as an earlier snapshot is complete. Frames are known per call of
``notified()`` as (first, latest) only: a path notified on both sides of an
interval counts as notified inside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from itertools import chain

Frames = Sequence[tuple[int, int] | None]  # per call of notified(); None: a per-node watch


@dataclass(frozen=True, slots=True)
class Closure:
    """The outcome for one capture so far."""

    snapshot: int | None  # the reply frame the batch closes at; None: not yet
    batch: frozenset[str]  # the paths the batch holds (when closed)
    unread: frozenset[str]  # what the latest reply lacks (when not closed)


def _before(frames: Frames, snapshot: int) -> bool:
    # A frameless notification counts as before: one extra read at worst.
    return any(f is None or f[0] < snapshot for f in frames)


def _between(frames: Frames, a: int, b: int) -> bool:
    low, high = min(a, b), max(a, b)
    return any(f is not None and f[0] < high and f[1] > low for f in frames)


def close(taken: AbstractSet[str], at: Mapping[str, int], seen: Mapping[str, Frames],
          snapshots: Sequence[int]) -> Closure:
    """The latest of ``snapshots`` (reply frames, ascending) a batch can close at.

    ``taken``: paths notified before the capture's first read; ``at``: the
    frame of the reply that last read each path; ``seen``: each path's
    notifications since the capture began. (A start-up capture takes 100,000
    paths or more: the sets here are built once per candidate, not copied.)
    """
    unread: set[str] = set()
    for snapshot in reversed(snapshots or [0]):
        extra = {r for r, fs in seen.items() if r not in taken and _before(fs, snapshot)}
        stale = {r for r in chain(taken, extra) if r not in at or (
            at[r] != snapshot and r in seen and _between(seen[r], at[r], snapshot))}
        if not stale:
            return Closure(snapshot, frozenset(chain(taken, extra)), frozenset())
        if not unread:
            unread = stale  # the latest candidate's: reading them may close it
    return Closure(None, frozenset(), frozenset(unread))


def later(closure: Closure, taken: Iterable[str], seen: Mapping[str, Frames]) -> set[str]:
    """Paths for the next batch: taken or notified but not in this one, or in it
    and notified after its snapshot. (Every path read was taken or notified.)"""
    snapshot = closure.snapshot if closure.snapshot is not None else 0
    out = {r for r in chain(taken, seen) if r not in closure.batch}
    out |= {r for r, fs in seen.items() if r in closure.batch
            and any(f is None or f[1] > snapshot for f in fs)}
    return out
