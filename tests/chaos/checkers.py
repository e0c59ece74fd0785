"""The checkers: what must hold once the faults stopped and the cluster healed.

Each returns a `Check` (name, passed, one-line summary, details). They read
the servers with their own clients: the bridge's `verify` is not the judge
of the bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge import codec, statecodec
from bridge.clock import hlc_to_ms
from bridge.layout import Layout
from tests.chaos.nemesis import Excluded
from tests.chaos.topology import (
    MOUNT,
    REGIONS,
    REPO,
    STATE_PATH,
    SUBTREE,
    Cluster,
    zk_client,
)
from tests.chaos.workload import History, Op

# A write this long before an exclude may still have been uncaptured (its bridge
# down or paused by another fault) when it took effect, and so held back too.
HELD_MARGIN_S = 30.0
META_ROOT = f"{STATE_PATH}/subtrees/{SUBTREE}/meta"
# Logged by a healthy bridge under faults only as warnings; any error-level
# line or one of these is a finding.
BAD_EVENTS = {"task_failed", "bridge_stopped", "event_rejected", "znode_oversized",
              "mass_delete_refused", "event_oversized"}


@dataclass
class Check:
    name: str
    passed: bool
    summary: str
    details: list[Any] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "summary": self.summary,
                "details": self.details[:200]}


# -- reading a region ----------------------------------------------------------

@dataclass
class Snapshot:
    data: dict[str, bytes]  # rel -> bytes, persistent znodes under the mount
    children: dict[str, list[str]]  # rel -> sorted persistent children
    ephemerals: list[str]
    meta: dict[str, dict[str, Any]]  # rel -> decoded metadata (None entries skipped)


def snapshot(hosts: str) -> Snapshot:
    with zk_client(hosts) as client:
        client.sync(MOUNT)
        data: dict[str, bytes] = {}
        children: dict[str, list[str]] = {}
        ephemerals: list[str] = []

        def walk(rel: str) -> None:
            path = MOUNT + rel if rel != "/" else MOUNT
            kids = []
            for child in sorted(client.get_children(path)):
                crel = f"{rel}/{child}" if rel != "/" else f"/{child}"
                got, stat = client.get(MOUNT + crel)
                if stat.ephemeralOwner:
                    ephemerals.append(crel)
                    continue
                kids.append(child)
                data[crel] = got
                walk(crel)
            children[rel] = kids

        walk("/")
        meta: dict[str, dict[str, Any]] = {}

        def walk_meta(rel: str) -> None:
            path = META_ROOT + (rel if rel != "/" else "")
            raw, _ = client.get(path)
            m = statecodec.decode_meta(raw)
            if m is not None:
                meta[rel] = {"vc": dict(sorted(m.vc.as_dict().items())),
                             "h": m.data_hash.hex(), "d": m.deleted, "w": m.writer,
                             "ts": m.ts, "ph": m.placeholder}
            for child in sorted(client.get_children(path)):
                walk_meta(f"{rel}/{child}" if rel != "/" else f"/{child}")

        if client.exists(META_ROOT):
            walk_meta("/")
        return Snapshot(data, children, ephemerals, meta)


def snapshots(cluster: Cluster) -> dict[str, Snapshot]:
    return {r: snapshot(cluster.regions[r].ensemble.hosts) for r in REGIONS}


def differences(snaps: dict[str, Snapshot]) -> list[str]:
    out: list[str] = []
    base_name = REGIONS[0]
    base = snaps[base_name]
    for r in REGIONS[1:]:
        other = snaps[r]
        for what, a, b in (("data", base.data, other.data),
                           ("children", base.children, other.children),
                           ("meta", base.meta, other.meta)):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    out.append(f"{what} {key}: {base_name}={a.get(key)!r} {r}={b.get(key)!r}")
    return out


def wait_converged(cluster: Cluster, timeout: float) -> tuple[Check, dict[str, Snapshot], float]:
    t0 = time.monotonic()
    diffs: list[str] = ["not read yet"]
    snaps: dict[str, Snapshot] = {}
    while time.monotonic() - t0 < timeout:
        try:
            snaps = snapshots(cluster)
            diffs = differences(snaps)
        except Exception as exc:
            diffs = [f"read failed: {exc!r}"]
        if not diffs:
            took = time.monotonic() - t0
            n = len(snaps[REGIONS[0]].data)
            return (Check("convergence", True,
                          f"{n} znodes and {len(snaps[REGIONS[0]].meta)} metadata records "
                          f"identical in {len(REGIONS)} regions after {took:.1f}s"), snaps, took)
        time.sleep(1.0)
    took = time.monotonic() - t0
    return (Check("convergence", False, f"{len(diffs)} differences after {took:.0f}s",
                  diffs[:100]), snaps, took)


# -- no lost acknowledged write -----------------------------------------------------

def _allowed(ops: list[Op]) -> tuple[set[str | None], Op | None]:
    """Final values the ops allow: the last acknowledged one, or any unknown after it."""
    relevant = [o for o in ops if o.outcome != "fail"]
    last_ok = max((i for i, o in enumerate(relevant) if o.outcome == "ok"), default=-1)
    allowed: set[str | None] = set()
    if last_ok >= 0:
        allowed.add(relevant[last_ok].value)
    for o in relevant[last_ok + 1:]:
        allowed.add(o.value)
    return allowed, (relevant[last_ok] if last_ok >= 0 else None)


def _held(o: Op, excluded: Sequence[Excluded]) -> Excluded | None:
    """The exclusion during which the region held this write back, if any.

    From ``HELD_MARGIN_S`` before the exclude was written (a write the bridge had
    not captured yet, down or paused by another fault, is held too) until the
    include took effect (for ever when it was not seen).
    """
    for x in excluded:
        if (x.region == o.region and (o.path == x.path or o.path.startswith(x.path + "/"))
                and x.start - HELD_MARGIN_S <= o.start
                and (x.end is None or o.start <= x.end)):
            return x
    return None


def check_lost_writes(history: History, snap: Snapshot, skew_ms: int = 0,
                      excluded: Sequence[Excluded] = ()) -> Check:
    """Every path's final value allowed by the history.

    A contended write a region made while its path was excluded there is
    held back: once included, a peer's version written since the exclude goes
    over it (it is not compared by last-writer-wins), and only such a version
    may (``bridge.joining``). A single-writer path stays strict: what its
    region wrote while excluded must come out once included.
    """
    by_path: dict[str, dict[str, list[Op]]] = defaultdict(lambda: defaultdict(list))
    by_value: dict[tuple[str, str], Op] = {}
    for o in history.ops:
        by_path[o.path][o.region].append(o)
        if o.value is not None:
            by_value[(o.path, o.value)] = o
    problems: list[str] = []
    single = contended = yielded = 0
    for path, per_region in sorted(by_path.items()):
        final = snap.data.get(path)
        final_v = final.decode(errors="replace") if final is not None else None
        if len(per_region) == 1:
            single += 1
            (region, ops), = per_region.items()
            allowed, last = _allowed(ops)
            if last is None:
                # Nothing acknowledged: the state before the first write (which
                # the history does not hold) is as allowed as any unknown write.
                continue
            if final_v not in allowed:
                problems.append(f"{path} (only {region} writes): final {final_v!r}, "
                                f"allowed {sorted(map(str, allowed))}")
            continue
        contended += 1
        candidates: set[str | None] = set()
        lasts: list[Op] = []
        for ops in per_region.values():
            allowed, last = _allowed(ops)
            candidates |= allowed
            if last is not None:
                lasts.append(last)
        if final_v not in candidates:
            problems.append(f"{path} (contended): final {final_v!r} is no region's last "
                            f"acknowledged or unknown write; candidates "
                            f"{sorted(map(str, candidates))}")
            continue
        meta = snap.meta.get(path)
        if meta is None or final_v is None:
            continue
        writer = final_v.split(":")[0]
        if meta["w"] != writer:
            problems.append(f"{path}: value {final_v!r} but metadata writer {meta['w']!r}")
        # The winner's hybrid timestamp is at least the wall clock when it was
        # captured; every region's last acknowledged write was captured after
        # it started, so LWW must have picked a ts no older than any of those.
        win_ms = hlc_to_ms(meta["ts"])
        for o in lasts:
            if o.value == final_v:
                continue
            held = _held(o, excluded)
            if held is not None:
                winner = by_value.get((path, final_v))
                if winner is not None and winner.start < held.start - HELD_MARGIN_S:
                    problems.append(
                        f"{path}: {o.region}'s write {o.value!r}, held while {held.path} was "
                        f"excluded there, lost to {final_v!r} sent at "
                        f"{int(winner.start * 1000)}, before the exclude "
                        f"({int(held.start * 1000)}): only a peer's version since may win")
                elif win_ms + skew_ms < int(o.start * 1000):
                    yielded += 1  # last-writer-wins would have kept it
                continue
            if win_ms + skew_ms < int(o.start * 1000):
                problems.append(
                    f"{path}: winner {final_v!r} ts {win_ms} older than {o.region}'s last "
                    f"acknowledged write {o.value!r} sent at {int(o.start * 1000)} "
                    f"(LWW should have kept the later one)")
    ok = not problems
    return Check("no lost acknowledged write", ok,
                 f"{single} single-writer and {contended} contended paths checked"
                 + (f" ({yielded} later writes, held while excluded, took a peer's version)"
                    if yielded else "")
                 + f"; {len(problems)} problems", problems)


def check_ephemerals(history: History, snaps: dict[str, Snapshot]) -> Check:
    leaks = [f"{r}: {p}" for r, s in snaps.items() for p in s.data if "/eph-" in p]
    return Check("ephemerals never replicated", not leaks,
                 f"{len(history.eph_created)} ephemeral paths used; {len(leaks)} leaked", leaks)


def check_order(history: History) -> Check:
    ok = not history.dangling and not history.backwards
    return Check("order (pointer pattern)", ok,
                 f"{history.reads} pointer reads; {len(history.dangling)} dangling, "
                 f"{len(history.backwards)} backwards",
                 history.dangling[:50] + history.backwards[:50])


# -- no echo ------------------------------------------------------------------------

async def _partitions(bootstrap: str, topic: str) -> list[int]:
    from aiokafka.admin import AIOKafkaAdminClient

    # A consumer without a subscription knows no partitions of the topic;
    # the admin client's describe does.
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return sorted(p["partition"] for d in described if d.get("topic") == topic
                  for p in d.get("partitions", []))


async def _read_topic(bootstrap: str, topic: str) -> list[bytes]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    parts = await _partitions(bootstrap, topic)
    if not parts:
        return []
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[bytes] = []
        for tp in tps:
            while await consumer.position(tp) < ends[tp]:
                batch = await consumer.getmany(tp, timeout_ms=2000)
                for recs in batch.values():
                    out.extend(r.value for r in recs if r.value is not None)
                if not batch:
                    break
        return out
    finally:
        # aiokafka's fetcher re-raises its own cancelled fetch task from stop().
        with contextlib.suppress(asyncio.CancelledError):
            await consumer.stop()


def check_echo(cluster: Cluster, history: History) -> Check:
    bootstrap = getattr(cluster.broker, "internal_bootstrap", cluster.broker.bootstrap)
    problems: list[str] = []
    rows: list[dict[str, Any]] = []
    for region in REGIONS:
        topic = f"{cluster.prefix}.{SUBTREE}.{region}"
        raws = asyncio.run(_read_topic(bootstrap, topic))
        kinds: Counter[str] = Counter()
        distinct: set[tuple[Any, ...]] = set()
        foreign = 0
        for raw in raws:
            ev = codec.decode(raw)
            kinds[ev.op.value if hasattr(ev.op, "value") else str(ev.op)] += 1
            if "heartbeat" in str(ev.op):
                continue
            if ev.writer != region or ev.origin != region:
                foreign += 1
            distinct.add((ev.path, str(ev.op), tuple(sorted(ev.vc.as_dict().items()))))
        local = sum(1 for o in history.ops if o.region == region and o.outcome != "fail")
        records = len(raws) - kinds.get("heartbeat", 0)
        row = {"region": region, "records": len(raws), "heartbeats": kinds.get("heartbeat", 0),
               "events": records, "distinct_events": len(distinct),
               "re_announced": records - len(distinct), "local_writes": local,
               "foreign_writer": foreign}
        rows.append(row)
        if local and not records:
            problems.append(f"{region}: no event read from {topic} for {local} local writes")
        if foreign:
            problems.append(f"{region}: {foreign} records carry another region's write (echo)")
        if len(distinct) > local:
            problems.append(f"{region}: {len(distinct)} distinct events > {local} local writes")
    summary = "; ".join(
        f"{r['region']} {r['distinct_events']} events (+{r['re_announced']} re-announced, "
        f"{r['heartbeats']} heartbeats) for {r['local_writes']} writes" for r in rows)
    return Check("no echo", not problems, summary, problems + rows)


def check_joins_ended(cluster: Cluster, timeout: float = 60.0) -> Check:
    """No region keeps a joining marker or a join's list once the federation has
    converged (waited for a while: a join whose own znodes every peer has already
    may end just after): a join left running holds back what only its region has."""
    lay = Layout(STATE_PATH, SUBTREE, MOUNT)
    deadline = time.monotonic() + timeout
    with contextlib.ExitStack() as stack:
        clients = {r: stack.enter_context(zk_client(cluster.regions[r].ensemble.hosts))
                   for r in REGIONS}
        while True:
            left: dict[str, list[str]] = {}
            for r, client in clients.items():
                if found := [p for p in (lay.joining, lay.aside) if client.exists(p)]:
                    left[r] = found
            if not left or time.monotonic() > deadline:
                break
            time.sleep(1.0)
    problems = [f"{r}: {', '.join(found)} still there {timeout:.0f}s after convergence"
                for r, found in left.items()]
    return Check("joins ended", not problems,
                 "no joining marker or join's list left in any region"
                 if not problems else f"{len(left)} regions still joining", problems)


# -- recovery: lag ------------------------------------------------------------------

def _lag_proc(cluster: Cluster, region: str) -> subprocess.Popen[str]:
    b = cluster.regions[region].bridges[0]
    return subprocess.Popen(
        [sys.executable, "-m", "bridge", "lag", "-c", str(b.config_path), "--max-seconds", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )


def check_lag(cluster: Cluster, healed_at: float, limit: float = 60.0) -> Check:
    """`zkbridge lag --max-seconds 10` in every region, all at once, until each passed once."""
    passed: dict[str, float] = {}
    last: dict[str, str] = {}
    while time.monotonic() - healed_at < limit and len(passed) < len(REGIONS):
        running = {r: _lag_proc(cluster, r) for r in REGIONS if r not in passed}
        for r, proc in running.items():
            try:
                out, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                last[r] = "lag timed out"
                continue
            last[r] = out.strip()[-600:]
            if proc.returncode == 0:
                passed[r] = time.monotonic() - healed_at
        if len(passed) < len(REGIONS):
            time.sleep(1.0)
    ok = len(passed) == len(REGIONS)
    summary = ", ".join(f"{r} {t:.1f}s" for r, t in sorted(passed.items())) or "none"
    details = [f"{r}: {last.get(r, '')}" for r in REGIONS if r not in passed]
    return Check("lag --max-seconds 10 within 60s of heal", ok, f"passed: {summary}", details)


# -- logs ---------------------------------------------------------------------------

def check_logs(cluster: Cluster) -> Check:
    problems: list[str] = []
    levels: Counter[str] = Counter()
    for b in cluster.bridges:
        try:
            text = b.log_path.read_text(errors="replace")
        except FileNotFoundError:
            continue
        if "Traceback" in text:
            i = text.index("Traceback")
            problems.append(f"{b.name}: traceback: {text[i:i + 800]}")
        for line in text.splitlines():
            if not line.startswith("{"):
                continue
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            levels[f"{e.get('level')}:{e.get('event')}"] += 1
            if e.get("event") in BAD_EVENTS or e.get("level") in ("error", "critical"):
                problems.append(f"{b.name}: {line[:600]}")
    warnings = {k: v for k, v in levels.items() if k.startswith("warning")}
    return Check("no unexpected exception in bridge logs", not problems,
                 f"{len(problems)} error lines; warnings: "
                 + ", ".join(f"{k.split(':', 1)[1]}={v}" for k, v in sorted(warnings.items())),
                 problems[:60])
