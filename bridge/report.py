"""Read-only views for operators: ``zkbridge status`` and ``zkbridge conflicts``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bridge import certexpiry, stateaccess, statecodec
from bridge.config import Settings
from bridge.model import Conflict, Version
from bridge.outbox import outbox_depth
from bridge.positions import read_positions
from bridge.reporter import read_status
from bridge.status import Status, now_ms
from bridge.store import Layout
from bridge.verdict import STALE_RECORD_S, events_behind, judge
from bridge.zk import ZooKeeper


async def read_overview(settings: Settings, config: str = "FILE") -> dict[str, Any]:
    """Everything ``status`` shows; ``config`` is the path quoted in suggested commands."""
    zk = ZooKeeper(settings.zookeeper, read_only=True)
    await stateaccess.start_checked(zk, settings)
    try:
        state = settings.state_path
        status = await read_status(zk, settings)
        members = []
        for name in await zk.children(f"{state}/members") or []:
            node = await zk.get(f"{state}/members/{name}")
            if node is not None:
                members.append(json.loads(node.data or b"{}"))
        candidates = sorted(await zk.children(f"{state}/election") or [],
                            key=lambda n: n.rsplit("-", 1)[-1])
        leader = None
        if candidates:
            node = await zk.get(f"{state}/election/{candidates[0]}")
            leader = node.data.decode() if node else None
        epoch = await zk.exists(f"{state}/epoch")
        subtrees: dict[str, dict[str, Any]] = {}
        for st in settings.subtrees:
            layout = Layout(state, st.name, st.path)
            subtrees[st.name] = {
                "mount": st.path,
                "outbox": await outbox_depth(zk, layout),
                "positions": {p: await read_positions(zk, layout, p) for p in settings.peers},
            }
        now = now_ms()
        age = (now - status.updated_ms) / 1000 if status else None
        fresh = status is not None and age is not None and age < STALE_RECORD_S
        verdict = judge(
            region=settings.region, config=config, leader=leader,
            status=status, outbox={n: st["outbox"] for n, st in subtrees.items()},
            heartbeat_interval=settings.heartbeat_interval, now_ms=now,
            unit=f"zkbridge@{Path(config).stem}",
        )
        return {
            "region": settings.region,
            "verdict": verdict.as_dict(),
            "leader": leader,
            "epoch": epoch.version if epoch else None,
            "bridges": [{"identity": m.get("identity"),
                         "role": "leader" if m.get("identity") == leader else "standby"}
                        for m in members],
            "status_age_seconds": age,
            "health": (status.health if status and fresh
                       else "unknown (no fresh status record: is a bridge running?)"),
            "counters": dict(status.counters) if status else {},
            "oversized": dict(status.oversized) if status else {},
            "held_back": dict(status.held_back) if status else {},
            "recent_errors": list(status.errors) if status else [],
            "incidents": list(status.incidents) if status else [],
            "waiting": dict(status.waiting) if status and fresh else {},
            "subtrees": subtrees,
            "state": dict(status.state) if status and fresh else {},
            "certificates": dict(status.certificates) if status and fresh else {},
            "peers": _peers(status, now) if fresh else [],
        }
    finally:
        await zk.stop()


def _peers(status: Status | None, now: int) -> list[dict[str, Any]]:
    """Per (subtree, peer), from the leader's record: what it had applied and when."""

    def age(at_ms: int) -> float | None:
        return round((now - at_ms) / 1000, 1) if at_ms else None

    return [{"subtree": p.subtree, "peer": p.peer, "events_behind": events_behind(p),
             "last_applied_seconds": age(p.last_applied_ms),
             "last_event_seconds": age(p.last_event_ms),
             "heartbeat_age_seconds": age(p.last_heartbeat_ms)}
            for p in (status.peers if status else ())]


def _unknown(state: dict[str, Any], origin: str) -> str:
    """An unknown stable prefix, with who it waits on (absent in an older leader's record)."""
    who = state.get("stable_prefix_waiting_on", {}).get(origin)
    return f"unknown (no report from {', '.join(who)} yet)" if who else "unknown"


def _ago(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f}s ago"


