"""The status record: what the leading bridge tells operators about itself.

The leader rewrites ``<state>/status`` every few seconds (behind the epoch
check), so ``zkbridge status`` and ``zkbridge lag`` work from any host, with
the bridge running or not; the record's age says how fresh it is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

STATUS_INTERVAL = 2.0
# An incident (a peer topic that lost records, a clock collision) keeps the
# bridge degraded this long after it was last seen: long enough for an
# operator to notice, short enough that a healed federation reads healthy again.
INCIDENT_S = 600.0
# A peer heartbeats every heartbeat_interval; this many missed means silent.
SILENT_HEARTBEATS = 10
# Heard on a subtree: its last heartbeat there at most this many intervals old.
HEARD_HEARTBEATS = 3


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class PeerStatus:
    subtree: str
    peer: str
    topic: str
    positions: Mapping[int, int]
    highwater: Mapping[int, int]
    last_heartbeat_ms: int
    last_event_ms: int
    # Wall time the bridge last stored positions after applying a batch from
    # this peer (heartbeat-only batches too); 0 = not reported (older bridge).
    last_applied_ms: int = 0


@dataclass(frozen=True, slots=True)
class Status:
    region: str
    identity: str
    epoch: int
    role: str
    health: str
    started_ms: int
    updated_ms: int
    counters: Mapping[str, int]
    outbox: Mapping[str, int]
    oversized: Mapping[str, list[str]]
    peers: tuple[PeerStatus, ...]
    errors: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)
    held_back: Mapping[str, list[str]] = field(default_factory=dict)
    # Things that happened to the replicated data, newest last: each
    # {"at_ms", "kind", "text"}; kind is TOPIC_RESET, COLLISION,
    # REANNOUNCED or SKIPPED.
    incidents: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)
    # Records a peer's stream waits on (clock skew), by skip.where().
    waiting: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    clock: str = ""  # why this region's own clock looks wrong against its peers, or ""
    # Per subtree, bounded state: tombstones held and collected, the outbox's
    # oldest entry, the stable prefix's age per origin (None: not known yet).
    state: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # When the client certificates the leader loaded expire, by configuration key
    # (seconds since the epoch).
    certificates: Mapping[str, float] = field(default_factory=dict)
    # While the leader's term is starting (scan, capture, catch-up): what it is
    # doing, and since when; () and 0 once it is ready (and in older records).
    starting: tuple[str, ...] = ()
    starting_since_ms: int = 0

    def encode(self) -> bytes:
        doc = {
            "region": self.region, "identity": self.identity, "epoch": self.epoch,
            "role": self.role, "health": self.health, "started_ms": self.started_ms,
            "updated_ms": self.updated_ms, "counters": dict(self.counters),
            "outbox": dict(self.outbox), "oversized": dict(self.oversized),
            "held_back": dict(self.held_back),
            "peers": [
                {"subtree": p.subtree, "peer": p.peer, "topic": p.topic,
                 "positions": {str(k): v for k, v in p.positions.items()},
                 "highwater": {str(k): v for k, v in p.highwater.items()},
                 "last_heartbeat_ms": p.last_heartbeat_ms, "last_event_ms": p.last_event_ms,
                 "last_applied_ms": p.last_applied_ms}
                for p in self.peers
            ],
            "errors": list(self.errors),
            "incidents": list(self.incidents),
            "waiting": dict(self.waiting),
            "clock": self.clock,
            "state": dict(self.state),
            "certificates": dict(self.certificates),
            "starting": list(self.starting),
            "starting_since_ms": self.starting_since_ms,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @staticmethod
    def decode(raw: bytes) -> Status | None:
        """Parse a stored record; None when absent or unreadable (an older or damaged one)."""
        try:
            d = json.loads(raw)
            return Status(
                region=d["region"], identity=d["identity"], epoch=int(d["epoch"]),
                role=d["role"], health=d["health"], started_ms=int(d["started_ms"]),
                updated_ms=int(d["updated_ms"]), counters=d["counters"], outbox=d["outbox"],
                oversized=d.get("oversized", {}),
                held_back=d.get("held_back", {}),
                peers=tuple(
                    PeerStatus(
                        subtree=p["subtree"], peer=p["peer"], topic=p["topic"],
                        positions={int(k): int(v) for k, v in p["positions"].items()},
                        highwater={int(k): int(v) for k, v in p["highwater"].items()},
                        last_heartbeat_ms=int(p["last_heartbeat_ms"]),
                        last_event_ms=int(p["last_event_ms"]),
                        last_applied_ms=int(p.get("last_applied_ms", 0)),
                    )
                    for p in d["peers"]
                ),
                errors=tuple(d.get("errors", [])),
                incidents=tuple(d.get("incidents", [])),
                waiting=d.get("waiting", {}),
                clock=str(d.get("clock", "")),
                state=d.get("state", {}),
                certificates={str(k): float(v)
                              for k, v in d.get("certificates", {}).items()},
                starting=tuple(str(x) for x in d.get("starting", ())),
                starting_since_ms=int(d.get("starting_since_ms", 0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def peer(self, subtree: str, peer: str) -> PeerStatus | None:
        for p in self.peers:
            if p.subtree == subtree and p.peer == peer:
                return p
        return None


def health(errors: tuple[Mapping[str, Any], ...], peers: tuple[PeerStatus, ...],
           heartbeat_interval: float, now: int | None = None,
           incidents: tuple[Mapping[str, Any], ...] = (), clock: str = "",
           started_ms: int = 0, overflowed: bool = False) -> str:
    """``ok``, or ``degraded``: a recent error or incident, a peer silent for 10 heartbeats
    (or never heard in as long since ``started_ms``), this region's clock off against its
    peers', an outbox overflowed (``bridge.overflow``)."""
    t = now or now_ms()
    if clock or overflowed:
        return "degraded"
    if any(t - int(e.get("at_ms", 0)) < 60_000 for e in errors):
        return "degraded"
    if any(t - int(e.get("at_ms", 0)) < INCIDENT_S * 1000 for e in incidents):
        return "degraded"
    if any(silent_for(p, started_ms, heartbeat_interval, t) for p in peers):
        return "degraded"
    return "ok"


