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
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kazoo.client import KazooClient

from bridge import statecodec
from bridge.clock import hlc_to_ms
from bridge.layout import Layout
from bridge.model import content_hash
from tests.conftest import REGION_NAMES
from tests.harness import netns, procs
from tests.harness.broker import KafkaBroker
from tests.harness.netns import RegionNetworks
from tests.harness.zookeeper import ZooKeeperServer
from tests.integration.federation import REPO, Federation

T = TypeVar("T")

CUT = "r1"
OTHERS = tuple(r for r in REGION_NAMES if r != CUT)
# Heartbeats every second: a peer silent this long is plainly behind.
HEARTBEAT_AGE_SEEN = 8.0
OUTBOX_SEEN = 20
# After the heal, heartbeats (every second) are watched this long and must stay
# younger than FRESH_AGE all the while.
STAYS_FRESH_S = 10.0
FRESH_AGE = 4.0
WRITE_RATE = 15.0  # operations per second per region
# A cut link is a condition, not an error: the bridges log it as warnings
# (`topic_check_failed`, `topics_recreate_failed`) plus aiokafka's own lines,
# so no error-level event is allowed here.
PARTITION_EVENTS: tuple[str, ...] = ()


@dataclass
class Partitioned:
    fed: Federation
    nets: RegionNetworks
    tmp: Path
    setup_seconds: float
    writers: dict[str, Any] = field(default_factory=dict)


@pytest.fixture
def partitioned(tmp_path: Path, token: str) -> Iterator[Partitioned]:
    """Three regions in their own namespaces, a broker listening on each root-side address."""
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"per-region partitions need network namespaces: {reason}")
    t0 = time.monotonic()
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
        # The JVMs start side by side: ZooKeeper's spawn does not wait.
        for s in servers.values():
            s.spawn()
        broker.start()
        for s in servers.values():
            s.wait_ready()
        fed = Federation(tmp_path, token, broker, servers)
        stack.callback(fed.close)
        for r in REGION_NAMES:
            fed[r].prefix = nets[r].prefix
            fed.write_config(
                r,
                kafka={"bootstrap_servers": listeners[r.upper()]},
                metrics={"listen": f"{nets[r].ns_addr}:{procs.free_port()}"},
            )
        yield Partitioned(fed, nets, tmp_path, time.monotonic() - t0)


# -- what an operator would look at ------------------------------------------------------

def lag_rows(p: Partitioned, region: str, max_seconds: float, expect_rc: int
             ) -> dict[str, dict[str, Any]]:
    """`zkbridge lag --json --max-seconds N` in the region's namespace: peer -> row."""
    out = p.fed.cli("lag", "-c", str(p.fed[region].config_path), "--json",
                    "--max-seconds", f"{max_seconds:g}", region=region, timeout=60)
    assert out.returncode == expect_rc, f"{region}: lag exited {out.returncode}:\n" + (
        out.stdout + out.stderr)
    return {row["peer"]: row for row in json.loads(out.stdout)["rows"]}


def together(calls: dict[str, Callable[[], T]]) -> dict[str, T]:
    """Run CLI probes side by side: each one starts Python and connects, seconds on a busy box."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {k: pool.submit(fn) for k, fn in calls.items()}
        return {k: f.result() for k, f in futures.items()}


def lag_everywhere(p: Partitioned, regions: tuple[str, ...], max_seconds: float,
                   expect_rc: int) -> dict[str, dict[str, dict[str, Any]]]:
    """`lag` in several regions at once."""
    return together({r: partial(lag_rows, p, r, max_seconds, expect_rc) for r in regions})


def lag_clears(p: Partitioned, regions: tuple[str, ...], max_seconds: float,
               within: float) -> int:
    """`lag --max-seconds` in every region until each exits 0, for up to ``within`` s: tries."""
    deadline = time.monotonic() + within
    tries = 0
    while True:
        tries += 1
        try:
            lag_everywhere(p, regions, max_seconds, 0)
            return tries
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


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


def hb_age(p: Partitioned, region: str, peer: str) -> float:
    """Age of the last heartbeat `region` applied from `peer`, from its metrics (0: none yet)."""
    key = f'zkbridge_heartbeat_age_seconds{{peer="{peer}",subtree="{p.fed.subtree}"}}'
    return metrics(p, region).get(key, 0.0)


def worst_heartbeat_age(p: Partitioned, seconds: float) -> dict[str, float]:
    """Sampled for ``seconds``: the oldest heartbeat each way between the cut region and
    its peers, "r1<-r2" being the age of r2's last heartbeat as r1 saw it."""
    worst: dict[str, float] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for r in OTHERS:
            for seer, peer in ((CUT, r), (r, CUT)):
                key = f"{seer}<-{peer}"
                worst[key] = max(worst.get(key, 0.0), hb_age(p, seer, peer))
        time.sleep(0.2)
    return worst


