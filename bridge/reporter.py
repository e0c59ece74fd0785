"""The bridge's status record, and what its peers' heartbeats say about this region's clock.

The record lives under the state path, rewritten every ``STATUS_INTERVAL``
from a term's start (``startup`` says what the start is doing), at once after
an incident and when the term is ready, so that ``zkbridge status`` and ``lag`` read
a fresh one from any host, also while the bridge is down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import TYPE_CHECKING

import structlog

from bridge.errors import BridgeError, VersionConflict
from bridge.status import (
    INCIDENT_S,
    STATUS_INTERVAL,
    PeerStatus,
    Status,
    health,
    heard_elsewhere,
    now_ms,
    silent_for,
)
from bridge.zk import Create, SetData, ZooKeeper
from bridge.zk import Op as ZkOp

if TYPE_CHECKING:
    from bridge.config import Settings
    from bridge.engine import Bridge

log = structlog.get_logger("bridge.reporter")


def status_path(state_path: str) -> str:
    return f"{state_path}/status"


async def read_status(zk: ZooKeeper, settings: Settings) -> Status | None:
    """The region's status record as its last leader wrote it (None: none, or unreadable)."""
    node = await zk.get(status_path(settings.state_path))
    return Status.decode(node.data) if node and node.data else None


class Reporter:
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        # Set by an incident: the status record shows it now, not at the next tick.
        self.due = asyncio.Event()
        # Our wall clock minus each peer's heartbeat stamps, recent ones:
        # the smallest is the least delayed, the best guess of the offset.
        self.clock_offsets: dict[str, deque[int]] = {}
        self._clock_said = ""
        # (subtree, peer) → its last heartbeat when it was found silent: logged
        # once when it goes silent and once when it is heard again.
        self._silent: dict[tuple[str, str], int] = {}
        self._writing = asyncio.Lock()

    @property
    def path(self) -> str:
        return status_path(self.bridge.settings.state_path)

    # -- clock ---------------------------------------------------------------
    def clock_sample(self, peer: str, stamp_ms: int) -> None:
        """A peer's fresh heartbeat, stamped by its clock (HLC physical part)."""
        self.clock_offsets.setdefault(peer, deque(maxlen=10)).append(
            self.bridge.clock.wall_ms() - stamp_ms)

    def clock_check(self) -> str:
        """Why this region's own clock looks wrong, or "".

        The clock is judged against a majority of the peers heard from: one
        peer that disagrees with everyone else is that peer's problem (its
        own bridge reports it); with a single peer both sides report it.
        """
        bound = 1000 * self.bridge.settings.max_clock_skew
        offsets = {p: min(d) for p, d in self.clock_offsets.items() if d}
        off = {p: v for p, v in offsets.items() if abs(v) > bound}
        said = ""
        if off and 2 * len(off) > len(offsets):
            mean = sum(off.values()) / len(off) / 1000
            way = "ahead of" if mean > 0 else "behind"
            said = (f"this region's clock is about {abs(mean):.0f}s {way} the heartbeats of "
                    f"{', '.join(sorted(off))} (more than max_clock_skew "
                    f"{bound / 1000:g}s): check NTP on this host")
        if said and not self._clock_said:
            log.error("clock_disagrees", offsets_s={p: round(v / 1000, 1) for p, v in
                                                    offsets.items()}, detail=said)
        elif self._clock_said and not said:
            log.info("clock_agrees")
        self._clock_said = said
        return said

    # -- peers' liveness ------------------------------------------------------
    async def carry_over(self) -> None:
        """Take what the region's last record knew, at a term's start (a restart, a failover).

        The heartbeats and events an earlier process read are behind the
        stored positions and are not read again. Without this, a peer silent
        since before a restart had no heartbeat age at all: ``status`` said
        HEALTHY, ``lag`` showed none and exited 0, the lag metric read 0 and
        the heartbeat-age metric was absent, so every alert on it cleared.
        Recent incidents (a skipped record's audit among them) were dropped
        the same way.
        """
        b = self.bridge
        old = await read_status(b.zk, b.settings)
        if old is None:
            return
        for p in b.peers.values():
            if (was := old.peer(p.subtree, p.peer)) is not None:
                p.last_heartbeat_ms = max(p.last_heartbeat_ms, was.last_heartbeat_ms)
                p.last_event_ms = max(p.last_event_ms, was.last_event_ms)
        recent = now_ms() - INCIDENT_S * 1000
        merged = {(int(i.get("at_ms", 0)), str(i.get("kind")), str(i.get("text"))): dict(i)
                  for i in (*old.incidents, *b.incidents) if int(i.get("at_ms", 0)) > recent}
        b.incidents.clear()
        b.incidents.extend(merged[k] for k in sorted(merged))

    def heartbeat(self, subtree: str, peer: str, previous_ms: int, at_ms: int) -> None:
        """A peer's heartbeat was read: ``at_ms`` its time, ``previous_ms`` the last one's."""
        went = self._silent.get((subtree, peer))
        if went is not None and at_ms > went:  # not one of a backlog read again
            del self._silent[(subtree, peer)]
            log.info("peer_heard_again", subtree=subtree, peer=peer,
                     silent_s=round((at_ms - (went or self.bridge.started_ms)) / 1000, 1))
            self.due.set()
        elif previous_ms and at_ms - previous_ms > 2000 * self.bridge.settings.heartbeat_interval:
            # Back after a pause: the record (``status``, ``lag``) says so now,
            # not with the age it had before, up to STATUS_INTERVAL later.
            self.due.set()

    def _note_silent(self, peers: tuple[PeerStatus, ...], now: int) -> None:
        b = self.bridge
        if not b.inbound.caught_up.is_set():
            # A term's first records come before its first fetch: the heartbeats
            # carried over are as old as the bridge was away, and the peers'
            # newer ones are not read yet.
            return
        for p in peers:
            key = (p.subtree, p.peer)
            quiet = silent_for(p, b.started_ms, b.settings.heartbeat_interval, now)
            if quiet is None or key in self._silent:
                continue
            # 0: never heard, so any heartbeat is the peer's first.
            self._silent[key] = p.last_heartbeat_ms
            said: dict[str, object] = ({"last_heartbeat_s": round(quiet, 1),
                     "hint": f"its bridge or its link to Kafka is down: run `zkbridge status` "
                             f"in {p.peer}"} if p.last_heartbeat_ms else
                    {"never_heard_s": round(quiet, 1),
                     "hint": f"no heartbeat since this bridge started: {p.peer}'s bridge never "
                             "ran or cannot reach Kafka, or `peers` names a region that does "
                             "not exist"})
            if (cause := heard_elsewhere(p, peers, b.settings.heartbeat_interval, now)):
                said["hint"] = cause
            log.warning("peer_silent", subtree=p.subtree, peer=p.peer, **said)

    # -- the record ----------------------------------------------------------
    def status(self) -> Status:
        b = self.bridge
        peers = tuple(
            PeerStatus(
                subtree=p.subtree, peer=p.peer, topic=p.topic, positions=dict(p.positions),
                highwater=b.kafka.highwater(p.topic, p.positions),
                last_heartbeat_ms=p.last_heartbeat_ms, last_event_ms=p.last_event_ms,
                last_applied_ms=p.last_applied_ms,
            )
            for p in b.peers.values()
        )
        errors = tuple(b.errors)
        incidents = tuple(b.incidents)
        clock = self.clock_check()
        now = now_ms()
        self._note_silent(peers, now)
        starting = b.start_up.doing()
        return Status(
            region=b.region, identity=b.identity, epoch=b.epoch, role=b.role,
            # Starting: the peers' heartbeats and positions are not read up to now yet.
            health="starting" if starting else health(
                errors, peers, b.settings.heartbeat_interval, incidents=incidents, clock=clock,
                started_ms=b.started_ms,
                overflowed=any(b.overflow.active(n) for n in b.stores)),
            started_ms=b.started_ms, updated_ms=now, counters=dict(b.stats),
            outbox={n: b.streams.backlog(n) for n in b.stores},
            oversized={n: sorted(st.oversized) for n, st in b.stores.items()},
            held_back={n: [f"{rel} ({what})" for rel, what in sorted(st.held_back.items())]
                       for n, st in b.stores.items()},
            peers=peers, errors=errors, incidents=incidents, waiting=dict(b.waiting),
            clock=clock,
            state={n: self.state_of(n) for n in b.stores},
            certificates={e.key: e.not_after for e in b.certificates},
            starting=starting, starting_since_ms=b.start_up.since_ms if starting else 0,
        )

    def state_of(self, subtree: str) -> dict[str, object]:
        """Bounded state of ``subtree`` for the status record."""
        b = self.bridge
        store, now = b.stores[subtree], now_ms()
        return {
            "tombstones": store.tombstones_held(),
            "acl_cache": store.acl.cached,
            "tombstones_collected": store.gc_collected,
            "nulls_published": b.stats[f"nulls_published:{subtree}"],
            "nulls_applied": b.stats[f"nulls_applied:{subtree}"],
            "outbox_age_seconds": round(b.outbound.oldest_age(subtree), 1),
            "outbox_megabytes": round(b.overflow.bytes[subtree] / (1 << 20), 1),
            "outbox_overflowed": b.overflow.active(subtree),
            "stable_prefix_age_seconds": {
                origin: None if at is None else round(max(0, now - at) / 1000, 1)
                for origin, at in b.streams.stable_prefixes(subtree).items()},
            # A join under way (``bridge.joining``): what joins, and how much it set aside.
            "joining": [] if store.joining is None else list(store.join_scope or ("/",)),
            "joining_set_aside": len(store.joining or {}),
            # Why an age above is unknown: who has not reported applying that origin.
            "stable_prefix_waiting_on": {o: list(w) for o, w in
                                         b.streams.unreported(subtree).items()},
        }

    async def write(self) -> None:
        # One at a time: a record written now is never overtaken by an older one
        # still in flight (the one that says a term is ready, after the last
        # that said it was starting).
        async with self._writing:
            zk = self.bridge.zk
            record = self.status().encode()
            stat = await zk.exists(self.path)
            op: ZkOp = (SetData(self.path, record, stat.version) if stat
                        else Create(self.path, record))
            with contextlib.suppress(VersionConflict):  # written meanwhile: the next tick writes
                await zk.multi([op])

    async def run(self) -> None:
        while True:
            try:
                await self.write()
            except BridgeError as exc:
                if not exc.retriable:
                    raise
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.due.wait(), STATUS_INTERVAL)
            self.due.clear()
