"""A peer's liveness as the status record tells it: silent, heard again, and across a restart
(with the region's recent incidents).

No servers: a stand-in bridge with the reporter's inputs (the peers' states,
the incidents, the heartbeat interval, and a ZooKeeper that holds an earlier
record).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from types import SimpleNamespace
from typing import Any

from structlog.testing import capture_logs

from bridge.inbound import PeerState
from bridge.metrics import BridgeCollector
from bridge.reporter import Reporter
from bridge.startup import StartUp
from bridge.status import PeerStatus, Status, now_ms

INTERVAL = 0.5  # seconds: silent after 10 of them


class RecordZk:
    """Holds one status record, as an earlier process left it."""

    def __init__(self, record: bytes | None) -> None:
        self.record = record

    async def get(self, path: str) -> Any:
        return None if self.record is None else SimpleNamespace(data=self.record)


def reporter(record: bytes | None = None, incidents: tuple[dict[str, Any], ...] = (),
             started_ms: int | None = None) -> tuple[Reporter, PeerState]:
    peer = PeerState("s", "r2", "zkb.s.r2")
    settings = SimpleNamespace(heartbeat_interval=INTERVAL, state_path="/zkb")
    inbound = SimpleNamespace(caught_up=asyncio.Event())
    inbound.caught_up.set()
    bridge = SimpleNamespace(settings=settings, peers={peer.topic: peer}, zk=RecordZk(record),
                             incidents=deque(incidents, maxlen=50), inbound=inbound,
                             started_ms=now_ms() if started_ms is None else started_ms)
    return Reporter(bridge), peer  # type: ignore[arg-type]


def as_status(peer: PeerState) -> tuple[PeerStatus, ...]:
    return (PeerStatus(subtree=peer.subtree, peer=peer.peer, topic=peer.topic, positions={},
                       highwater={}, last_heartbeat_ms=peer.last_heartbeat_ms,
                       last_event_ms=peer.last_event_ms),)


def record_of(last_heartbeat_ms: int, last_event_ms: int,
              incidents: tuple[dict[str, Any], ...] = ()) -> bytes:
    peer = PeerStatus(subtree="s", peer="r2", topic="zkb.s.r2", positions={0: 7},
                      highwater={0: 7}, last_heartbeat_ms=last_heartbeat_ms,
                      last_event_ms=last_event_ms, last_applied_ms=last_event_ms)
    return Status(region="r1", identity="h:1", epoch=3, role="leader", health="degraded",
                  started_ms=0, updated_ms=now_ms(), counters={}, outbox={}, oversized={},
                  peers=(peer,), incidents=incidents).encode()


def test_heartbeats_on_time_do_not_rewrite_the_record() -> None:
    rep, peer = reporter()
    t = 1_000_000
    for i in range(10):
        rep.heartbeat("s", "r2", peer.last_heartbeat_ms, t + 500 * i)
        peer.last_heartbeat_ms = t + 500 * i
    assert not rep.due.is_set()


def test_a_heartbeat_after_a_pause_rewrites_the_record_at_once() -> None:
    rep, peer = reporter()
    peer.last_heartbeat_ms = 1_000_000
    rep.heartbeat("s", "r2", peer.last_heartbeat_ms, 1_000_000 + 1_200)  # > 2 intervals
    assert rep.due.is_set()


def test_silent_is_logged_once_and_heard_again_once_with_the_record_rewritten() -> None:
    rep, peer = reporter()
    now = now_ms()
    peer.last_heartbeat_ms = now - 6_000  # 12 intervals ago
    with capture_logs() as logs:
        rep._note_silent(as_status(peer), now)
        rep._note_silent(as_status(peer), now + 2_000)  # the next record: no second line
        # A heartbeat older than the one the silence was counted from (a backlog
        # read again by a new term) is not the peer coming back.
        rep.heartbeat("s", "r2", peer.last_heartbeat_ms, now - 7_000)
        assert not rep.due.is_set()
        rep.heartbeat("s", "r2", peer.last_heartbeat_ms, now + 2_100)
    events = [(e["event"], e.get("last_heartbeat_s"), e.get("silent_s")) for e in logs]
    assert events == [("peer_silent", 6.0, None), ("peer_heard_again", None, 8.1)]
    assert rep.due.is_set()


def test_a_peer_never_heard_is_silent_once_the_bridge_has_waited_as_long() -> None:
    now = now_ms()
    rep, peer = reporter(started_ms=now - 4_000)  # 8 intervals: not yet
    with capture_logs() as logs:
        rep._note_silent(as_status(peer), now)
        assert logs == []
        rep._note_silent(as_status(peer), now + 1_500)
        rep.heartbeat("s", "r2", 0, now + 2_000)  # its first heartbeat, at last
    assert [(e["event"], e.get("never_heard_s"), e.get("silent_s")) for e in logs] == [
        ("peer_silent", 5.5, None), ("peer_heard_again", None, 6.0)]
    assert "names a region that does not exist" in logs[0]["hint"]
    assert rep.due.is_set()


def test_a_new_process_takes_the_peers_last_heartbeat_from_the_region_s_record() -> None:
    was = now_ms() - 60_000
    rep, peer = reporter(record_of(last_heartbeat_ms=was, last_event_ms=was - 5_000))
    asyncio.run(rep.carry_over())
    assert (peer.last_heartbeat_ms, peer.last_event_ms) == (was, was - 5_000)
    # Not when the stall would be an old record's: a batch applied is this process's news.
    assert peer.last_applied_ms == 0
    with capture_logs() as logs:
        rep._note_silent(as_status(peer), now_ms())
    assert [e["event"] for e in logs] == ["peer_silent"]


def test_what_this_process_heard_is_not_taken_back_by_an_older_record() -> None:
    rep, peer = reporter(record_of(last_heartbeat_ms=1_000, last_event_ms=1_000))
    peer.last_heartbeat_ms = peer.last_event_ms = 5_000
    asyncio.run(rep.carry_over())
    assert (peer.last_heartbeat_ms, peer.last_event_ms) == (5_000, 5_000)


def test_no_record_or_a_damaged_one_changes_nothing() -> None:
    for record in (None, b"", b"{not json"):
        rep, peer = reporter(record)
        asyncio.run(rep.carry_over())
        assert (peer.last_heartbeat_ms, peer.last_event_ms) == (0, 0)


def test_recent_incidents_of_the_region_s_record_are_kept_once_and_in_order() -> None:
    now = now_ms()
    old = {"at_ms": now - 700_000, "kind": "TOPIC_RESET", "text": "past INCIDENT_S"}
    skipped = {"at_ms": now - 60_000, "kind": "SKIPPED", "text": "ops skipped zkb.s.r2[0]@7"}
    reset = {"at_ms": now - 30_000, "kind": "TOPIC_RESET", "text": "zkb.s.r3 rewound"}
    mine = {"at_ms": now - 1_000, "kind": "REANNOUNCED", "text": "own topic lost records"}
    # A second term of the same process finds its own incidents in the record too.
    rep, _ = reporter(record_of(0, 0, (old, skipped, reset)), incidents=(reset, mine))
    asyncio.run(rep.carry_over())
    assert list(rep.bridge.incidents) == [skipped, reset, mine]


def test_only_the_leader_exports_the_peers_series_a_never_heard_one_included() -> None:
    peer = PeerState("s", "r9", "zkb.s.r9")  # never heard
    started = now_ms() - 90_000
    kafka = SimpleNamespace(highwater=lambda topic, positions: {0: 0})
    series: dict[str, list[tuple[list[str], float]]] = {}
    for role in ("leader", "standby"):
        bridge = SimpleNamespace(region="r1", role=role, peers={peer.topic: peer}, kafka=kafka,
                                 started_ms=started, start_up=StartUp())
        families = itertools.islice(BridgeCollector(bridge).collect(), 6)  # type: ignore[arg-type]
        series[role] = [(s.name, s.value) for f in families for s in f.samples
                        if f.name.startswith(("zkbridge_lag", "zkbridge_heartbeat"))]
    leader = dict(series["leader"])
    assert 89 < leader["zkbridge_heartbeat_age_seconds"] < 100
    assert 89 < leader["zkbridge_lag_seconds"] < 100
    assert {s[0] for s in series["leader"]} == {"zkbridge_lag_events", "zkbridge_lag_seconds",
                                                  "zkbridge_heartbeat_age_seconds"}
    # A standby reads no peer topic: no series, rather than ages growing from its start.
    assert series["standby"] == []


def test_silence_is_not_judged_before_the_term_caught_up() -> None:
    """A restart after a long stop: the carried-over heartbeats are old until the first fetch."""
    now = now_ms()
    rep, peer = reporter(started_ms=now - 600_000)
    peer.last_heartbeat_ms = now - 600_000
    rep.bridge.inbound.caught_up.clear()
    with capture_logs() as logs:
        rep._note_silent(as_status(peer), now)
        assert logs == []
        peer.last_heartbeat_ms = now - 300  # the backlog's heartbeats read
        rep.bridge.inbound.caught_up.set()
        rep._note_silent(as_status(peer), now)
    assert logs == []
