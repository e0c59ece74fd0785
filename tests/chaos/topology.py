"""The campaign's servers: three regions (3-server ensemble, two bridges each) and one broker.

With Apache Kafka each region lives in its own network namespace
(`tests/harness/netns.py`): its three ZooKeeper servers and two bridges run
inside, and it has two links to the root namespace. Its WAN link is the only
way to the broker, which gets one listener per region on that link's root
side, advertised as itself, so metadata never leads a client around a cut.
Cutting a region takes its WAN link down: the kernel drops its packets to
Kafka, and so to every other region, without an answer. Its LAN link stays
up: the harness's clients (standing in for the region's applications) and
the bridges' ZooKeeper proxies reach the ensemble over it, so the region's
applications and bridges keep their ZooKeeper while it is cut off.

Every bridge reaches its ensemble through its own proxies (one per member,
on the LAN), so one bridge's session can be expired alone.

tansu has a single loopback listener: with it everything runs in the root
namespace, and the region cut and broker restart are left out of the
schedule.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kazoo.client import KazooClient

from tests.harness import netns, procs
from tests.harness.broker import Broker, KafkaBroker, TansuBroker
from tests.harness.ensemble import ZooKeeperEnsemble
from tests.harness.namespace import new_token
from tests.harness.netns import RegionNetworks
from tests.harness.proxy import TcpProxy

REPO = Path(__file__).resolve().parents[2]
REGIONS = ("r1", "r2", "r3")
SUBTREE = "app"
MOUNT = "/app"
STATE_PATH = "/zkbridge"
SESSION_TIMEOUT = 4


def region_kafka(base_dir: Path, nets: RegionNetworks) -> KafkaBroker:
    """Apache Kafka with a listener per region, on the root side of the region's WAN link."""
    listeners = {f"REGION_{r.upper().replace('-', '_')}": f"{nets[r].host_addr}:{procs.free_port()}"
                 for r in nets.regions}
    # A loaded 2-core machine running nine ZooKeeper JVMs next to it can take
    # well over the default 90 s to bring KRaft back.
    return KafkaBroker(base_dir, extra_listeners=listeners, start_timeout=300.0)


@contextlib.contextmanager
def zk_client(hosts: str) -> Iterator[KazooClient]:
    """A harness client of one ensemble (its applications' side), closed after use."""
    client = KazooClient(hosts=hosts, timeout=10.0)
    client.start(timeout=30)
    try:
        yield client
    finally:
        client.stop()
        client.close()


