"""The nemesis: a seeded schedule of overlapping faults, and the threads that apply and undo them.

The schedule (what, where, when, how long) is a pure function of the seed
and is printed before the run. Which bridge is "leader" is resolved when the
fault fires, so that part follows the run. A fault whose target is already
under another fault of the same kind (a second kill of the same ensemble) is
skipped and logged as such, never stacked.

A clock jump restarts one bridge with its wall clock shifted
(``ZKBRIDGE_CLOCK_OFFSET_MS``, within ``max_clock_skew``) for the fault's
length, then restarts it with the true clock: so its clock jumps once
forwards or backwards, and once back. Moving this machine's clock instead
would hit every process.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tests.chaos.topology import REGIONS, SESSION_TIMEOUT, Bridge, Cluster

FAILPOINTS = (
    "after_outbox_write",  # capture: durable in ZooKeeper, not yet published
    "after_publish_before_outbox_delete",  # publish: acked, outbox entry still there
    "before_apply",  # apply: batch complete, nothing written
    "after_apply_before_position",  # apply: just after the multi
)

KINDS_ALL = (
    "bridge_kill", "bridge_pause", "zk_kill_one", "zk_kill_majority", "session_expiry",
    "region_cut", "broker_restart", "failpoint", "clock_jump", "exclude",
)
# The bridges' max_clock_skew is the default, 60 s: jumps stay well inside it.
CLOCK_JUMP_MAX_S = 40.0
KAFKA_ONLY = ("region_cut", "broker_restart")
# How long an include may take to show (a leader down meanwhile starts first).
INCLUDE_WAIT_S = 60.0
# How an exclude fault takes its path in again: a reload (SIGHUP), as most
# operators would, or a restart of the region's bridges, with each new process
# armed to die once at a step of the join (``bridge/failpoints.py``).
JOIN_CRASHES = ("join_marked", "join_listed", "join_ending")
INCLUDES = ("reload", "reload", "restart", *(f"crash at {fp}" for fp in JOIN_CRASHES))
# How long such a restart waits for other faults to let go of the bridges.
CLAIM_WAIT_S = 20.0


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the nemesis starts
    kind: str
    region: str
    role: str  # leader | standby (bridge faults), leader | any (zk), "" otherwise
    duration: float
    detail: str = ""

    def describe(self) -> str:
        target = self.region + (f"/{self.role}" if self.role else "")
        extra = f" {self.detail}" if self.detail else ""
        return f"t+{self.at:5.1f}s {self.kind:<16} {target:<12} {self.duration:4.1f}s{extra}"


def schedule(seed: int, seconds: float, kinds: tuple[str, ...]) -> list[Fault]:
    rng = random.Random(seed)
    out: list[Fault] = []
    t = rng.uniform(1.0, 3.0)
    while t < seconds:
        kind = rng.choice(kinds)
        region = rng.choice(REGIONS)
        role, detail = "", ""
        duration = rng.uniform(3.0, 12.0)
        if kind in ("bridge_kill", "bridge_pause", "session_expiry", "clock_jump"):
            role = rng.choice(("leader", "leader", "standby"))
        if kind == "clock_jump":
            detail = f"{rng.choice((-1, 1)) * rng.uniform(2.0, CLOCK_JUMP_MAX_S):+.1f}s"
        elif kind == "zk_kill_one":
            role = rng.choice(("leader", "any"))
        elif kind == "zk_kill_majority":
            duration = rng.uniform(3.0, 8.0)
        elif kind == "failpoint":
            fp = rng.choice(FAILPOINTS)
            detail = f"{fp}=crash@{rng.randint(1, 6)}"
            duration = rng.uniform(10.0, 20.0)
        elif kind == "broker_restart":
            duration = 0.0
        elif kind == "exclude":
            # The region's own keys, the contended ones, or another region's.
            other = rng.choice([r for r in REGIONS if r != region])
            detail = f"{rng.choice(('/shared', f'/{region}', f'/{other}'))} {rng.choice(INCLUDES)}"
            duration = rng.uniform(8.0, 20.0)
        if kind == "session_expiry":
            duration = SESSION_TIMEOUT * 1.5 + rng.uniform(1.0, 3.0)
        out.append(Fault(round(t, 1), kind, region, role, round(duration, 1), detail))
        t += rng.expovariate(1 / 4.0) + 0.5
    return out


@dataclass(frozen=True)
class Excluded:
    """A path a region's configuration excluded, from ``start`` until its bridge took
    it in again (``end``: its ``paths_joining``; None: not seen)."""

    region: str
    path: str
    start: float
    end: float | None


@dataclass
class Armed:
    """A region's bridges restarted with a failpoint ("": none), as started."""

    failpoint: str
    procs: list[tuple[Bridge, subprocess.Popen[bytes]]]
    crashed: int = 0

    def revive(self, cluster: Cluster) -> None:
        """Start unarmed each one the failpoint killed (as the supervisor would)."""
        for b, proc in self.procs:
            if b.proc is proc and proc.poll() is not None:
                self.crashed += proc.returncode == -9
                b.proc = None
                cluster.start_bridge(b)

    def disarm(self, cluster: Cluster) -> None:
        """Restart unarmed each armed one still running: a failpoint never outlives
        its fault."""
        self.revive(cluster)
        for b, proc in self.procs:
            if self.failpoint and b.proc is proc:
                cluster.kill_bridge(b)
                cluster.start_bridge(b)


