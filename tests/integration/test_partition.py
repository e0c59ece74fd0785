"""One region cut off from the federation while every region keeps writing, then healed.

Each region (its ZooKeeper, its bridge, its application) runs in its own
network namespace and reaches Apache Kafka, in the root namespace, over its
own veth link (`tests/harness/netns.py`). Cutting r1's link is the partition
that matters for a federation: r1 and its applications carry on locally
while the others carry on without it.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kazoo.client import KazooClient

from bridge import codec
from bridge.clock import hlc_to_ms
from bridge.layout import Layout
from tests.conftest import REGION_NAMES
from tests.harness import netns, procs
from tests.harness.broker import KafkaBroker
from tests.harness.netns import RegionNetworks
from tests.harness.zookeeper import ZooKeeperServer, start_all
from tests.integration.federation import REPO, Federation

CUT = "r1"
OTHERS = tuple(r for r in REGION_NAMES if r != CUT)
# Heartbeats every second: a peer silent this long is plainly behind.
HEARTBEAT_AGE_SEEN = 8.0
OUTBOX_SEEN = 20
WRITE_RATE = 15.0  # operations per second per region
# Bridges log these as warnings or errors while a link is down; anything else
# at error level fails the test.
PARTITION_EVENTS: tuple[str, ...] = ()


@dataclass
class Partitioned:
    fed: Federation
    nets: RegionNetworks
    tmp: Path
    writers: dict[str, Any] = field(default_factory=dict)


@pytest.fixture
def partitioned(tmp_path: Path, token: str) -> Iterator[Partitioned]:
    """Three regions in their own namespaces, a broker listening on each root-side address."""
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"per-region partitions need network namespaces: {reason}")
    with contextlib.ExitStack() as stack:
        nets = stack.enter_context(RegionNetworks(token, REGION_NAMES))
        # Closed last (LIFO): namespaces go only once every process in them stopped.
        listeners = {r.upper(): f"{nets[r].host_addr}:{procs.free_port()}" for r in REGION_NAMES}
        broker = KafkaBroker(tmp_path / "kafka", extra_listeners=listeners)
        stack.callback(broker.close)
        servers = {
            r: ZooKeeperServer(r, tmp_path / f"zk-{r}", host=nets[r].ns_addr, prefix=nets[r].prefix)
            for r in REGION_NAMES
        }
        for s in servers.values():
            stack.callback(s.close)
        start_all(servers.values())
        broker.start()
        fed = Federation(tmp_path, token, broker, servers)
        stack.callback(fed.close)
        for r in REGION_NAMES:
            fed[r].prefix = nets[r].prefix
            fed.write_config(
                r,
                kafka={"bootstrap_servers": listeners[r.upper()]},
                metrics={"listen": f"{nets[r].ns_addr}:{procs.free_port()}"},
            )
        yield Partitioned(fed, nets, tmp_path)


# -- what an operator would look at ------------------------------------------------------

def lag_rows(p: Partitioned, region: str) -> dict[str, dict[str, Any]]:
    """`zkbridge lag --json` run in the region's namespace: peer -> row."""
    out = p.fed.cli("lag", "-c", str(p.fed[region].config_path), "--json", region=region,
                    timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return {row["peer"]: row for row in json.loads(out.stdout)["rows"]}


def outbox(p: Partitioned, region: str) -> int:
    """The region's outbox depth as `zkbridge status --json` (run inside its namespace) shows it."""
    out = p.fed.cli("status", "-c", str(p.fed[region].config_path), "--json", region=region,
                    timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    depth: int = json.loads(out.stdout)["subtrees"][p.fed.subtree]["outbox"]
    return depth


def metrics(p: Partitioned, region: str) -> dict[str, float]:
    """The region's /metrics, fetched from inside its namespace (reachable even when cut)."""
    listen = p.fed[region].settings.metrics_listen
    script = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
              "sys.argv[1], timeout=10).read().decode())")
    done = p.nets.run(region, [sys.executable, "-c", script, f"http://{listen}/metrics"],
                      timeout=30)
    assert done.returncode == 0, done.stderr
    values: dict[str, float] = {}
    for line in done.stdout.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def hb_metric(values: dict[str, float], peer: str) -> float | None:
    return values.get(f'zkbridge_heartbeat_age_seconds{{peer="{peer}",subtree="critical"}}')


# -- the applications ------------------------------------------------------------------

def start_writers(p: Partitioned, stack: contextlib.ExitStack) -> dict[str, Path]:
    logs: dict[str, Path] = {}
    for r in REGION_NAMES:
        region = p.fed[r]
        logs[r] = p.tmp / f"writes-{r}.jsonl"
        proc = procs.spawn(
            [*region.prefix, sys.executable, "-m", "tests.integration.partition_writer",
             "--hosts", region.hosts, "--mount", region.mount, "--region", r,
             "--out", str(logs[r]), "--rate", str(WRITE_RATE)],
            p.tmp / f"writer-{r}.log", env={"PYTHONPATH": str(REPO)}, cwd=REPO,
        )
        p.writers[r] = proc
        stack.callback(stop_writer, p, r)
    return logs


def stop_writer(p: Partitioned, region: str) -> None:
    proc = p.writers.pop(region, None)
    if proc is not None:
        rc = procs.stop(proc)
        log = p.tmp / f"writer-{region}.log"
        assert rc == 0, f"writer {region} exited {rc}:\n{procs.log_tail(log)}"


def read_writes(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def acked(logs: dict[str, Path], since: float = 0.0) -> dict[str, int]:
    return {r: sum(1 for w in read_writes(path) if w["outcome"] == "ok" and w["start"] >= since)
            for r, path in logs.items()}


# -- the judge ---------------------------------------------------------------------------

def check_acknowledged(p: Partitioned, logs: dict[str, Path]) -> tuple[int, int]:
    """Every acknowledged write survives or lost, by LWW, to a later one; (single, contended) paths.

    Read with our own client, not through the bridge's `verify`.
    """
    fed = p.fed
    region = fed[OTHERS[0]]
    layout = Layout(fed.state_path, fed.subtree, region.mount)
    # Per path and region: every value written with an answer we cannot rule out,
    # and the last acknowledged one.
    last_ok: dict[str, dict[str, dict[str, Any]]] = {}
    possible: dict[str, set[str]] = {}
    for r, path in logs.items():
        for w in read_writes(path):
            if w["outcome"] == "fail":
                continue
            possible.setdefault(w["path"], set()).add(w["value"])
            if w["outcome"] == "ok":
                last_ok.setdefault(w["path"], {})[r] = w
    client = KazooClient(hosts=region.hosts, timeout=10.0)
    client.start(timeout=30)
    problems: list[str] = []
    single = contended = 0
    try:
        client.sync(region.mount)
        for rel, per_region in sorted(last_ok.items()):
            data, _ = client.get(region.mount + rel)
            final = data.decode()
            if final not in possible[rel]:
                problems.append(f"{rel}: {final!r} was never written there")
                continue
            if len(per_region) == 1:
                single += 1
                (w,) = per_region.values()
                # The only writer's last acknowledged value, or a later one whose
                # answer was lost.
                later = {x["value"] for x in read_writes(logs[w["value"].split(":")[0]])
                         if x["path"] == rel and x["outcome"] == "unknown"
                         and x["start"] >= w["start"]}
                if final != w["value"] and final not in later:
                    problems.append(f"{rel}: {final!r}, last acknowledged {w['value']!r}")
                continue
            contended += 1
            meta = codec.decode_meta(client.get(layout.meta(rel))[0])
            assert meta is not None, rel
            writer = final.split(":")[0]
            if meta.writer != writer:
                problems.append(f"{rel}: value {final!r} but metadata writer {meta.writer!r}")
            win_ms = hlc_to_ms(meta.ts)
            for r, w in per_region.items():
                # LWW: each region's last acknowledged write was captured after it
                # was sent, so the winner's stamp is no older than any of them.
                if w["value"] != final and win_ms < int(w["start"] * 1000):
                    problems.append(f"{rel}: winner {final!r} stamped {win_ms}, older than "
                                    f"{r}'s last acknowledged {w['value']!r} sent at "
                                    f"{int(w['start'] * 1000)}")
    finally:
        client.stop()
        client.close()
    assert not problems, "acknowledged writes lost:\n" + "\n".join(problems[:30])
    return single, contended


def poll(what: str, step: Callable[[], bool], timeout: float) -> None:
    procs.wait_for(step, timeout, interval=0.2, message=what)


def test_one_region_cut_off_while_all_write_then_healed(
    partitioned: Partitioned, harness_report: Callable[[str], None]
) -> None:
    p, fed, nets = partitioned, partitioned.fed, partitioned.nets
    fed.start_all()
    with contextlib.ExitStack() as stack:
        logs = start_writers(p, stack)
        poll("every writer acknowledged writes",
             lambda: min(acked(logs).values()) >= 20, 30)
        # All three exchange heartbeats before the cut.
        before = {r: lag_rows(p, r) for r in OTHERS}
        for r in OTHERS:
            age = before[r][CUT]["heartbeat_age"]
            assert age is not None and age < 5, before[r]

        nets.cut(CUT)
        cut_at = time.monotonic()
        cut_wall = time.time()
        samples: dict[str, list[float]] = {r: [] for r in OTHERS}
        metric_samples: dict[str, list[float]] = {r: [] for r in OTHERS}
        outbox_samples: list[int] = []
        cut_metric_outbox: list[float] = []

        def watched() -> bool:
            for r in OTHERS:
                row = lag_rows(p, r)[CUT]
                samples[r].append(row["heartbeat_age"] or 0.0)
                metric_samples[r].append(hb_metric(metrics(p, r), CUT) or 0.0)
            outbox_samples.append(outbox(p, CUT))
            cut_metric_outbox.append(
                metrics(p, CUT).get('zkbridge_outbox_depth{subtree="critical"}', 0.0))
            return (all(min(samples[r][-1], metric_samples[r][-1]) >= HEARTBEAT_AGE_SEEN
                        for r in OTHERS)
                    and outbox_samples[-1] >= OUTBOX_SEEN and cut_metric_outbox[-1] >= OUTBOX_SEEN)

        poll("heartbeat age of the cut region and its outbox growing", watched, 60)
        for r in OTHERS:
            # Growing, not just high: seen low at the cut, high now.
            assert samples[r][-1] > samples[r][0] and metric_samples[r][-1] > metric_samples[r][0]
            assert samples[r][-1] >= HEARTBEAT_AGE_SEEN
        assert outbox_samples[-1] > outbox_samples[0], outbox_samples
        alert = fed.cli("lag", "-c", str(fed[OTHERS[0]].config_path), "--max-seconds", "5",
                        region=OTHERS[0])
        assert alert.returncode == 1, alert.stdout + alert.stderr
        during = acked(logs, since=cut_wall)
        assert all(n > 0 for n in during.values()), f"a region stopped writing: {during}"
        cut_seconds = time.monotonic() - cut_at

        nets.heal(CUT)
        healed_at = time.monotonic()
        poll(f"{CUT}'s outbox drained after heal", lambda: outbox(p, CUT) == 0, 60)
        drained = time.monotonic() - healed_at
        poll(f"peers hear {CUT}'s heartbeats again",
             lambda: all((lag_rows(p, r)[CUT]["heartbeat_age"] or 99) < 3 for r in OTHERS), 60)
        fresh = time.monotonic() - healed_at
        # Writes keep coming a little after the heal, then the applications stop.
        for r in REGION_NAMES:
            stop_writer(p, r)
        writers_stopped = time.monotonic()
    fed.wait_converged(timeout=60)
    converged = time.monotonic()
    single, contended = check_acknowledged(p, logs)
    fed.assert_clean_logs(allowed=PARTITION_EVENTS)

    totals = acked(logs)
    figures = (
        f"partition: {CUT} cut {cut_seconds:.1f}s while writing "
        f"({', '.join(f'{r}={n}' for r, n in during.items())} acked during the cut); "
        f"heartbeat age of {CUT} reached "
        + ", ".join(f"{r} lag {samples[r][-1]:.1f}s / metric {metric_samples[r][-1]:.1f}s"
                    for r in OTHERS)
        + f"; {CUT} outbox reached {outbox_samples[-1]} (metric {cut_metric_outbox[-1]:.0f}); "
        f"after heal: outbox drained {drained:.1f}s, peers fresh {fresh:.1f}s, "
        f"converged {converged - healed_at:.1f}s after heal "
        f"({converged - writers_stopped:.1f}s after writers stopped); "
        f"{sum(totals.values())} acknowledged writes, {single} single-writer and "
        f"{contended} contended paths checked"
    )
    print(figures)
    harness_report(figures)