def unheard_ms(last_heartbeat_ms: int, started_ms: int, now: int) -> int | None:
    """How long no heartbeat has come from a peer: since its last one or, if this bridge
    never heard one, since it started (a lower bound); None when neither is known."""
    since = last_heartbeat_ms or started_ms
    return now - since if since else None


def silent_for(p: PeerStatus, started_ms: int, heartbeat_interval: float, now: int
               ) -> float | None:
    """Seconds without a heartbeat from ``p`` if it counts as silent, else None.

    A peer never heard from counts too, once this bridge has waited as long:
    its bridge never ran, or ``peers`` names a region that does not exist.
    """
    quiet = unheard_ms(p.last_heartbeat_ms, started_ms, now)
    if quiet is None or quiet <= SILENT_HEARTBEATS * heartbeat_interval * 1000:
        return None
    return quiet / 1000


def heard_elsewhere(p: PeerStatus, peers: Sequence[PeerStatus],
                    heartbeat_interval: float, now: int) -> str | None:
    """Why ``p``, silent, may be: its region is heard on other subtrees now, so its bridge
    runs and reaches Kafka; this subtree is missing from its configuration (taken
    out, or not added there yet), or its topic refuses it. None if it is not heard."""
    # Heard lately, not merely not silent yet: a region whose bridge went down goes
    # silent on each subtree a little apart, as its last heartbeats went out.
    fresh_ms = HEARD_HEARTBEATS * heartbeat_interval * 1000
    heard = sorted({q.subtree for q in peers if q.peer == p.peer and q.subtree != p.subtree
                    and q.last_heartbeat_ms and now - q.last_heartbeat_ms <= fresh_ms})
    if not heard:
        return None
    return (f"{p.peer} is heard on {', '.join(heard)}, so its bridge runs: `{p.subtree}` is "
            f"missing from its configuration, or it cannot write that subtree's topic")
