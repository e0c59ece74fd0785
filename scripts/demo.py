"""The newcomer's tour: three regions, real servers, replication, a conflict, lag, narrated.

Started by ``scripts/demo`` (which installs what is missing first). Everything
runs on loopback in a temporary directory and is stopped on exit or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from kazoo.client import KazooClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.harness import procs  # noqa: E402  (the same server management the tests use)
from tests.harness.broker import TansuBroker  # noqa: E402
from tests.harness.zookeeper import ZooKeeperServer, start_all  # noqa: E402

REGIONS = ("us-east", "eu-west", "ap-south")
BOLD, DIM, GREEN, RESET = "\033[1m", "\033[2m", "\033[32m", "\033[0m"
if not sys.stdout.isatty():
    BOLD = DIM = GREEN = RESET = ""


def step(text: str) -> None:
    print(f"\n{BOLD}▶ {text}{RESET}", flush=True)


def info(text: str) -> None:
    print(f"  {text}", flush=True)


def wait_until(pred: Callable[[], bool], timeout: float = 30.0) -> float:
    t0 = time.monotonic()
    procs.wait_for(pred, timeout, interval=0.02)
    return time.monotonic() - t0


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.servers = {r: ZooKeeperServer(r, base_dir=workdir / f"zk-{r}") for r in REGIONS}
        self.broker = TansuBroker(base_dir=workdir / "broker")
        self.bridges: dict[str, subprocess.Popen[bytes]] = {}
        self.clients: dict[str, KazooClient] = {}
        self.configs: dict[str, Path] = {}
        self.problems: list[str] = []  # what the tour showed that it should not have

    def expect(self, rc: int, want: int, what: str, ok: str) -> None:
        """Narrate a command's exit status: ``ok`` if it is ``want``, else a problem."""
        if rc == want:
            if ok:  # else the output speaks for itself
                info(f"exit status {rc}: {ok}")
            return
        info(f"exit status {rc}, where {want} was expected: {what}")
        self.problems.append(f"{what}: exit status {rc}, expected {want}")

    def up(self) -> None:
        step("Starting three regional ZooKeeper servers and a Kafka-compatible broker")
        start_all(self.servers.values())
        self.broker.start()
        for r, s in self.servers.items():
            info(f"{r:9} ZooKeeper at {s.hosts}")
        info(f"{'kafka':9} broker at {self.broker.bootstrap} (tansu, memory only)")
        for r in REGIONS:
            self.configs[r] = self._config(r)
        step("Starting one `zkbridge run` per region")
        for r in REGIONS:
            self._start_bridge(r)
        for r in REGIONS:
            self._wait_ready(r, 1)
            info(f"{r:9} bridge ready   (config {self.configs[r]}, log {self.dir}/bridge-{r}.log)")
        for r, s in self.servers.items():
            c = KazooClient(hosts=s.hosts)
            c.start(timeout=15)
            self.clients[r] = c

    def _start_bridge(self, region: str) -> None:
        self.bridges[region] = procs.spawn(
            [sys.executable, "-m", "bridge", "run", "-c", str(self.configs[region])],
            self.dir / f"bridge-{region}.log",
            env={"PYTHONPATH": str(REPO)},
            cwd=REPO,
        )

    def _wait_ready(self, region: str, starts: int) -> float:
        """Until the region's bridge has logged ``bridge_ready`` for its n-th start."""
        return wait_until(lambda: self._log(region).count('"bridge_ready"') >= starts, 60)

    def zkbridge(self, *args: str, show: str | None = None,
                 keep: Callable[[str], bool] = lambda _: True) -> int:
        """Run and print a zkbridge command the way an operator would type it."""
        out = subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True,
                             text=True, cwd=REPO)
        typed = show or " ".join(a if not a.endswith(".yaml") else Path(a).name for a in args)
        print(f"  {DIM}${RESET} zkbridge {typed}", flush=True)
        for line in (out.stdout + out.stderr).splitlines():
            if keep(line):
                info("  " + line)
        return out.returncode

    def _config(self, region: str) -> Path:
        doc = {
            "region": region,
            "zookeeper": {"hosts": self.servers[region].hosts},
            "kafka": {"bootstrap_servers": self.broker.bootstrap, "enable_idempotence": False},
            "peers": [p for p in REGIONS if p != region],
            "subtrees": [{"name": "critical", "path": "/critical"}],
            "heartbeat_interval": 1,
            "log": {"format": "json"},
        }
        path = self.dir / f"{region}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def _log(self, region: str) -> str:
        p = self.dir / f"bridge-{region}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def show(self) -> None:
        us, eu, ap = (self.clients[r] for r in REGIONS)
        step("Writing three znodes in us-east (an application's ordinary writes)")
        writes = {
            "/critical/services/payments": b"10.0.1.17:8443",
            "/critical/shards/map": b'{"a-m": "db1", "n-z": "db2"}',
            "/critical/flags/new-checkout": b"off",
        }
        for path, data in writes.items():
            us.create(path, data, makepath=True)
            info(f"us-east   create {path} = {data.decode()}")
        for region in ("eu-west", "ap-south"):
            c = self.clients[region]
            for path, data in writes.items():
                took = wait_until(lambda c=c, p=path, d=data: c.exists(p) is not None
                                  and c.get(p)[0] == d)
                info(f"{GREEN}✓{RESET} {region:9} has {path}  {DIM}(+{took * 1000:.0f} ms){RESET}")

        step("A concurrent write: the same flag set in us-east and eu-west at the same moment")
        flag = "/critical/flags/new-checkout"
        go = threading.Barrier(2)

        def write(client: KazooClient, value: bytes) -> None:
            go.wait()
            client.set(flag, value)

        threads = [threading.Thread(target=write, args=(us, b"on (us-east)")),
                   threading.Thread(target=write, args=(eu, b"on (eu-west)"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        info("us-east   set  " + flag + " = on (us-east)")
        info("eu-west   set  " + flag + " = on (eu-west)")
        wait_until(lambda: len({c.get(flag)[0] for c in self.clients.values()}) == 1, 30)
        final = us.get(flag)[0].decode()
        for region, c in self.clients.items():
            info(f"{GREEN}✓{RESET} {region:9} {flag} = {c.get(flag)[0].decode()}")
        conflicts = [json.loads(line) for r in REGIONS for line in self._log(r).splitlines()
                     if '"conflict_resolved"' in line]
        info(f"all regions agree on {final!r}: the vector clocks showed the writes were "
             f"concurrent, and every region applied the same rule (last writer wins on the "
             f"hybrid timestamp). Conflicts logged: {len(conflicts)}.")

        self.lag_tour()
        step("zkbridge conflicts: the conflict just made, both versions and the winner")
        rc = self.zkbridge("conflicts", "-c", str(self.configs["eu-west"]), "--limit", "1")
        self.expect(rc, 0, "zkbridge conflicts", "")
        info("local = eu-west's own write, remote = us-east's; every region recorded the same "
             "winner by the same rule (lww).")

        step("zkbridge status: one region at a glance, verdict first")
        rc = self.zkbridge("status", "-c", str(self.configs["us-east"]),
                           keep=lambda line: not line.startswith("counters "))
        self.expect(rc, 0, "zkbridge status", "")

        step("A delete in ap-south")
        ap.delete("/critical/services", recursive=True)
        for region in ("us-east", "eu-west"):
            took = wait_until(lambda c=self.clients[region]: c.exists("/critical/services") is None)
            info(f"{GREEN}✓{RESET} {region:9} no longer has /critical/services  "
                 f"{DIM}(+{took * 1000:.0f} ms){RESET}")

        step("zkbridge verify: compare the replicated subtrees of all regions, read-only")
        cmd = [sys.executable, "-m", "bridge", "verify", "--meta"]
        for r in REGIONS:
            cmd += ["-c", str(self.configs[r])]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        print("  $ zkbridge verify --meta " + " ".join(f"-c {r}.yaml" for r in REGIONS))
        for line in (out.stdout + out.stderr).splitlines():
            info("  " + line)
        self.expect(out.returncode, 0, "zkbridge verify --meta", "identical")

    def lag_tour(self) -> None:
        us, eu = self.clients["us-east"], self.clients["eu-west"]
        step("Replication lag: ap-south's bridge stops, us-east keeps writing")
        procs.stop(self.bridges["ap-south"])
        info("ap-south  bridge stopped (its ZooKeeper still serves its applications)")
        burst = 100
        for i in range(burst):
            us.create_async(f"/critical/burst/n{i:03d}", b"v", makepath=True)
        took = wait_until(lambda: len(eu.get_children("/critical/burst")
                                      if eu.exists("/critical/burst") else []) == burst, 60)
        info(f"us-east   wrote {burst} znodes under /critical/burst; eu-west has them all "
             f"{DIM}(+{took * 1000:.0f} ms){RESET}, ap-south none")
        cfg = str(self.configs["ap-south"])

        def behind_for(seconds: float) -> bool:
            out = subprocess.run([sys.executable, "-m", "bridge", "lag", "-c", cfg, "--json"],
                                 capture_output=True, text=True, cwd=REPO)
            rows = json.loads(out.stdout)["rows"] if out.returncode == 0 else []
            return any(r["peer"] == "us-east" and (r["seconds_behind"] or 0) > seconds
                       for r in rows)

        wait_until(lambda: behind_for(3), 30)
        rc = self.zkbridge("lag", "-c", cfg, "--max-seconds", "3")
        self.expect(rc, 1, "zkbridge lag with ap-south's bridge stopped",
                    "what a cron job or a monitoring check alerts on. It works with the bridge "
                    "stopped: positions come from ap-south's ZooKeeper, end offsets from Kafka.")

        step("ap-south's bridge restarts and catches up from Kafka")
        t0 = time.monotonic()
        self._start_bridge("ap-south")
        self._wait_ready("ap-south", 2)
        info(f"{GREEN}✓{RESET} ap-south  ready after {time.monotonic() - t0:.1f} s "
             f"(READY only once caught up)")
        rc = self.zkbridge("lag", "-c", cfg, "--max-seconds", "3")
        self.expect(rc, 0, "zkbridge lag right after ap-south's bridge is ready",
                    "the alert clears. `zkbridge lag --watch` shows this live, with each "
                    "row's trend.")

    def down(self) -> None:
        for c in self.clients.values():
            c.stop()
            c.close()
        for proc in self.bridges.values():
            procs.stop(proc)
        self.broker.close()
        for s in self.servers.values():
            s.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--once", action="store_true", help="tear down after the tour")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="zkbridge-demo-"))
    demo = Demo(workdir)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        demo.up()
        demo.show()
        if not args.once:
            step("The federation keeps running. Try it yourself, then press Ctrl-C to stop:")
            for r in REGIONS:
                info(f"{r:9} ZooKeeper {demo.servers[r].hosts}   config {demo.configs[r]}")
            info(f"e.g. {sys.executable} -m bridge verify -c {demo.configs['us-east']} "
                 f"-c {demo.configs['eu-west']}")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print()
    finally:
        step("Stopping everything")
        demo.down()
        if not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        info("done")
    if demo.problems:
        print(f"\nThe tour showed {len(demo.problems)} thing(s) it should not have; please "
              "report them with the bridges' logs (scripts/demo --keep keeps them):", flush=True)
        for problem in demo.problems:
            print(f"  - {problem}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
