"""What the bridge's parts ask about its record streams: decoding, applied and stable positions.

A peer's record decoded, or contained when anything about it is off (counted,
logged, skipped); how far this region applied each peer's stream (for
heartbeats) and each origin's stable prefix (for status and metrics); the
captured changes Kafka has not yet acknowledged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from bridge.clock import hlc_to_ms
from bridge.inbound import decode_record
from bridge.kafka import Record
from bridge.model import Event
from bridge.status import now_ms

if TYPE_CHECKING:
    from bridge.engine import Bridge

# The logger these events always had: log routing and tests select them by it.
log = structlog.get_logger("bridge.engine")


class Streams:
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def decode(self, rec: Record, subtree: str, origin: str) -> Event | None:
        """Decode and contain one record: anything off is counted, logged and skipped."""
        event, reason, detail = decode_record(rec, subtree, origin)
        if reason:
            self.bridge.stats[f"rejected:{reason}"] += 1
            self.bridge.note_error(f"event rejected ({reason})", f"{rec.topic}@{rec.offset}")
            log.warning("event_rejected", reason=reason, topic=rec.topic,
                        partition=rec.partition, offset=rec.offset, detail=detail)
        return event

    def applied_report(self, subtree: str) -> tuple[tuple[str, int], ...]:
        """How far this region applied each peer's stream of ``subtree`` (for heartbeats)."""
        stab = self.bridge.stability[subtree]
        for p in self.bridge.peers.values():
            if p.subtree == subtree:
                for part, pos in p.positions.items():
                    stab.passed(p.peer, part, pos)
        return stab.report()

    def stable_prefixes(self, subtree: str) -> dict[str, int | None]:
        """Per origin, the wall-clock ms of its stream's stable prefix (None: not known)."""
        self.applied_report(subtree)
        stab = self.bridge.stability[subtree]
        out: dict[str, int | None] = {}
        for origin in (self.bridge.region, *self.bridge.settings.peers):
            prefix = stab.stable(origin)
            out[origin] = None if prefix is None else min(hlc_to_ms(prefix), now_ms())
        return out

    def unreported(self, subtree: str) -> dict[str, tuple[str, ...]]:
        """Per origin whose stable prefix is not known, the regions not heard on it yet."""
        stab = self.bridge.stability[subtree]
        origins = (self.bridge.region, *self.bridge.settings.peers)
        return {o: waits for o in origins if (waits := stab.unreported(o))}

    def backlog(self, subtree: str) -> int:
        """Captured changes of ``subtree`` not yet acknowledged by Kafka."""
        return self.bridge.outbound.backlog(subtree)