@dataclass
class Bridge:
    region: str
    name: str  # r1a, r1b
    config_path: Path
    log_path: Path
    zk_proxies: list[TcpProxy]
    proc: subprocess.Popen[bytes] | None = None
    stopped: bool = False  # SIGSTOPped
    starts: int = 0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The log's JSON lines; with ``name``, only those that may be that event (the
        others are not parsed: a nemesis polls logs of a few MB)."""
        out: list[dict[str, Any]] = []
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            if line.startswith("{") and (name is None or name in line):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def is_leader(self) -> bool:
        """Alive and its last role line says it leads (good enough to aim a fault)."""
        if not self.alive:
            return False
        role = False
        for e in self.events():
            if e.get("event") == "bridge_ready":
                role = True
            elif e.get("event") == "leadership_lost":
                role = False
        return role


@dataclass
class Region:
    name: str
    ensemble: ZooKeeperEnsemble
    bridges: list[Bridge]

    @property
    def kafka_proxy_name(self) -> str:
        return f"kafka-{self.name}"


class Cluster:
    """Starts and stops everything; `folder` holds configs, logs and server data."""

    def __init__(self, folder: Path, broker_kind: str, token: str) -> None:
        """Creates the namespaces (Kafka only); `close` removes them, also after a failed start."""
        self.folder = folder
        self.broker_kind = broker_kind
        self.prefix = f"chaos-{token}"
        self.nets: RegionNetworks | None = None
        if broker_kind == "kafka":
            reason = netns.unavailable()
            if reason is not None:
                raise RuntimeError(f"the campaign on Apache Kafka puts each region in a network "
                                   f"namespace: {reason} (run as root, or --broker tansu)")
            self.nets = RegionNetworks(new_token(), REGIONS, lan=True).start()
        nets = self.nets
        self.broker: Broker = (
            region_kafka(folder / "kafka", nets) if nets is not None
            else TansuBroker(folder / "tansu")
        )
        self.regions: dict[str, Region] = {}
        # Paths (relative to the mount) each region's configuration excludes now.
        self.excludes: dict[str, tuple[str, ...]] = {}
        for r in REGIONS:
            lan = nets.lans[r] if nets is not None else None
            ens = (ZooKeeperEnsemble(r, folder / f"zk-{r}", host=lan.ns_addr, prefix=lan.prefix)
                   if lan is not None else ZooKeeperEnsemble(r, folder / f"zk-{r}"))
            bridges = []
            for suffix in ("a", "b"):
                name = f"{r}{suffix}"
                proxies = [
                    TcpProxy(s.host, s.port, listen_port=procs.free_port(),
                             name=f"{name}-{s.name}",
                             listen_host=lan.host_addr if lan is not None else "127.0.0.1")
                    for s in ens
                ]
                bridges.append(Bridge(r, name, folder / f"{name}.yaml",
                                      folder / f"bridge-{name}.log", proxies))
            self.regions[r] = Region(r, ens, bridges)

    # -- addresses -----------------------------------------------------------
    @property
    def can_cut(self) -> bool:
        return self.nets is not None

    def bootstrap_for(self, region: str) -> str:
        if self.nets is not None:
            assert isinstance(self.broker, KafkaBroker)
            name = f"REGION_{region.upper().replace('-', '_')}"
            return self.broker.extra_listeners[name]
        return self.broker.bootstrap

    def cut(self, region: str) -> None:
        """The region's WAN link down: no Kafka, so no other region, until `uncut`."""
        assert self.nets is not None
        self.nets.cut(region)

    def uncut(self, region: str) -> None:
        assert self.nets is not None
        self.nets.heal(region)

    @property
    def bridges(self) -> list[Bridge]:
        return [b for r in self.regions.values() for b in r.bridges]

    def config_doc(self, b: Bridge) -> dict[str, Any]:
        exclude = self.excludes.get(b.region, ())
        return {
            "region": b.region,
            "zookeeper": {
                "hosts": ",".join(p.address for p in b.zk_proxies),
                "session_timeout": SESSION_TIMEOUT,
                "connect_timeout": 30,
            },
            "kafka": {
                "bootstrap_servers": self.bootstrap_for(b.region),
                "topic_prefix": self.prefix,
                "enable_idempotence": self.broker.supports_idempotence,
                "request_timeout": 10,
            },
            "peers": [r for r in REGIONS if r != b.region],
            "subtrees": [{"name": SUBTREE, "path": MOUNT,
                          **({"exclude": list(exclude)} if exclude else {})}],
            "state_path": STATE_PATH,
            "heartbeat_interval": 1,
            # Audits (10 minutes by default) run amid the round's writes and faults.
            "audit_interval": 5,
            "log": {"format": "json", "level": "info"},
        }

    def set_exclude(self, region: str, exclude: tuple[str, ...], reload: bool = True) -> None:
        """Rewrite the region's bridges' configuration and reload them (SIGHUP), as an
        operator would; a bridge down meanwhile reads the file when it starts."""
        self.excludes[region] = exclude
        for b in self.regions[region].bridges:
            b.config_path.write_text(yaml.safe_dump(self.config_doc(b)))
        for b in self.regions[region].bridges if reload else ():
            if b.alive and b.proc is not None:
                b.proc.send_signal(signal.SIGHUP)

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        ensembles = [r.ensemble for r in self.regions.values()]
        for e in ensembles:
            for s in e:
                s.spawn()
        self.broker.start()
        for e in ensembles:
            e.start_members(list(e))
            # The mount exists before any bridge starts, as in production.
            with zk_client(e.hosts) as client:
                client.ensure_path(MOUNT)
        for b in self.bridges:
            for p in b.zk_proxies:
                p.start()
            b.config_path.write_text(yaml.safe_dump(self.config_doc(b)))
        for b in self.bridges:
            self.start_bridge(b)

    def start_bridge(self, b: Bridge, failpoints: str | None = None, seed: int = 0,
                     clock_offset_ms: int = 0) -> None:
        if b.alive:
            return
        env = {"PYTHONPATH": str(REPO)}
        if failpoints:
            env["ZKBRIDGE_FAILPOINTS"] = failpoints
            env["ZKBRIDGE_FAILPOINT_SEED"] = str(seed)
        if clock_offset_ms:
            env["ZKBRIDGE_CLOCK_OFFSET_MS"] = str(clock_offset_ms)
        with open(b.log_path, "a") as log:
            log.write(f"==== start {b.name} failpoints={failpoints or '-'} "
                      f"clock_offset_ms={clock_offset_ms}\n")
        prefix = self.nets[b.region].prefix if self.nets is not None else ()
        b.proc = procs.spawn(
            [*prefix, sys.executable, "-m", "bridge", "run", "-c", str(b.config_path)],
            b.log_path, env=env, cwd=REPO,
        )
        b.stopped = False
        b.starts += 1

    def kill_bridge(self, b: Bridge) -> None:
        if b.proc is not None:
            if b.stopped:
                b.proc.send_signal(signal.SIGCONT)
            procs.kill9(b.proc)
            b.proc = None
            b.stopped = False

    def pause_bridge(self, b: Bridge) -> None:
        if b.alive and b.proc is not None:
            b.proc.send_signal(signal.SIGSTOP)
            b.stopped = True

    def resume_bridge(self, b: Bridge) -> None:
        if b.proc is not None and b.stopped:
            b.proc.send_signal(signal.SIGCONT)
        b.stopped = False

    def heal(self) -> None:
        """Every proxy flowing, every server and bridge up (bridges without failpoints)."""
        for b in self.bridges:
            for p in b.zk_proxies:
                p.restore()
        if self.nets is not None:
            for r in REGIONS:
                if self.nets.is_cut(r):
                    self.nets.heal(r)
        if self.broker.managed and not self.broker.running:
            try:
                self.broker.start()
            except Exception:
                self.broker.start()
        for reg in self.regions.values():
            for attempt in range(3):
                try:
                    reg.ensemble.heal()
                    break
                except Exception:
                    if attempt == 2:
                        raise
        for b in self.bridges:
            self.resume_bridge(b)
            if not b.alive:
                self.start_bridge(b)

    def close(self) -> None:
        for b in self.bridges:
            if b.proc is not None:
                self.resume_bridge(b)
                procs.stop(b.proc)
                b.proc = None
            for p in b.zk_proxies:
                p.stop()
        self.broker.close()
        for reg in self.regions.values():
            reg.ensemble.close()
        if self.nets is not None:
            self.nets.close()  # last: a namespace goes once nothing runs in it