def render_status(o: dict[str, Any]) -> str:
    lines = [o["verdict"]["line"], "",
             f"region   {o['region']}",
             f"leader   {o['leader'] or 'none'} (epoch {o['epoch']})",
             f"health   {o['health']}"]
    if o["status_age_seconds"] is not None:
        lines.append(f"status   written {o['status_age_seconds']:.1f}s ago")
    lines.append("bridges  " + (", ".join(f"{b['identity']} ({b['role']})" for b in o["bridges"])
                                or "none running"))
    for name, st in o["subtrees"].items():
        lines.append(f"subtree  {name} at {st['mount']}: outbox {st['outbox']}")
        state = o.get("state", {}).get(name)
        if state:
            ages = ", ".join(
                f"{r} {_unknown(state, r) if a is None else f'{a:.0f}s'}"
                for r, a in sorted(state["stable_prefix_age_seconds"].items()))
            lines.append(f"  tombstones {state['tombstones']} held, "
                         f"{state['tombstones_collected']} collected; null records "
                         f"{state.get('nulls_published', 0)} published, "
                         f"{state.get('nulls_applied', 0)} applied; oldest outbox entry "
                         f"{state['outbox_age_seconds']:.0f}s; stable prefix age: {ages}")
            if state.get("joining"):
                lines.append(f"  joining {', '.join(state['joining'])}: "
                             f"{state.get('joining_set_aside', 0)} znodes set aside, "
                             "published once the peers' versions are read, if none has one")
            if state.get("outbox_overflowed"):
                lines.append(f"  outbox OVERFLOWED ({state.get('outbox_megabytes', '?')} MB "
                             "counted): changes wait in the metadata; they are published "
                             "again once Kafka is back")
        live = {p["peer"]: p for p in o["peers"] if p["subtree"] == name}
        for peer, pos in st["positions"].items():
            shown = ", ".join(f"p{p}@{off}" for p, off in sorted(pos.items())) or "not started"
            line = f"  from {peer}: applied up to {shown}"
            if peer in live:
                p = live[peer]
                applied = ("not reported" if p["last_applied_seconds"] is None
                           else _ago(p["last_applied_seconds"]))
                line += (f"; {p['events_behind']} behind; last batch applied {applied}; "
                         f"heartbeat {_ago(p['heartbeat_age_seconds'])}")
            lines.append(line)
    for key, not_after in sorted(o.get("certificates", {}).items()):
        lines.append(f"cert     {key} expires {certexpiry.when(not_after)}")
    if o["counters"]:
        lines.append("counters " + ", ".join(f"{k}={v}" for k, v in sorted(o["counters"].items())))
    for problem in o["verdict"]["problems"][1:]:
        lines.append(f"also     {problem['kind']}: {problem['text']} -> {problem['look']}")
    for name, paths in o["held_back"].items():
        if paths:
            lines.append(f"held back in {name}: {', '.join(paths[:10])}")
    for name, paths in o["oversized"].items():
        if paths:
            lines.append(f"oversized in {name}: {', '.join(paths[:10])}")
    for at, w in o.get("waiting", {}).items():
        lines.append(f"waiting  {at}: events from {w.get('peer')} stamped "
                     f"{w.get('ahead_seconds')}s ahead (max_clock_skew); if the record is "
                     f"bad: zkbridge skip -c CONFIG --topic {w.get('topic')} "
                     f"--partition {w.get('partition')} --offset {w.get('offset')}")
    if o.get("incidents"):
        lines.append("incidents (what happened to the data, and what the bridge did):")
        for e in o["incidents"][-10:]:
            when = time.strftime("%H:%M:%S", time.gmtime(int(e.get("at_ms", 0)) / 1000))
            lines.append(f"  {when}Z {e.get('kind')}: {e.get('text')}")
    if o["recent_errors"]:
        lines.append("recent errors:")
        for e in o["recent_errors"][-10:]:
            when = time.strftime("%H:%M:%S", time.gmtime(int(e.get("at_ms", 0)) / 1000))
            lines.append(f"  {when}Z {e.get('what')}: {e.get('error')}")
    return "\n".join(lines)


async def read_conflicts(settings: Settings, limit: int) -> list[Conflict]:
    zk = ZooKeeper(settings.zookeeper, read_only=True)
    await stateaccess.start_checked(zk, settings)
    try:
        out: list[Conflict] = []
        for st in settings.subtrees:
            layout = Layout(settings.state_path, st.name, st.path)
            names = sorted(await zk.children(layout.conflicts) or [])[-limit:]
            for name in names:
                node = await zk.get(f"{layout.conflicts}/{name}")
                if node is not None:
                    out.append(statecodec.decode_conflict(node.data))
        return sorted(out, key=lambda c: c.at_ms, reverse=True)[:limit]
    finally:
        await zk.stop()


def _version(v: Version) -> dict[str, Any]:
    return {"writer": v.writer, "ts": v.ts, "vc": v.vc.as_dict(), "deleted": v.deleted,
            "hash": v.data_hash.hex()}


def conflict_dict(c: Conflict) -> dict[str, Any]:
    return {"subtree": c.subtree, "path": c.path, "at_ms": c.at_ms, "winner": c.winner,
            "rule": c.rule, "local": _version(c.local), "remote": _version(c.remote),
            "merged": c.merged.as_dict()}


def render_conflicts(found: list[Conflict]) -> str:
    if not found:
        return "no conflicts recorded"
    lines = []
    for c in found:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(c.at_ms / 1000))
        win = c.local if c.winner == "local" else c.remote
        lines.append(f"{when}Z {c.subtree}:{c.path}  winner {c.winner} ({win.writer}) by {c.rule}")
        for side, v in (("local ", c.local), ("remote", c.remote)):
            what = "delete" if v.deleted else f"put #{v.data_hash.hex()[:8]}"
            lines.append(f"    {side} {v.writer:10} {what:14} ts={v.ts} vc={v.vc}")
    return "\n".join(lines)