def outbox_metric(p: Partitioned, region: str) -> float:
    return metrics(p, region)[f'zkbridge_outbox_depth{{subtree="{p.fed.subtree}"}}']


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
            meta = statecodec.decode_meta(client.get(layout.meta(rel))[0])
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


def explain(p: Partitioned) -> str:
    """Each region's znode and metadata at every differing path: which side lost what."""
    fed = p.fed
    lines = []
    for d in fed.differences()[:10]:
        lines.append(f"{d.path}: {d.detail}")
        for r in REGION_NAMES:
            region = fed[r]
            layout = Layout(fed.state_path, fed.subtree, region.mount)
            client = KazooClient(hosts=region.hosts, timeout=10.0)
            client.start(timeout=30)
            try:
                data, stat = client.get(region.mount + d.path)
                meta = statecodec.decode_meta(client.get(layout.meta(d.path))[0])
                pending = len(client.get_children(layout.outbox))
            finally:
                client.stop()
                client.close()
            captured = meta is not None and meta.data_hash == content_hash(data)
            lines.append(
                f"  {r}: {data!r} mzxid={stat.mzxid:#x} version={stat.version} "
                f"meta={'-' if meta is None else (meta.vc.as_dict(), meta.writer, meta.ts)} "
                f"outbox={pending} {'' if captured else '(metadata hash differs from the data)'}")
    return "\n".join(lines)


def probe(p: Partitioned, expect_rc: int) -> tuple[dict[str, dict[str, dict[str, Any]]], int]:
    """What the operators see, all at once: `lag --max-seconds 5` in the others, r1's outbox."""
    calls: dict[str, Callable[[], Any]] = {
        r: partial(lag_rows, p, r, 5, expect_rc) for r in OTHERS}
    calls["outbox"] = partial(outbox, p, CUT)
    got = together(calls)
    depth: int = got.pop("outbox")
    return got, depth


def poll(what: str, step: Callable[[], bool], timeout: float) -> None:
    procs.wait_for(step, timeout, interval=0.2, message=what)


