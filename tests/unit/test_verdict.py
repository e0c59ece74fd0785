"""The verdict line of ``zkbridge status`` and the status record's new field."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from bridge.status import PeerStatus, Status, health
from bridge.verdict import BACKLOG_EVENTS, STALE_RECORD_S, STUCK_APPLY_S, judge

NOW = 1_800_000_000_000


def peer(name: str = "eu-west", *, behind: int = 0, applied_s: float | None = 0.5,
         heartbeat_s: float | None = 1.0) -> PeerStatus:
    return PeerStatus(
        subtree="critical", peer=name, topic=f"zkbridge.critical.{name}",
        positions={0: 500}, highwater={0: 500 + behind},
        last_heartbeat_ms=0 if heartbeat_s is None else NOW - int(heartbeat_s * 1000),
        last_event_ms=NOW - 5000,
        last_applied_ms=0 if applied_s is None else NOW - int(applied_s * 1000),
    )


def record(*peers: PeerStatus, age_s: float = 1.0, **kw: Any) -> Status:
    base = Status(region="us-east", identity="host:1", epoch=3, role="leader", health="ok",
                  started_ms=NOW - 60_000, updated_ms=NOW - int(age_s * 1000), counters={},
                  outbox={"critical": 0}, oversized={"critical": []}, peers=peers)
    return replace(base, **kw)


def verdict(status: Status | None, *, leader: str | None = "host:1",
            outbox: int = 0) -> Any:
    return judge(region="us-east", config="/etc/zkbridge/us-east.yaml", leader=leader,
                 status=status, outbox={"critical": outbox}, heartbeat_interval=5.0,
                 now_ms=NOW, unit="zkbridge@us-east")


def test_healthy_names_the_leader_and_the_peers() -> None:
    v = verdict(record(peer("eu-west"), peer("ap-south", heartbeat_s=2.5)))
    assert v.healthy and not v.problems
    assert v.line == ("HEALTHY: host:1 leads, caught up with ap-south, eu-west, "
                      "oldest heartbeat 2.5s")


def test_no_leader_is_down_and_points_at_the_service() -> None:
    v = verdict(None, leader=None)
    assert not v.healthy and v.problems[0].kind == "DOWN"
    assert "systemctl status zkbridge@us-east" in v.line


def test_a_leader_that_stopped_writing_its_record_is_stale() -> None:
    v = verdict(record(peer(), age_s=STALE_RECORD_S + 5))
    assert [p.kind for p in v.problems] == ["STALE"]
    assert "35s old" in v.line and "journalctl -u zkbridge@us-east" in v.line
    # The peers of a stale record are not judged: its numbers are old.
    assert verdict(record(peer(behind=5000, applied_s=600), age_s=99)).problems[0].kind == "STALE"


def test_waiting_events_with_nothing_applied_is_stuck() -> None:
    v = verdict(record(peer(behind=3, applied_s=STUCK_APPLY_S + 10)))
    assert v.problems[0].kind == "STUCK"
    assert "3 events from eu-west (critical) waiting, nothing applied for 40s" in v.line
    assert v.line.endswith("-> zkbridge lag -c /etc/zkbridge/us-east.yaml --watch")


def test_a_backlog_being_applied_is_behind_but_a_few_in_flight_are_not() -> None:
    assert verdict(record(peer(behind=BACKLOG_EVENTS - 1, applied_s=0.2))).healthy
    v = verdict(record(peer(behind=BACKLOG_EVENTS + 400, applied_s=0.2)))
    assert v.problems[0].kind == "BEHIND" and "500 events" in v.line


def test_unknown_last_applied_never_claims_stuck() -> None:
    v = verdict(record(peer(behind=5, applied_s=None)))
    assert v.healthy, v.line


def test_silent_peer_after_ten_heartbeats() -> None:
    assert verdict(record(peer(heartbeat_s=49))).healthy
    v = verdict(record(peer(heartbeat_s=51)))
    assert v.problems[0].kind == "SILENT" and "no heartbeat from eu-west" in v.line


def test_a_peer_never_heard_is_silent_once_the_bridge_waited_ten_heartbeats() -> None:
    # A peer whose bridge never ran, or a name in `peers` no region has.
    never = peer("eu-wset", heartbeat_s=None)
    assert verdict(record(never, started_ms=NOW - 49_000)).healthy
    v = verdict(record(never, started_ms=NOW - 51_000))
    assert [p.kind for p in v.problems] == ["SILENT"]
    assert v.line.startswith("SILENT: no heartbeat from eu-wset (critical) since this bridge "
                             "started 51s ago") and "names a region that does not exist" in v.line
    # The record's own health agrees.
    assert health((), (never,), 5.0, now=NOW, started_ms=NOW - 51_000) == "degraded"
    assert health((), (never,), 5.0, now=NOW, started_ms=NOW - 49_000) == "ok"
    assert health((), (never,), 5.0, now=NOW) == "ok"  # an older record: no start known


def test_worst_problem_first_and_the_rest_counted() -> None:
    errors = ({"at_ms": NOW - 5000, "what": "apply", "error": "boom"},
              {"at_ms": NOW - 3_600_000, "what": "old", "error": "gone"})
    v = verdict(record(peer(heartbeat_s=300), errors=errors), outbox=5000)
    assert [p.kind for p in v.problems] == ["SILENT", "ERRORS", "OUTBOX"]
    assert v.line.startswith("SILENT: ") and "(+2 more below)" in v.line
    assert "1 error(s) in the last minute, latest apply: boom" in v.problems[1].text


def test_oversized_znodes_are_a_problem() -> None:
    v = verdict(record(peer(), oversized={"critical": ["/big", "/bigger"]}))
    assert v.problems[0].kind == "OVERSIZED" and "2 znode(s)" in v.line


def test_held_back_znodes_are_a_problem_counted_by_reason() -> None:
    # Before, status said HEALTHY while paths were held back and the regions
    # differed there.
    held = {"critical": ["/a (write)", "/b (quota)", "/odd (name) (write)"], "other": []}
    v = verdict(record(peer(), held_back=held, oversized={"critical": ["/big"]}))
    assert [p.kind for p in v.problems] == ["HELD_BACK", "OVERSIZED"]
    assert v.line.startswith("HELD_BACK: 3 znode(s) held back (1 quota, 2 write)")
    assert "journalctl -u zkbridge@us-east" in v.problems[0].look
    assert "znode_held_back" in v.problems[0].look
    assert verdict(record(peer(), held_back={"critical": []})).healthy
    # A stale record's list is not judged: the leader may have applied them since.
    stale = verdict(record(peer(), held_back=held, age_s=STALE_RECORD_S + 5))
    assert [p.kind for p in stale.problems] == ["STALE"]


def test_client_certificates_due_for_renewal_or_expired_are_problems() -> None:
    day_s = 86_400
    now_s = NOW / 1000
    certs = {"kafka.ssl.certfile": now_s + 3.5 * day_s,
             "zookeeper.tls.certfile": now_s - 60.0}
    v = verdict(record(peer(), certificates=certs))
    assert [p.kind for p in v.problems] == ["CERT_EXPIRED", "CERT_EXPIRING"]
    assert v.line.startswith("CERT_EXPIRED: zookeeper.tls.certfile expired at "
                             "2027-01-15T07:59:00Z: refused at the next connection")
    assert "kafka.ssl.certfile expires in 3.5 days" in v.problems[1].text
    assert v.problems[0].look == "zkbridge check-config -c /etc/zkbridge/us-east.yaml"
    # Further off than the alert's 14 days: healthy; a record without the field reads so.
    assert verdict(record(peer(), certificates={"kafka.ssl.certfile":
                                                now_s + 15 * day_s})).healthy
    back = Status.decode(record(peer(), certificates=certs).encode())
    assert back is not None and back.certificates == certs
    doc = json.loads(record(peer()).encode())
    del doc["certificates"]
    old = Status.decode(json.dumps(doc).encode())
    assert old is not None and old.certificates == {}


def test_last_applied_round_trips_and_old_records_still_read() -> None:
    st = record(peer(applied_s=2.0))
    back = Status.decode(st.encode())
    assert back is not None and back.peers[0].last_applied_ms == NOW - 2000
    doc = json.loads(st.encode())
    del doc["peers"][0]["last_applied_ms"]
    old = Status.decode(json.dumps(doc).encode())
    assert old is not None and old.peers[0].last_applied_ms == 0


def test_a_starting_leader_says_what_it_is_doing_and_is_not_judged_by_old_peers() -> None:
    doing = ("scanning critical: 40,000 znodes and metadata records read",
             "connecting to Kafka and checking the topics")
    # Its carried-over heartbeats are as old as the bridge was away: not silence.
    st = record(peer(heartbeat_s=600, behind=5000, applied_s=600), health="starting",
                starting=doing, starting_since_ms=NOW - 42_000)
    v = verdict(st)
    assert [p.kind for p in v.problems] == ["STARTING"] and not v.healthy
    assert v.line.startswith("STARTING: leader host:1 is starting for 42s: scanning critical: "
                             "40,000 znodes and metadata records read; connecting to Kafka")
    assert "journalctl -u zkbridge@us-east" in v.line
    back = Status.decode(st.encode())
    assert back is not None and back.starting == doing and back.starting_since_ms == NOW - 42_000
    # A record an older bridge wrote has no such fields: ready.
    doc = json.loads(record(peer()).encode())
    del doc["starting"], doc["starting_since_ms"]
    old = Status.decode(json.dumps(doc).encode())
    assert old is not None and old.starting == () and verdict(old).healthy
    # A starting record that stopped being rewritten is stale like any other.
    assert verdict(replace(st, updated_ms=NOW - 99_000)).problems[0].kind == "STALE"


@pytest.mark.parametrize("kind", ["DOWN", "STALE", "STARTING", "STUCK", "SILENT", "OUTBOX"])
def test_every_problem_suggests_a_command(kind: str) -> None:
    cases = {
        "DOWN": verdict(None, leader=None),
        "STALE": verdict(None),
        "STARTING": verdict(record(starting=("scanning",), starting_since_ms=NOW - 1000)),
        "STUCK": verdict(record(peer(behind=1, applied_s=99))),
        "SILENT": verdict(record(peer(heartbeat_s=999))),
        "OUTBOX": verdict(record(peer()), outbox=10_000),
    }
    v = cases[kind]
    assert v.problems[0].kind == kind
    assert v.problems[0].look.split()[0] in {"zkbridge", "systemctl", "journalctl"}


# -- incidents: topic loss and clock collisions ---------------------------------------


def test_a_position_above_the_end_counts_the_whole_topic_never_negative() -> None:
    from bridge.verdict import events_behind

    lost = replace(peer(), positions={0: 500}, highwater={0: 12})
    assert events_behind(lost) == 12  # all of the new topic, not -488 and not 0
    assert events_behind(replace(peer(), positions={0: 500}, highwater={0: 0})) == 0


def test_incidents_degrade_worst_first_then_expire() -> None:
    from bridge.status import INCIDENT_S, health

    incidents = (
        {"at_ms": NOW - 5000, "kind": "TOPIC_RESET", "text": "zkbridge.critical.eu-west[0] "
         "lost records (position 500 is above the end offset 12); rewound to offset 0"},
        {"at_ms": NOW - 3000, "kind": "COLLISION", "text": "event from eu-west for "
         "critical:/x has the clock {eu-west:1} of the local version but different content"},
        {"at_ms": NOW - 1000, "kind": "COLLISION", "text": "second"},
    )
    v = verdict(record(peer(), incidents=incidents))
    assert not v.healthy
    assert [p.kind for p in v.problems] == ["COLLISION", "TOPIC_RESET"]
    assert v.problems[0].text == "second (2 in the last 10 min)"
    assert v.line.startswith("COLLISION: second")
    assert health((), (), 5.0, now=NOW, incidents=incidents) == "degraded"
    later = NOW + int(INCIDENT_S * 1000)
    assert health((), (), 5.0, now=later, incidents=incidents) == "ok"
    assert verdict(record(peer(), incidents=incidents[:1], updated_ms=NOW - 1000)).problems


def test_incidents_survive_the_status_record_roundtrip() -> None:
    inc = ({"at_ms": NOW, "kind": "REANNOUNCED", "text": "own topic lost records"},)
    decoded = Status.decode(record(peer(), incidents=inc).encode())
    assert decoded is not None and tuple(decoded.incidents) == inc
    old = json.loads(record(peer()).encode())
    del old["incidents"]  # a record written before incidents existed
    legacy = Status.decode(json.dumps(old).encode())
    assert legacy is not None and legacy.incidents == ()


def test_an_overflowed_outbox_is_a_problem_for_as_long_as_it_lasts() -> None:
    state = {"critical": {"outbox_overflowed": True, "outbox_megabytes": 201.5}}
    v = verdict(record(peer(), state=state))
    assert [p.kind for p in v.problems] == ["OVERFLOWED"]
    assert "201.5 MB" in v.line and "zkbridge lag" in v.line
    # Older records have no such field; a record after the re-announce says False.
    assert verdict(record(peer(), state={"critical": {"outbox_overflowed": False}})).healthy
    assert health((), (), 5.0, now=NOW, overflowed=True) == "degraded"


def test_a_peer_silent_on_one_subtree_but_heard_on_another_is_named_for_its_config() -> None:
    """Its bridge runs and reaches Kafka: the subtree is missing from its configuration
    (taken out, or not added there yet), or its topic refuses it; not "down"."""
    heard = peer("eu-west", heartbeat_s=1.0)
    away = replace(peer("eu-west", heartbeat_s=120), subtree="flags",
                   topic="zkbridge.flags.eu-west")
    v = verdict(record(heard, away))
    assert [p.kind for p in v.problems] == ["SILENT"]
    assert v.line.startswith("SILENT: no heartbeat from eu-west (flags) for 120s: eu-west is "
                             "heard on critical, so its bridge runs: `flags` is missing from "
                             "its configuration, or it cannot write that subtree's topic")
    assert "the subtrees of its configuration" in v.line
    never = replace(away, last_heartbeat_ms=0)
    v = verdict(record(heard, never, started_ms=NOW - 51_000))
    assert "since this bridge started 51s ago: eu-west is heard on critical" in v.line
    # Silent everywhere: down, as before.
    v = verdict(record(replace(heard, last_heartbeat_ms=NOW - 120_000), away))
    assert "its bridge or its link to Kafka is down" in v.line
    # Its bridge just went down: the other subtree's last heartbeat, a little
    # younger, is not silent yet but not fresh either (3 intervals: 15 s here).
    going = replace(away, last_heartbeat_ms=NOW - 51_000)
    v = verdict(record(replace(heard, last_heartbeat_ms=NOW - 46_000), going))
    assert [p.kind for p in v.problems] == ["SILENT"]
    assert "its bridge or its link to Kafka is down" in v.line
