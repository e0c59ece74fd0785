"""Prometheus metrics and the health endpoint, served from the bridge's own loop.

Metrics are collected at scrape time from the bridge's counters and peer
state (no second set of books). ``/healthz`` answers 200 while the process is
serving (leader or standby) and connected to ZooKeeper, 503 otherwise, with a
small JSON body saying why.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bridge.acl import HOLD
from bridge.plan import WRITE_HOLDS
from bridge.status import now_ms, unheard_ms

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from bridge.engine import Bridge

log = structlog.get_logger("bridge.metrics")

# Why a znode is held back: the capture's (the bridge may not read it, or its
# ACL is narrower than acl: open may publish) and the apply's.
HELD_REASONS = ("read", HOLD, *WRITE_HOLDS)


@dataclass(frozen=True, slots=True)
class Spec:
    name: str
    kind: Literal["gauge", "counter"]
    help: str
    labels: tuple[str, ...] = ()

    @property
    def exported(self) -> str:
        """The series name a scrape sees (the client library suffixes counters)."""
        return f"{self.name}_total" if self.kind == "counter" else self.name


# Every family the collector exports, and nothing else: it builds them only
# through family(), and the dashboard and alert tests read this table.
SPECS: dict[str, Spec] = {s.name: s for s in (
    Spec("zkbridge_up", "gauge", "1 while the bridge process serves", ("region",)),
    Spec("zkbridge_leader", "gauge", "1 on the region's active bridge", ("region",)),
    Spec("zkbridge_starting", "gauge",
         "1 while the bridge's leadership term starts (scan, capture, catch-up)", ("region",)),
    Spec("zkbridge_lag_events", "gauge", "peer events not applied yet", ("subtree", "peer")),
    Spec("zkbridge_lag_seconds", "gauge", "how far behind a peer, in seconds",
         ("subtree", "peer")),
    Spec("zkbridge_heartbeat_age_seconds", "gauge",
         "age of the last heartbeat applied from a peer (never heard: seconds since this "
         "bridge started)", ("subtree", "peer")),
    Spec("zkbridge_partitions_leaderless", "gauge",
         "partitions of a topic this bridge reads or writes without a leader at the last "
         "topic check (every node holding a replica down); leader only", ("topic",)),
    Spec("zkbridge_outbox_depth", "gauge", "local changes not yet acked by Kafka", ("subtree",)),
    Spec("zkbridge_outbox_age_seconds", "gauge",
         "age of the oldest local change not yet acked by Kafka (0: none)", ("subtree",)),
    Spec("zkbridge_outbox_bytes", "gauge",
         "estimated bytes the outbox holds in the local ensemble, counted against "
         "outbox_max_mb (leader only)", ("subtree",)),
    Spec("zkbridge_outbox_overflowed", "gauge",
         "1 from the outbox reaching outbox_max_mb until what changed meanwhile is "
         "published again", ("subtree",)),
    Spec("zkbridge_tombstones", "gauge", "tombstones (deleted paths' metadata) held",
         ("subtree",)),
    Spec("zkbridge_tombstones_collected", "counter",
         "tombstones removed once stable everywhere and past tombstone_grace", ("subtree",)),
    Spec("zkbridge_nulls_published", "counter",
         "null-value records published for collected tombstones", ("subtree",)),
    Spec("zkbridge_nulls_applied", "counter",
         "peers' null records whose collected delete won over a live version here",
         ("subtree",)),
    Spec("zkbridge_nulls_ignored", "counter",
         "peers' null records with nothing to do here (the usual case)", ("subtree",)),
    Spec("zkbridge_stable_prefix_age_seconds", "gauge",
         "age of the newest point of an origin's stream every region has applied "
         "(absent: not known yet)", ("subtree", "origin")),
    Spec("zkbridge_held_back", "gauge",
         "znodes held back now, not replicated until readable and writable (see status)",
         ("subtree", "reason")),
    Spec("zkbridge_oversized", "gauge",
         "znodes larger than max_data_bytes, not replicated", ("subtree",)),
    Spec("zkbridge_scan_seconds", "gauge", "duration of the last full scan", ("subtree",)),
    Spec("zkbridge_published", "counter", "events published", ("subtree",)),
    Spec("zkbridge_captured", "counter", "local changes captured", ("subtree",)),
    Spec("zkbridge_applied", "counter", "remote events processed", ("subtree", "outcome")),
    Spec("zkbridge_conflicts", "counter", "conflicts resolved", ("subtree",)),
    Spec("zkbridge_sequence_collisions", "counter",
         "sequential znodes created in two regions under one name: one content lost",
         ("subtree",)),
    Spec("zkbridge_rejected", "counter", "records refused", ("reason",)),
    Spec("zkbridge_scans", "counter", "full scans", ("subtree",)),
    Spec("zkbridge_retries", "counter", "retried operations"),
    Spec("zkbridge_topic_resets", "counter",
         "peer streams rewound: the topic lost records or was re-created", ("subtree", "peer")),
    Spec("zkbridge_reannounced", "counter",
         "records re-announced because this region's own topic lost records", ("subtree",)),
    Spec("zkbridge_clock_collisions", "counter",
         "events refused: equal clock, different content (two writers as one region)",
         ("subtree", "origin")),
    Spec("zkbridge_clock_skew_waits", "counter",
         "times a peer stream began waiting on a batch stamped beyond max_clock_skew",
         ("subtree", "peer")),
    Spec("zkbridge_operator_skips", "counter",
         "batches left out on an operator's zkbridge skip", ("subtree", "peer")),
    Spec("zkbridge_certificate_expiry_timestamp_seconds", "gauge",
         "when a certificate this bridge shows its servers expires (read at start; the "
         "earliest in its file), seconds since the epoch", ("key",)),
    Spec("zkbridge_clock_offset_seconds", "gauge",
         "this host's wall clock minus a peer's heartbeat stamps (least delayed recent one)",
         ("peer",)),
)}


def family(name: str) -> GaugeMetricFamily | CounterMetricFamily:
    spec = SPECS[name]
    cls = GaugeMetricFamily if spec.kind == "gauge" else CounterMetricFamily
    return cls(spec.name, spec.help, labels=list(spec.labels))


def exported() -> dict[str, frozenset[str]]:
    """Series name → its labels, as a scrape of the bridge shows them."""
    return {s.exported: frozenset(s.labels) for s in SPECS.values()}


def lag_of(bridge: Bridge) -> list[tuple[str, str, int, float]]:
    """(subtree, peer, events behind, seconds behind) from what the consumer last saw."""
    out = []
    now = now_ms()
    for p in bridge.peers.values():
        hw = bridge.kafka.highwater(p.topic, p.positions)
        # A position above the end: the topic lost records and all of it is
        # still to be read (the fetcher rewinds), not a negative backlog.
        behind = sum(end if (pos := p.positions.get(part, 0)) > end else end - pos
                     for part, end in hw.items())
        # Behind: the newest applied event is at least this old. Caught up: the
        # peer's last heartbeat tells how fresh our view of it is.
        # Never heard: since the bridge started, as the heartbeat age counts it.
        ref = p.last_event_ms if behind else max(p.last_heartbeat_ms, p.last_event_ms)
        seconds = (now - (ref or bridge.started_ms)) / 1000
        out.append((p.subtree, p.peer, behind, max(0.0, seconds)))
    return out


class BridgeCollector(Collector):
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def collect(self) -> Iterator[Metric]:
        b = self.bridge
        region = b.region
        up = family("zkbridge_up")
        up.add_metric([region], 1)
        yield up
        leader = family("zkbridge_leader")
        leader.add_metric([region], 1 if b.role == "leader" else 0)
        yield leader
        starting = family("zkbridge_starting")
        starting.add_metric([region], 1 if b.start_up.running else 0)
        yield starting
        lag_e = family("zkbridge_lag_events")
        lag_s = family("zkbridge_lag_seconds")
        hb = family("zkbridge_heartbeat_age_seconds")
        now = now_ms()
        # The leader's only: a standby reads no peer topic (and the never-heard
        # rule below would make its heartbeat ages grow).
        leading = b.role == "leader"
        for subtree, peer, events, seconds in lag_of(b) if leading else ():
            lag_e.add_metric([subtree, peer], events)
            lag_s.add_metric([subtree, peer], seconds)
        for p in b.peers.values() if leading else ():
            # A peer never heard: the time since the start, so that its alert fires
            # rather than the series being absent.
            quiet = unheard_ms(p.last_heartbeat_ms, b.started_ms, now) or 0
            hb.add_metric([p.subtree, p.peer], quiet / 1000)
        yield from (lag_e, lag_s, hb)
        nolead = family("zkbridge_partitions_leaderless")
        counts = Counter(t for t, _ in b.inbound.topics.leaderless)
        for topic in sorted([*b.inbound.peers, *b.inbound.own]) if b.in_term else ():
            nolead.add_metric([topic], counts[topic])
        yield nolead
        outbox = family("zkbridge_outbox_depth")
        for name in b.stores:
            outbox.add_metric([name], b.streams.backlog(name))
        yield outbox
        yield from state_families(b)
        yield from unreplicated_families(b)
        scan = family("zkbridge_scan_seconds")
        for name, secs in b.scan_seconds.items():
            scan.add_metric([name], secs)
        yield scan
        families = {kind: family(f"zkbridge_{kind}") for kind in
                    ("published", "captured", "applied", "conflicts", "sequence_collisions",
                     "rejected", "scans",
                     "topic_resets", "reannounced", "clock_collisions", "clock_skew_waits",
                     "operator_skips", "tombstones_collected", "nulls_published",
                     "nulls_applied", "nulls_ignored")}
        for key, value in b.stats.items():
            kind, _, rest = key.partition(":")
            fam = families.get(kind)
            if fam is not None and rest:
                fam.add_metric(rest.split(":"), value)
        for kind in ("published", "applied", "conflicts", "sequence_collisions", "reannounced",
                     "tombstones_collected", "nulls_published", "nulls_applied",
                     "nulls_ignored"):
            # Always present, so alerts and dashboards never see "no data" at 0.
            for name in b.stores:
                if not any(k.startswith(f"{kind}:{name}") for k in b.stats):
                    families[kind].add_metric(
                        [name, "applied"] if kind == "applied" else [name], 0)
        for p in b.peers.values():
            for kind in ("topic_resets", "clock_collisions", "clock_skew_waits",
                         "operator_skips"):
                if f"{kind}:{p.subtree}:{p.peer}" not in b.stats:
                    families[kind].add_metric([p.subtree, p.peer], 0)
        yield from families.values()
        offsets = family("zkbridge_clock_offset_seconds")
        for peer, seen in b.reporter.clock_offsets.items():
            if seen:
                offsets.add_metric([peer], min(seen) / 1000)
        yield offsets
        retries = family("zkbridge_retries")
        retries.add_metric([], b.stats["retries"])
        yield retries
        expiry = family("zkbridge_certificate_expiry_timestamp_seconds")
        for cert in b.certificates:
            expiry.add_metric([cert.key], cert.not_after)
        yield expiry


def state_families(b: Bridge) -> Iterator[Metric]:
    """Bounded-state gauges: outbox age, bytes and overflow, tombstones held, stable
    prefix age per origin."""
    age = family("zkbridge_outbox_age_seconds")
    size = family("zkbridge_outbox_bytes")
    overflowed = family("zkbridge_outbox_overflowed")
    held = family("zkbridge_tombstones")
    stable = family("zkbridge_stable_prefix_age_seconds")
    now = now_ms()
    for name, store in b.stores.items():
        age.add_metric([name], b.outbound.oldest_age(name))
        size.add_metric([name], b.overflow.bytes[name])
        overflowed.add_metric([name], int(b.overflow.active(name)))
        held.add_metric([name], store.tombstones_held())
        for origin, prefix_ms in b.streams.stable_prefixes(name).items():
            if prefix_ms is not None:
                stable.add_metric([name, origin], max(0.0, (now - prefix_ms) / 1000))
    yield from (age, size, overflowed, held, stable)


def unreplicated_families(b: Bridge) -> Iterator[Metric]:
    """Znodes left out of replication now: the regions differ there until someone acts.

    Every reason is exported per subtree, 0 included, so an alert on it never
    sees "no data"."""
    held = family("zkbridge_held_back")
    oversized = family("zkbridge_oversized")
    for name, store in b.stores.items():
        counts = Counter(store.held_back.values())
        for reason in (*HELD_REASONS, *sorted(set(counts) - set(HELD_REASONS))):
            held.add_metric([name, reason], counts.get(reason, 0))
        oversized.add_metric([name], len(store.oversized))
    yield from (held, oversized)


def healthz(bridge: Bridge) -> tuple[int, dict[str, object]]:
    connected = bridge.zk.connected
    serving = bridge.role in ("leader", "standby", "candidate")
    body: dict[str, object] = {"role": bridge.role, "zookeeper_connected": connected,
                               "region": bridge.region}
    return (200 if connected and serving else 503), body


class MetricsServer:
    """A tiny HTTP/1.0 server: ``GET /metrics`` and ``GET /healthz``, nothing else."""

    def __init__(self, bridge: Bridge, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]") or "0.0.0.0", int(port)
        self.bridge = bridge
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(BridgeCollector(bridge))
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        log.info("metrics_listening", address=f"{self.host}:{self.port}")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                line = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) > 1 else ""
            if path == "/metrics":
                status, ctype, body = 200, "text/plain; version=0.0.4", generate_latest(
                    self.registry)
            elif path == "/healthz":
                status, doc = healthz(self.bridge)
                ctype, body = "application/json", json.dumps(doc).encode()
            else:
                status, ctype, body = 404, "text/plain", b"try /metrics or /healthz\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(f"HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