def test_one_region_cut_off_while_all_write_then_healed(
    partitioned: Partitioned, harness_report: Callable[[str], None]
) -> None:
    p, fed, nets = partitioned, partitioned.fed, partitioned.nets
    t0 = time.monotonic()
    fed.start_all()
    bridges_ready = time.monotonic() - t0
    with contextlib.ExitStack() as stack:
        logs = start_writers(p, stack)
        poll("every writer acknowledged writes", lambda: min(acked(logs).values()) >= 20, 30)
        # Before the cut: everyone hears r1, and r1 publishes as fast as it captures.
        before, outbox_before = probe(p, expect_rc=0)

        nets.cut(CUT)
        cut_at = time.monotonic()
        cut_wall = time.time()
        seen: dict[str, float] = {}

        def partition_visible() -> bool:
            # Metrics are cheap to sample; the CLI confirms once they show it.
            for r in OTHERS:
                seen[r] = hb_age(p, r, CUT)
            seen[CUT] = outbox_metric(p, CUT)
            return (min(seen[r] for r in OTHERS) >= HEARTBEAT_AGE_SEEN
                    and seen[CUT] >= OUTBOX_SEEN)

        poll("the cut region's heartbeat age and outbox growing", partition_visible, 60)
        visible = time.monotonic() - cut_at
        # The alerting form of lag fires in the regions that still run.
        during_lag, outbox_during = probe(p, expect_rc=1)
        for r in OTHERS:
            age_before = before[r][CUT]["heartbeat_age"]
            age_during = during_lag[r][CUT]["heartbeat_age"]
            assert age_before is not None and age_before < 5, before[r]
            assert age_during is not None and age_during >= HEARTBEAT_AGE_SEEN, during_lag[r]
            # The other way round nothing is cut: their heartbeats stay fresh.
            other = next(o for o in OTHERS if o != r)
            assert during_lag[r][other]["heartbeat_age"] < 5, during_lag[r]
        assert outbox_during >= OUTBOX_SEEN and outbox_during > outbox_before, (
            outbox_before, outbox_during)
        during = acked(logs, since=cut_wall)
        assert all(n > 0 for n in during.values()), f"a region stopped writing: {during}"
        cut_seconds = time.monotonic() - cut_at

        nets.heal(CUT)
        healed_at = time.monotonic()
        poll(f"{CUT}'s outbox drained after heal", lambda: outbox_metric(p, CUT) == 0, 60)
        drained = time.monotonic() - healed_at
        # Both ways: the final `lag` runs in every region, r1 included, and
        # data can converge before r1 has read its peers' latest heartbeats.
        poll(f"peers hear {CUT}'s heartbeats again, and {CUT} theirs",
             lambda: all(0 < hb_age(p, r, CUT) < 3 and 0 < hb_age(p, CUT, r) < 3
                         for r in OTHERS), 60)
        fresh = time.monotonic() - healed_at
        # And stay fresh: a connection the cut left dead must not hold
        # fetching up again and again after the heal (CI saw the cut
        # region's peers' heartbeats 6.5 s and 12.7 s old at the end).
        stale = worst_heartbeat_age(p, STAYS_FRESH_S)
        assert max(stale.values()) < FRESH_AGE, f"heartbeats went stale after the heal: {stale}"
        # The applications wrote through the heal; now they stop.
        for r in REGION_NAMES:
            stop_writer(p, r)
        writers_stopped = time.monotonic()
    try:
        fed.wait_converged(timeout=60)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{explain(p)}") from None
    converged = time.monotonic()
    # The operators' all-clear. `lag` reads the status record (written every
    # 2 s), so one sample can meet a record written just before a ZooKeeper
    # fsync stall (2 s seen on this machine): a few seconds' grace. Heartbeats
    # staying fresh was asserted strictly above.
    lag_tries = lag_clears(p, REGION_NAMES, 5, within=10)
    single, contended = check_acknowledged(p, logs)
    fed.assert_clean_logs(allowed=PARTITION_EVENTS)

    totals = acked(logs)
    warned = sorted({e["event"] for e in fed.events(CUT) if e.get("level") == "warning"})
    figures = (
        f"partition: namespaces, servers and broker up in {p.setup_seconds:.1f}s, bridges in "
        f"{bridges_ready:.1f}s; "
        f"{CUT} cut {cut_seconds:.1f}s (metrics showed it at {visible:.1f}s) while all wrote "
        f"({', '.join(f'{r} {n}' for r, n in during.items())} acknowledged writes during it); "
        f"heartbeat age of {CUT} reached "
        + ", ".join(f"{r} {during_lag[r][CUT]['heartbeat_age']:.1f}s" for r in OTHERS)
        + f" (lag), {CUT} outbox {outbox_during} (status); after heal: "
        f"outbox drained {drained:.1f}s, peers' heartbeat age < 3s at {fresh:.1f}s and at most "
        f"{max(stale.values()):.1f}s in the {STAYS_FRESH_S:g}s after, "
        f"converged at {converged - healed_at:.1f}s "
        f"({converged - writers_stopped:.1f}s after the writers stopped), `lag --max-seconds 5` "
        f"passed everywhere at try {lag_tries}; "
        f"{sum(totals.values())} acknowledged writes checked on {single} single-writer and "
        f"{contended} contended paths; {CUT} warned: {', '.join(warned)}"
    )
    print(figures)
    harness_report(figures)


def _reaches(link: netns.Link, address: tuple[str, int]) -> str:
    """From inside the link's namespace: 'ok' or the connect error's name."""
    code = (f"import socket\ntry:\n socket.create_connection({address!r}, timeout=2)\n"
            " print('ok')\nexcept OSError as e:\n print(type(e).__name__)")
    done = subprocess.run([*link.prefix, sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)
    return done.stdout.strip() or done.stderr.strip()


def test_a_cut_takes_the_wan_link_down_and_leaves_the_lan_up(token: str) -> None:
    """The campaign's regions (`lan=True`): clients keep their ZooKeeper while Kafka is gone."""
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"needs network namespaces: {reason}")
    with RegionNetworks(token, ["r1"], lan=True) as nets, contextlib.ExitStack() as stack:
        wan, lan = nets["r1"], nets.lans["r1"]
        servers = [stack.enter_context(socket.create_server((a, 0)))
                   for a in (wan.host_addr, lan.host_addr)]
        to_wan, to_lan = (s.getsockname()[:2] for s in servers)
        assert (_reaches(wan, to_wan), _reaches(wan, to_lan)) == ("ok", "ok")
        nets.cut("r1")
        # Dropped without an answer, as on a broken WAN: a timeout, not a refusal.
        assert (_reaches(wan, to_wan), _reaches(wan, to_lan)) == ("TimeoutError", "ok")
        nets.heal("r1")
        assert (_reaches(wan, to_wan), _reaches(wan, to_lan)) == ("ok", "ok")
