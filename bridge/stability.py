"""Causal stability: per origin, the prefix of its stream that every region has applied.

Pure bookkeeping, one instance per subtree. The measure is the origin's
hybrid-logical-clock stamp (HLC), not a Kafka offset: offsets restart when a
topic is re-created or rewound, and a re-announcement re-publishes old
versions at new offsets, while an origin's HLC only moves forward and a
re-announced event keeps the stamp it was written with. What a region has
applied of an origin's stream stays applied in its ensemble whatever
happens to the topic afterwards, so the measure never has to go back.

How a stamp becomes "applied through":

* An origin puts ``applied`` on a heartbeat stamped H only while no capture
  is between stamping its events and queueing its batch: every event it
  stamped below H is then ahead of the heartbeat on its topic, every later
  one is stamped above H. Receivers count only such heartbeats.
* A receiver counts H as "applied through H" for that origin only once its
  stored position on the origin's topic has passed the heartbeat's offset
  (``passed``), i.e. once every record before it is applied.
* Each heartbeat a region publishes carries those values (``report``), and a
  receiver counts a peer's report the same way: only once it has applied
  that peer's stream past the heartbeat carrying it. So when a region sees
  "R applied O through H", it has also applied everything R published
  before R said so; anything R publishes later was written after R applied
  O's events up to H.

``stable(origin)`` is the minimum over every region of the federation (the
configured peers and this region) of how far it has applied ``origin``'s
stream; the origin itself has all of its own. A region that stopped
reporting (down, partitioned) holds the minimum where it last was: nothing
it has not applied ever becomes stable.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

EVERYTHING = 2**63 - 1  # stable() of an origin nobody else has to apply


@dataclass(frozen=True, slots=True)
class Heard:
    """A peer heartbeat fetched but not yet applied past."""

    offset: int
    ts: int
    applied: tuple[tuple[str, int], ...]


@dataclass(slots=True)
class Stability:
    region: str
    peers: tuple[str, ...]
    # origin → HLC through which this region has applied the origin's stream.
    own: dict[str, int] = field(default_factory=dict)
    # reporter → origin → HLC, as the reporter said in a heartbeat applied past.
    reports: dict[str, dict[str, int]] = field(default_factory=dict)
    _heard: dict[tuple[str, int], deque[Heard]] = field(default_factory=dict)

    def heard(self, peer: str, partition: int, offset: int, ts: int,
              applied: Iterable[tuple[str, int]] | None) -> None:
        """A heartbeat of ``peer`` was fetched at ``offset`` (not yet counted)."""
        queue = self._heard.setdefault((peer, partition), deque())
        if queue and offset <= queue[-1].offset:
            queue.clear()  # read again from an earlier offset: a rewind
        queue.append(Heard(offset, ts, tuple(applied or ())))

    def passed(self, peer: str, partition: int, position: int) -> None:
        """This region's stored position on ``peer``'s topic is now ``position``."""
        queue = self._heard.get((peer, partition))
        while queue and queue[0].offset < position:
            h = queue.popleft()
            self.own[peer] = max(self.own.get(peer, 0), h.ts)
            said = self.reports.setdefault(peer, {})
            for origin, ts in h.applied:
                said[origin] = max(said.get(origin, 0), ts)

    def forget_pending(self, peer: str | None = None) -> None:
        """Drop heartbeats not yet counted (a rewind, or a new term reads again)."""
        for key in [k for k in self._heard if peer is None or k[0] == peer]:
            del self._heard[key]

    def report(self) -> tuple[tuple[str, int], ...]:
        """What this region's heartbeats carry: how far it applied each peer."""
        return tuple(sorted((r, ts) for r, ts in self.own.items() if r in self.peers))

    def applied_by(self, region: str, origin: str) -> int | None:
        """How far ``region`` has applied ``origin``'s stream, as known here."""
        if region == origin:
            return None  # all of it; callers never ask
        if region == self.region:
            return self.own.get(origin)
        return self.reports.get(region, {}).get(origin)

    def unreported(self, origin: str) -> tuple[str, ...]:
        """The regions that ``stable(origin)`` waits on: none has reported applying it yet."""
        return tuple(r for r in (self.region, *self.peers)
                     if r != origin and self.applied_by(r, origin) is None)

    def stable(self, origin: str) -> int | None:
        """The HLC below which every region has applied ``origin``'s stream (None: nothing).

        An origin outside the federation (a region removed from the
        configuration) is never stable: nobody here reads its stream.
        """
        regions = (self.region, *self.peers)
        if origin not in regions:
            return None
        values = [self.applied_by(r, origin) for r in regions if r != origin]
        if not values:
            return EVERYTHING  # a region without peers: nobody else to wait for
        if any(v is None for v in values):
            return None
        return min(v for v in values if v is not None)
