"""One campaign round (and the `scripts/chaos` loop): start, load, break, heal, check, report.

A round is a fresh cluster, so a seed alone reproduces its schedule and
workload. Everything of a round (configs, bridge logs, server logs, the
history, the report) lives in one folder; it is deleted after a passing
round unless `--keep` is given, and always kept after a failing one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import secrets
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos import checkers
from tests.chaos.nemesis import KAFKA_ONLY, KINDS_ALL, Nemesis, schedule
from tests.chaos.topology import MOUNT, REGIONS, Cluster, zk_client
from tests.chaos.workload import OWN_KEYS, SHARED_KEYS, History, Op, PointerReader, Writer
from tests.harness import procs


@dataclass
class RoundResult:
    seed: int
    folder: Path
    passed: bool
    checks: list[checkers.Check] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    converge_seconds: float | None = None
    seconds: float = 0.0
    error: str = ""

    def lines(self) -> list[str]:
        out = [f"seed {self.seed}: {'PASS' if self.passed else 'FAIL'} "
               f"({self.seconds:.0f}s, folder {self.folder})"]
        if self.error:
            out.append(f"  error: {self.error}")
        out.append("  operations: " + ", ".join(f"{k}={v}" for k, v in self.ops.items()))
        applied: dict[str, int] = {}
        for f in self.faults:
            kind = f["kind"]
            key = kind if f["outcome"].startswith("applied") else f"{kind}(skipped)"
            applied[key] = applied.get(key, 0) + 1
        out.append("  faults: " + ", ".join(f"{k}={v}" for k, v in sorted(applied.items())))
        if self.converge_seconds is not None:
            out.append(f"  converged {self.converge_seconds:.1f}s after the heal")
        for c in self.checks:
            out.append(f"  [{'ok' if c.passed else 'FAIL'}] {c.name}: {c.summary}")
        return out


class Say:
    def __init__(self, path: Path, quiet: bool) -> None:
        self.path = path
        self.quiet = quiet
        self.t0 = time.monotonic()

    def __call__(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {text}"
        with open(self.path, "a") as f:
            f.write(line + "\n")
        if not self.quiet:
            print(line, flush=True)


def _wait_leaders(cluster: Cluster, timeout: float) -> None:
    def ready() -> bool:
        return all(any(b.is_leader() for b in reg.bridges) for reg in cluster.regions.values())

    procs.wait_for(ready, timeout, interval=0.5, message="not every region has a ready leader")


def _setup_tree(cluster: Cluster, history: History) -> None:
    """The skeleton every writer needs, written before any fault and replicated first."""
    for region in REGIONS:
        with zk_client(cluster.regions[region].ensemble.hosts) as client:
            rels = [f"/{region}", f"/{region}/tree", f"/{region}/ptr", f"/{region}/ptr/data"]
            rels += [f"/{region}/k{k}" for k in range(OWN_KEYS)]
            if region == REGIONS[0]:
                rels = ["/shared", *(f"/shared/c{k}" for k in range(SHARED_KEYS)), *rels]
            for rel in rels:
                value = f"{region}:init{rel}"
                t0 = time.time()
                client.ensure_path(MOUNT)
                stat = client.create(MOUNT + rel, value.encode())
                zstat = client.exists(stat)
                history.add(Op(region, rel, "put", value, "ok",
                               zstat.mzxid if zstat else None, t0, time.time(), "setup"))


def run_round(seed: int, *, fault_seconds: float, broker: str, out_dir: Path, keep: bool,
              quiet: bool = False, rate: float = 8.0) -> RoundResult:
    folder = out_dir / f"chaos-{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    say = Say(folder / "run.log", quiet)
    # kazoo narrates every dropped connection; under a nemesis that is the
    # point, so it goes to the round's folder instead of the terminal.
    kazoo_log = logging.FileHandler(folder / "clients.log")
    kazoo_log.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [kazoo_log]
    root.setLevel(logging.INFO)
    kinds = KINDS_ALL if broker == "kafka" else tuple(k for k in KINDS_ALL if k not in KAFKA_ONLY)
    faults = schedule(seed, fault_seconds, kinds)
    say(f"seed {seed}, broker {broker}, {fault_seconds:.0f}s of faults, schedule:")
    for f in faults:
        say("  " + f.describe())
    (folder / "schedule.txt").write_text("\n".join(f.describe() for f in faults) + "\n")
    token = f"s{seed % 100000}x{secrets.token_hex(2)}"
    cluster: Cluster | None = None
    history = History()
    result = RoundResult(seed, folder, False)
    started = time.monotonic()
    writers: list[Writer] = []
    readers: list[PointerReader] = []
    nemesis: Nemesis | None = None
    try:
        cluster = Cluster(folder, broker, token)
        where = " in a network namespace each" if cluster.nets is not None else ""
        say(f"starting 9 ZooKeeper servers, the broker and 6 bridges{where}")
        cluster.start()
        _wait_leaders(cluster, 180)
        say("leaders ready; writing the skeleton")
        _setup_tree(cluster, history)
        ok, _, took = checkers.wait_converged(cluster, 120)
        if not ok.passed:
            raise RuntimeError(f"skeleton did not replicate: {ok.details[:3]}")
        say(f"skeleton replicated in {took:.1f}s; workload and nemesis start")
        for r in REGIONS:
            hosts = cluster.regions[r].ensemble.hosts
            writers.append(Writer(r, hosts, seed, history, rate))
            readers.append(PointerReader(r, hosts, history))
        for t in (*writers, *readers):
            t.start()
        nemesis = Nemesis(cluster, faults, say)
        nemesis.start()
        time.sleep(fault_seconds)
        say("faults stop; undoing the running ones")
        nemesis.stop()
        cluster.heal()
        healed = time.monotonic()
        # Recovery is timed from the heal, alongside the rest of the checking.
        lag_result: list[checkers.Check] = []
        lag_thread = threading.Thread(
            target=lambda: lag_result.append(checkers.check_lag(cluster, healed)),
            name="lag-check", daemon=True)
        lag_thread.start()
        say("healed; the workload runs 5 s more, then stops")
        time.sleep(5)
        for w in writers:
            w.stop_flag.set()
        for w in writers:
            w.join(60)
        say("writers stopped; checking")
        conv, snaps, took = checkers.wait_converged(cluster, 180)
        result.converge_seconds = time.monotonic() - healed if conv.passed else None
        for rd in readers:
            rd.stop_flag.set()
        for rd in readers:
            rd.join(30)
        checks = [conv]
        if conv.passed:
            checks.append(checkers.check_joins_ended(cluster))
        lag_thread.join(120)
        checks.append(lag_result[0] if lag_result else
                      checkers.Check("lag --max-seconds 10 within 60s of heal", False,
                                     "the lag check did not finish"))
        if snaps:
            # Every region's final state, not one: unconverged regions differ.
            excluded = nemesis.excluded if nemesis is not None else []
            per_region = [checkers.check_lost_writes(history, snaps[r], excluded=excluded)
                          for r in REGIONS]
            problems = [f"{r}: {p}" for r, c in zip(REGIONS, per_region, strict=True)
                        for p in c.details]
            checks.append(checkers.Check(
                per_region[0].name, not problems,
                per_region[0].summary.rsplit(";", 1)[0]
                + f" in {len(REGIONS)} regions; {len(problems)} problems", problems))
            checks.append(checkers.check_ephemerals(history, snaps))
        checks.append(checkers.check_order(history))
        try:
            checks.append(checkers.check_echo(cluster, history))
        except Exception as exc:
            checks.append(checkers.Check("no echo", False, f"could not read topics: {exc!r}"))
        checks.append(checkers.check_logs(cluster))
        result.checks = checks
        result.passed = all(c.passed for c in checks)
    except (Exception, asyncio.CancelledError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:2000]
        say(f"round aborted: {result.error}")
    finally:
        clients: list[Writer | PointerReader] = [*writers, *readers]
        for t in clients:
            t.stop_flag.set()
        if nemesis is not None:
            nemesis.stop()
            result.faults = [a.as_dict() for a in nemesis.applied]
            result.ops["supervisor_restarts"] = nemesis.supervisor_restarts
        for t in (*writers, *readers):
            t.join(30)
        if cluster is not None:
            cluster.close()
        root.handlers = saved
        kazoo_log.close()
    by_outcome: dict[str, int] = {}
    for o in history.ops:
        by_outcome[o.outcome] = by_outcome.get(o.outcome, 0) + 1
    result.ops = {"ops": len(history.ops), **by_outcome,
                  "pointer_reads": history.reads, **result.ops}
    result.seconds = time.monotonic() - started
    report = {"seed": seed, "passed": result.passed, "error": result.error,
              "broker": broker, "fault_seconds": fault_seconds, "ops": result.ops,
              "converge_seconds": result.converge_seconds, "seconds": result.seconds,
              "faults": result.faults, "checks": [c.as_dict() for c in result.checks]}
    (folder / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (folder / "report.txt").write_text("\n".join(result.lines()) + "\n")
    if not result.passed or keep:
        (folder / "history.json").write_text(
            json.dumps({"ops": [o.as_dict() for o in history.ops],
                        "dangling": history.dangling, "backwards": history.backwards},
                       default=str))
    for line in result.lines():
        say(line)
    if result.passed and not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/chaos", description=(
        "Randomized fault campaign: rounds of a fresh 3-region cluster under a seeded "
        "workload and nemesis, checked afterwards."))
    p.add_argument("--seed", type=int, help="first round's seed (random when absent)")
    p.add_argument("--minutes", type=float, default=0.0,
                   help="keep starting rounds (seed, seed+1, ...) until this many minutes "
                        "passed; 0 runs one round")
    p.add_argument("--fault-seconds", type=float, default=60.0,
                   help="length of the fault phase of each round (default 60)")
    p.add_argument("--broker", choices=("kafka", "tansu"), default="kafka")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the rounds' folders (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep a passing round's folder too")
    p.add_argument("--rate", type=float, default=8.0, help="operations/s per region writer")
    args = p.parse_args(argv)
    if args.fault_seconds <= 0 or args.minutes < 0 or args.rate <= 0:
        p.error("--fault-seconds and --rate must be > 0, --minutes >= 0")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    out = args.out or Path(tempfile.mkdtemp(prefix="zkbridge-chaos-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"chaos: first seed {seed}, output under {out}", flush=True)
    end = time.monotonic() + args.minutes * 60
    results: list[RoundResult] = []
    while True:
        results.append(run_round(seed, fault_seconds=args.fault_seconds, broker=args.broker,
                                 out_dir=out, keep=args.keep, rate=args.rate))
        seed += 1
        if time.monotonic() >= end:
            break
    print("\nsummary", flush=True)
    for r in results:
        print(r.lines()[0], flush=True)
    failed = [r for r in results if not r.passed]
    print(f"{len(results)} rounds, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