@dataclass
class Applied:
    fault: Fault
    outcome: str = "pending"  # applied | skipped: why | error: why
    target: str = ""
    started: float = 0.0
    ended: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"fault": self.fault.describe(), "kind": self.fault.kind,
                "outcome": self.outcome, "target": self.target,
                "started": self.started, "ended": self.ended}


class Nemesis:
    def __init__(self, cluster: Cluster, faults: list[Fault], log: Any) -> None:
        self.cluster = cluster
        self.faults = faults
        self.log = log
        self.applied: list[Applied] = []
        self._threads: list[threading.Thread] = []
        self._busy: set[str] = set()
        self._held_down: set[str] = set()  # bridges a kill keeps down
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._runner: threading.Thread | None = None
        self._supervisor: threading.Thread | None = None
        self.supervisor_restarts = 0
        self.excluded: list[Excluded] = []

    # -- driving -------------------------------------------------------------
    def start(self) -> None:
        self._runner = threading.Thread(target=self._run, name="nemesis", daemon=True)
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor",
                                            daemon=True)
        self._runner.start()
        self._supervisor.start()

    def stop(self) -> None:
        """Stop firing, wait for every running fault to undo itself."""
        self._stop.set()
        if self._runner is not None:
            self._runner.join()
        for t in self._threads:
            t.join(180)
        if self._supervisor is not None:
            self._supervisor.join(10)

    def _run(self) -> None:
        t0 = time.monotonic()
        for f in self.faults:
            wait = t0 + f.at - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            a = Applied(f)
            self.applied.append(a)
            th = threading.Thread(target=self._fire, args=(a,), name=f"fault-{f.kind}",
                                  daemon=True)
            self._threads.append(th)
            th.start()

    def _supervise(self) -> None:
        # As systemd's Restart=always would: a bridge that died (a failpoint,
        # a fatal error) comes back after a second, unless a kill holds it down.
        while not self._stop.wait(1.0):
            for b in self.cluster.bridges:
                with self._lock:
                    held = b.name in self._held_down or f"bridge:{b.name}" in self._busy
                if not held and not b.alive:
                    self.log(f"supervisor: restarting {b.name}")
                    self.supervisor_restarts += 1
                    self.cluster.start_bridge(b)

    # -- helpers -------------------------------------------------------------
    def _claim(self, key: str) -> bool:
        with self._lock:
            if key in self._busy:
                return False
            self._busy.add(key)
            return True

    def _release(self, key: str) -> None:
        with self._lock:
            self._busy.discard(key)

    def _bridge(self, region: str, role: str) -> Bridge:
        bridges = self.cluster.regions[region].bridges
        leaders = [b for b in bridges if b.is_leader()]
        if role == "leader":
            return leaders[0] if leaders else bridges[0]
        others = [b for b in bridges if b not in leaders]
        return others[0] if others else bridges[1]

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)  # faults run their full length even while stopping

    # -- faults ----------------------------------------------------------------
    def _fire(self, a: Applied) -> None:
        f = a.fault
        a.started = time.time()
        try:
            getattr(self, f"_do_{f.kind}")(a)
        except Exception as exc:
            a.outcome = f"error: {exc!r}"[:300]
        a.ended = time.time()
        self.log(f"{f.describe()} -> {a.target} {a.outcome}")

    def _restart_held(self, a: Applied, clock_offset_ms: int = 0) -> None:
        """Kill the target bridge, keep the supervisor off it for the fault's length.

        With ``clock_offset_ms`` it runs meanwhile with its clock that far off;
        either way it comes back as a normal process.
        """
        b = self._bridge(a.fault.region, a.fault.role)
        a.target = b.name
        if not self._claim(f"bridge:{b.name}"):
            a.outcome = "skipped: bridge busy"
            return
        try:
            with self._lock:
                self._held_down.add(b.name)
            self.cluster.kill_bridge(b)
            if clock_offset_ms:
                self.cluster.start_bridge(b, clock_offset_ms=clock_offset_ms)
            a.outcome = "applied"
            self._sleep(a.fault.duration)
            self.cluster.kill_bridge(b)
            self.cluster.start_bridge(b)
        finally:
            with self._lock:
                self._held_down.discard(b.name)
            self._release(f"bridge:{b.name}")

    def _do_bridge_kill(self, a: Applied) -> None:
        self._restart_held(a)

    def _do_bridge_pause(self, a: Applied) -> None:
        b = self._bridge(a.fault.region, a.fault.role)
        a.target = b.name
        if not self._claim(f"bridge:{b.name}"):
            a.outcome = "skipped: bridge busy"
            return
        try:
            self.cluster.pause_bridge(b)
            a.outcome = "applied"
            self._sleep(a.fault.duration)
            self.cluster.resume_bridge(b)
        finally:
            self._release(f"bridge:{b.name}")

    def _do_failpoint(self, a: Applied) -> None:
        # The failpoint only fires in a leader: restart the standby with it,
        # then crash the leader so that the armed process takes over.
        b = self._bridge(a.fault.region, "standby")
        other = next(x for x in self.cluster.regions[a.fault.region].bridges if x is not b)
        a.target = b.name
        if not self._claim(f"bridge:{b.name}"):
            a.outcome = "skipped: bridge busy"
            return
        if not self._claim(f"bridge:{other.name}"):
            self._release(f"bridge:{b.name}")
            a.outcome = "skipped: bridge busy"
            return
        try:
            self.cluster.kill_bridge(b)
            self.cluster.start_bridge(b, failpoints=a.fault.detail)
            time.sleep(1.0)
            self.cluster.kill_bridge(other)
            a.outcome = "applied"
            end = time.monotonic() + a.fault.duration
            while time.monotonic() < end and b.alive:
                if not other.alive and (b.is_leader() or time.monotonic() > end - 2):
                    self.cluster.start_bridge(other)
                time.sleep(0.2)
            led = any(e.get("event") == "bridge_ready" for e in b.events()[-2000:])
            a.outcome = ("applied (crashed)" if not b.alive
                         else "applied (not reached)" if led else "applied (never led)")
            # Back to a normal process either way, so failpoints never outlive the fault.
            self.cluster.kill_bridge(b)
            self.cluster.start_bridge(b)
            self.cluster.start_bridge(other)
        finally:
            self._release(f"bridge:{other.name}")
            self._release(f"bridge:{b.name}")

    def _do_session_expiry(self, a: Applied) -> None:
        b = self._bridge(a.fault.region, a.fault.role)
        a.target = b.name
        if not self._claim(f"zkproxy:{b.name}"):
            a.outcome = "skipped: proxies busy"
            return
        try:
            for p in b.zk_proxies:
                p.cut()
            a.outcome = "applied"
            self._sleep(a.fault.duration)
        finally:
            for p in b.zk_proxies:
                p.restore()
            self._release(f"zkproxy:{b.name}")

    def _do_zk_kill_one(self, a: Applied) -> None:
        ens = self.cluster.regions[a.fault.region].ensemble
        if not self._claim(f"zk:{a.fault.region}"):
            a.outcome = "skipped: ensemble busy"
            return
        try:
            leader = ens.leader() if a.fault.role == "leader" else None
            victim = leader or ens.servers[int(a.fault.duration * 10) % len(ens.servers)]
            a.target = f"{victim.name} ({'leader' if victim is leader else 'member'})"
            victim.kill()
            a.outcome = "applied"
            self._sleep(a.fault.duration)
            ens.start_members([victim])
        finally:
            self._release(f"zk:{a.fault.region}")

    def _do_zk_kill_majority(self, a: Applied) -> None:
        ens = self.cluster.regions[a.fault.region].ensemble
        if not self._claim(f"zk:{a.fault.region}"):
            a.outcome = "skipped: ensemble busy"
            return
        try:
            first = int(a.fault.duration * 10) % len(ens.servers)
            victims = [ens.servers[first], ens.servers[(first + 1) % len(ens.servers)]]
            a.target = ",".join(v.name for v in victims)
            for v in victims:
                v.kill()
            a.outcome = "applied"
            self._sleep(a.fault.duration)
            ens.start_members(victims)
        finally:
            self._release(f"zk:{a.fault.region}")

    def _do_region_cut(self, a: Applied) -> None:
        a.target = a.fault.region
        if not self.cluster.can_cut:
            a.outcome = "skipped: regions share the root network namespace"
            return
        if not self._claim(f"cut:{a.fault.region}"):
            a.outcome = "skipped: already cut"
            return
        try:
            self.cluster.cut(a.fault.region)
            a.outcome = "applied"
            self._sleep(a.fault.duration)
        finally:
            self.cluster.uncut(a.fault.region)
            self._release(f"cut:{a.fault.region}")

    def _do_clock_jump(self, a: Applied) -> None:
        self._restart_held(a, clock_offset_ms=int(float(a.fault.detail.rstrip("s")) * 1000))

    def _do_broker_restart(self, a: Applied) -> None:
        a.target = self.cluster.broker.kind
        if self.cluster.broker.kind != "kafka":
            a.outcome = "skipped: tansu loses every topic on restart"
            return
        if not self._claim("broker"):
            a.outcome = "skipped: broker busy"
            return
        try:
            t0 = time.monotonic()
            # SIGKILL: a clean KRaft shutdown can take a minute on this machine,
            # and a crash is the harder case (the broker recovers its logs).
            self.cluster.broker.kill()
            self.cluster.broker.start()
            a.outcome = f"applied (down {time.monotonic() - t0:.1f}s)"
        finally:
            self._release("broker")

    def _do_exclude(self, a: Applied) -> None:
        region, (path, how) = a.fault.region, a.fault.detail.split(" ", 1)
        a.target = f"{region} {path}"
        if not self._claim(f"exclude:{region}"):
            a.outcome = "skipped: an exclude runs there"
            return
        armed: Armed | None = None
        try:
            start = time.time()
            self.cluster.set_exclude(region, (path,))
            a.outcome = "applied"
            self._sleep(a.fault.duration)
            marked = self._events(region, "paths_joining")
            joined = self._events(region, "subtree_joined")
            if how != "reload":
                armed = self._restart_armed(region, how.removeprefix("crash at "))
            if armed is None:
                how = "reload" if how == "reload" else "reload (bridges busy)"
                self.cluster.set_exclude(region, ())
            # The include takes effect when a leader marks the path joining (at
            # once, or when one starts): the region's writes there before it are
            # the ones it held while excluded.
            end: float | None = None
            deadline = time.monotonic() + INCLUDE_WAIT_S
            while time.monotonic() < deadline:
                if armed is not None:
                    armed.revive(self.cluster)
                if end is None and self._events(region, "paths_joining", since=marked):
                    end = time.time()
                if end is not None and (done := self._events(region, "subtree_joined",
                                                             since=joined)):
                    # A start killed during the join (another fault) marks it again.
                    marks = len(self._events(region, "paths_joining", since=marked))
                    a.outcome = (f"applied (by {how}; marked {marks}x, joined, "
                                 f"published {done[-1].get('published')}")
                    break
                time.sleep(0.5)
            if end is None:
                a.outcome = f"applied (by {how}; include not seen"
            self.excluded.append(Excluded(region, path, start, end))
        finally:
            if armed is not None:
                armed.disarm(self.cluster)
                if armed.failpoint:
                    a.outcome += f"; {armed.crashed} of {len(armed.procs)} crashed"
                for b, _ in armed.procs:
                    self._release(f"bridge:{b.name}")
            if a.outcome.startswith("applied ("):
                a.outcome += ")"
            self._release(f"exclude:{region}")

    def _restart_armed(self, region: str, how: str) -> Armed | None:
        """Include by restarting the region's bridges with its exclude list gone, each
        armed (unless ``how`` is "restart") to die once at that failpoint. None if
        another fault holds one of them; else they stay claimed until disarmed."""
        bridges = self.cluster.regions[region].bridges
        deadline = time.monotonic() + CLAIM_WAIT_S
        while True:
            claimed = [b for b in bridges if self._claim(f"bridge:{b.name}")]
            if len(claimed) == len(bridges):
                break
            for b in claimed:
                self._release(f"bridge:{b.name}")
            if time.monotonic() > deadline:
                return None
            time.sleep(0.5)
        self.cluster.set_exclude(region, (), reload=False)
        fp = "" if how == "restart" else how
        for b in bridges:
            self.cluster.kill_bridge(b)
            self.cluster.start_bridge(b, failpoints=f"{fp}=crash@1" if fp else None)
        return Armed(fp, [(b, b.proc) for b in bridges if b.proc is not None])

    def _events(self, region: str, event: str,
                since: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """The region's bridges' log events named ``event`` (after those in ``since``,
        an earlier answer: each log only grows)."""
        out = []
        for b in self.cluster.regions[region].bridges:
            seen = sum(1 for e in since or () if e["bridge"] == b.name)
            out += [{**e, "bridge": b.name} for e in b.events(event)
                    if e.get("event") == event][seen:]
        return out
