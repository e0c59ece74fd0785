"""The one line at the top of ``zkbridge status``: healthy, or what is wrong and where to look.

Pure: it judges what ``status`` already read (the leader's status record, the
election, the outbox) at a given instant, so the rules are unit-tested
without servers. Problems come out worst first; the first one is the verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bridge.certexpiry import when
from bridge.status import (
    INCIDENT_S,
    STATUS_INTERVAL,
    PeerStatus,
    Status,
    heard_elsewhere,
    silent_for,
)

# The leader rewrites the record every STATUS_INTERVAL: this many missed
# rewrites means it is stuck, gone, or cut off from its ensemble.
STALE_RECORD_S = 15 * STATUS_INTERVAL
# Events waiting while nothing was applied for this long: the inbound pipeline
# is stuck rather than busy.
STUCK_APPLY_S = 30.0
# Fewer waiting events are traffic in flight between two fetches, not a backlog.
BACKLOG_EVENTS = 100
RECENT_ERROR_S = 60.0
OUTBOX_HIGH = 1000
# A client certificate this close to its expiry is due for renewal (compose/alerts.yml
# warns as early).
CERTIFICATE_DAYS = 14


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str  # a short upper-case tag: DOWN, STALE, STUCK, SILENT, ...
    text: str  # what is wrong, with the numbers
    look: str  # the command to run next


@dataclass(frozen=True, slots=True)
class Verdict:
    healthy: bool
    line: str
    problems: tuple[Problem, ...]

    def as_dict(self) -> dict[str, object]:
        return {"healthy": self.healthy, "line": self.line,
                "problems": [{"kind": p.kind, "text": p.text, "look": p.look}
                             for p in self.problems]}


def events_behind(p: PeerStatus) -> int:
    """Records the leader's consumer had seen on the peer's topic but not applied.

    A position above the topic's end means the topic lost records: everything
    in it is then still to be read (the bridge rewinds), never a negative or
    a zero backlog.
    """
    total = 0
    for part, end in p.highwater.items():
        pos = p.positions.get(part, 0)
        total += end if pos > end else end - pos
    return total


def _age(now_ms: int, at_ms: int) -> float | None:
    return (now_ms - at_ms) / 1000 if at_ms else None


def judge(
    *,
    region: str,
    config: str,
    leader: str | None,
    status: Status | None,
    outbox: Mapping[str, int],
    heartbeat_interval: float,
    now_ms: int,
    unit: str,
) -> Verdict:
    """Problems worst first. ``config`` and ``unit`` go into the suggested commands."""
    logs = f"journalctl -u {unit} -n 100"
    lag = f"zkbridge lag -c {config} --watch"
    problems: list[Problem] = []
    age = _age(now_ms, status.updated_ms) if status else None
    fresh = status is not None and age is not None and age < STALE_RECORD_S
    if leader is None:
        problems.append(Problem(
            "DOWN", f"no bridge is leading in {region}: nothing is captured or applied",
            f"systemctl status {unit}; {logs}"))
    elif not fresh:
        shown = "never written" if age is None else f"{age:.0f}s old"
        problems.append(Problem(
            "STALE", f"leader {leader} is not reporting (status record {shown}): "
            "stuck, or cut off from ZooKeeper", logs))
    elif status is not None and status.starting:
        since = _age(now_ms, status.starting_since_ms)
        took = f" for {since:.0f}s" if since is not None else ""
        problems.append(Problem(
            "STARTING", f"leader {leader} is starting{took}: {'; '.join(status.starting)}",
            logs))
    # A starting leader has not read its peers' heartbeats and positions up to
    # now: what it carried over from before would read as silence.
    peers = status.peers if status and fresh and not status.starting else ()
    problems += _peer_problems(peers, status.started_ms if status else 0, heartbeat_interval,
                               now_ms, lag)
    if status is not None:
        problems += _incident_problems(status, now_ms, logs)
    if status is not None and fresh and status.clock:
        problems.append(Problem("CLOCK", status.clock, "timedatectl; chronyc tracking"))
    if status is not None and fresh:
        recent = [e for e in status.errors
                  if now_ms - int(e.get("at_ms", 0)) < RECENT_ERROR_S * 1000]
        if recent:
            last = recent[-1]
            problems.append(Problem(
                "ERRORS", f"{len(recent)} error(s) in the last minute, latest "
                f"{last.get('what')}: {last.get('error')}", logs))
        problems += _held_problems(status.held_back, logs)
        oversized = sum(len(v) for v in status.oversized.values())
        if oversized:
            problems.append(Problem(
                "OVERSIZED", f"{oversized} znode(s) too large to replicate (listed below)",
                f"zkbridge status -c {config} --json"))
        problems += _certificate_problems(status.certificates, now_ms,
                                          f"zkbridge check-config -c {config}")
    for subtree, state in sorted((status.state if status and fresh else {}).items()):
        if state.get("outbox_overflowed"):
            problems.append(Problem(
                "OVERFLOWED", f"the outbox of {subtree} reached outbox_max_mb "
                f"({state.get('outbox_megabytes', '?')} MB now): changes wait in the metadata "
                "only, and the whole state is published again once Kafka has taken the "
                "outbox below half of it", lag))
    for subtree, depth in sorted(outbox.items()):
        if depth > OUTBOX_HIGH:
            problems.append(Problem(
                "OUTBOX", f"{depth} local changes in {subtree} not yet published: "
                "Kafka slow or unreachable from here", lag))
    if problems:
        first = problems[0]
        more = f" (+{len(problems) - 1} more below)" if len(problems) > 1 else ""
        return Verdict(False, f"{first.kind}: {first.text}{more} -> {first.look}",
                       tuple(problems))
    return Verdict(True, _healthy_line(leader, peers, now_ms), ())


def _certificate_problems(certificates: Mapping[str, float], now_ms: int,
                          look: str) -> list[Problem]:
    """A client certificate or CA file that expired (refused at the next connection,
    and the bridge then stops or waits) or is due for renewal."""
    out = []
    for key, not_after in sorted(certificates.items(), key=lambda kv: kv[1]):
        at = when(not_after)
        days = (not_after * 1000 - now_ms) / 86_400_000
        if days <= 0:
            out.append(Problem(
                "CERT_EXPIRED", f"{key} expired at {at}: refused at the next "
                "connection; renew the file in place, then restart the bridge", look))
        elif days < CERTIFICATE_DAYS:
            out.append(Problem(
                "CERT_EXPIRING", f"{key} expires in {days:.1f} days ({at}): renew the "
                "file in place, then restart the bridge", look))
    return out


def held_reasons(held_back: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """How many znodes are held back for each reason, from the status record's
    ``"<path> (<reason>)"`` entries."""
    counts: dict[str, int] = {}
    for entries in held_back.values():
        for entry in entries:
            _, _, why = entry.rpartition(" (")
            reason = why.rstrip(")") or "?"
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def _held_problems(held_back: Mapping[str, Sequence[str]], logs: str) -> list[Problem]:
    """Znodes left out of replication until someone acts: the regions differ there."""
    counts = held_reasons(held_back)
    if not counts:
        return []
    total = sum(counts.values())
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
    return [Problem(
        "HELD_BACK", f"{total} znode(s) held back ({why}): not replicated, the regions "
        "differ there until they are readable and writable (listed below)",
        f"{logs} | grep znode_held_back (each names its fix)")]


# Worst first: a collision needs an operator; a topic reset heals by itself.
_INCIDENT_ORDER = ("COLLISION", "TOPIC_RESET", "REANNOUNCED")


def _incident_problems(status: Status, now_ms: int, logs: str) -> list[Problem]:
    """The latest recent incident of each kind (they stay INCIDENT_S after the last one)."""
    latest: dict[str, Mapping[str, object]] = {}
    counts: dict[str, int] = {}
    for inc in status.incidents:
        if now_ms - int(str(inc.get("at_ms", 0))) >= INCIDENT_S * 1000:
            continue
        kind = str(inc.get("kind", "INCIDENT"))
        latest[kind] = inc
        counts[kind] = counts.get(kind, 0) + 1
    order = {k: i for i, k in enumerate(_INCIDENT_ORDER)}
    out = []
    for kind in sorted(latest, key=lambda k: order.get(k, len(order))):
        n = counts[kind]
        more = f" ({n} in the last {INCIDENT_S / 60:.0f} min)" if n > 1 else ""
        out.append(Problem(kind, f"{latest[kind].get('text')}{more}", logs))
    return out


def _peer_problems(peers: Sequence[PeerStatus], started_ms: int, heartbeat_interval: float,
                   now_ms: int, lag: str) -> list[Problem]:
    stuck, silent, catching = [], [], []
    for p in peers:
        behind = events_behind(p)
        applied = _age(now_ms, p.last_applied_ms)
        name = f"{p.peer} ({p.subtree})"
        if behind and applied is not None and applied > STUCK_APPLY_S:
            stuck.append(Problem(
                "STUCK", f"{behind} events from {name} waiting, nothing applied for "
                f"{applied:.0f}s", lag))
        elif behind >= BACKLOG_EVENTS:
            catching.append(Problem("BEHIND", f"{behind} events from {name} not applied yet",
                                    lag))
        quiet = silent_for(p, started_ms, heartbeat_interval, now_ms)
        if quiet is None:
            continue
        since = (f"for {quiet:.0f}s" if p.last_heartbeat_ms
                 else f"since this bridge started {quiet:.0f}s ago")
        if (cause := heard_elsewhere(p, peers, heartbeat_interval, now_ms)):
            silent.append(Problem(
                "SILENT", f"no heartbeat from {name} {since}: {cause}",
                f"zkbridge status in {p.peer}; the subtrees of its configuration"))
        elif p.last_heartbeat_ms:
            silent.append(Problem(
                "SILENT", f"no heartbeat from {name} {since}: its bridge or its link to "
                "Kafka is down", f"zkbridge status in {p.peer}; {lag}"))
        else:
            silent.append(Problem(
                "SILENT", f"no heartbeat from {name} {since}: its bridge never ran or cannot "
                "reach Kafka, or `peers` names a region that does not exist",
                f"zkbridge status in {p.peer}; the peers' region names"))
    return stuck + silent + catching


def _healthy_line(leader: str | None, peers: Sequence[PeerStatus], now_ms: int) -> str:
    if not peers:
        return f"HEALTHY: {leader} leads; no peers to apply from"
    names = sorted({p.peer for p in peers})
    heartbeats = [a for p in peers if (a := _age(now_ms, p.last_heartbeat_ms)) is not None]
    newest = f", oldest heartbeat {max(heartbeats):.1f}s" if heartbeats else ""
    return f"HEALTHY: {leader} leads, caught up with {', '.join(names)}{newest}"
