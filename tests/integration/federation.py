"""A federation under test: regions (real ZooKeeper each), the broker, bridge processes.

Each test gets its own znode roots, state path and topic prefix (from its
token), so tests share the servers without seeing each other. Bridges run as
real ``python -m bridge run`` processes so that crashes are real SIGKILLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kazoo.client import KazooClient

from bridge.config import Settings
from bridge.configload import load_settings
from bridge.verify import Difference, verify
from tests.harness import procs
from tests.harness.broker import Broker
from tests.harness.zookeeper import ZooKeeperServer

REPO = Path(__file__).resolve().parents[2]

# Log events a healthy run never emits; a test that provokes one on purpose
# lists it in ``allowed``.
BAD_EVENTS = {
    "task_failed",
    "bridge_stopped",
    "event_rejected",
    "znode_oversized",
    "mass_delete_refused",
    "event_oversized",
}


@dataclass
class Region:
    name: str
    server: ZooKeeperServer
    config_path: Path
    log_path: Path
    mount: str
    client: KazooClient
    hosts: str = ""  # what the bridge connects to (a proxy address in some tests)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    ready_before: int = 0  # bridge_ready lines in the log when the last start began
    overrides: dict[str, Any] = field(default_factory=dict)
    prefix: tuple[str, ...] = ()  # before the bridge's command line (``ip netns exec NAME``)

    def path(self, rel: str = "") -> str:
        return self.mount + rel

    @contextlib.contextmanager
    def session(self, auth: str | None = None) -> Iterator[KazooClient]:
        """A client of its own (an application's session; ``auth``: a digest
        "user:password"), closed after use."""
        client = KazooClient(hosts=self.hosts,
                             auth_data=[("digest", auth)] if auth is not None else None)
        client.start(timeout=15)
        try:
            yield client
        finally:
            client.stop()
            client.close()

    @property
    def settings(self) -> Settings:
        return load_settings(self.config_path)


class Federation:
    def __init__(
        self,
        tmp: Path,
        token: str,
        broker: Broker,
        servers: Mapping[str, ZooKeeperServer],
    ) -> None:
        self.tmp = tmp
        self.token = token
        self.broker = broker
        self.subtree = "critical"
        self.prefix = f"zkb-{token}"
        self.state_path = f"/{token}/state"
        self.regions: dict[str, Region] = {}
        for name, server in servers.items():
            client = KazooClient(hosts=server.hosts, timeout=10.0)
            client.start(timeout=15)
            mount = f"/{token}/{name}-mount"  # mounts differ per region on purpose
            client.ensure_path(mount)
            self.regions[name] = Region(
                name=name,
                server=server,
                config_path=tmp / f"{name}.yaml",
                log_path=tmp / f"bridge-{name}.log",
                mount=mount,
                client=client,
                hosts=server.hosts,
            )
        for name in self.regions:
            self.write_config(name)

    def __getitem__(self, name: str) -> Region:
        return self.regions[name]

    # -- configs ---------------------------------------------------------
    def config_doc(self, name: str, peers: Iterable[str] | None = None) -> dict[str, Any]:
        r = self.regions[name]
        doc: dict[str, Any] = {
            "region": name,
            "zookeeper": {"hosts": r.hosts, "session_timeout": 4, "connect_timeout": 10},
            "kafka": {
                "bootstrap_servers": self.broker.bootstrap,
                "topic_prefix": self.prefix,
                "enable_idempotence": self.broker.supports_idempotence,
            },
            "peers": sorted(peers if peers is not None else (n for n in self.regions if n != name)),
            "subtrees": [{"name": self.subtree, "path": r.mount}],
            "state_path": self.state_path,
            "heartbeat_interval": 1,
            "log": {"format": "json", "level": "info"},
        }
        for key, value in r.overrides.items():
            if isinstance(value, dict) and isinstance(doc.get(key), dict):
                doc[key] = {**doc[key], **value}
            else:
                doc[key] = value
        return doc

    def write_config(self, name: str, peers: Iterable[str] | None = None, **overrides: Any) -> Path:
        r = self.regions[name]
        r.overrides.update(overrides)
        r.config_path.write_text(yaml.safe_dump(self.config_doc(name, peers)))
        return r.config_path

    def write_exclude(self, name: str, exclude: Iterable[str] = ()) -> Path:
        """``name``'s config with its subtree excluding ``exclude`` (nothing: the whole of it)."""
        st: dict[str, Any] = {"name": self.subtree, "path": self.regions[name].mount}
        return self.write_config(name, subtrees=[{**st, "exclude": list(exclude)}])

    def exclude_by(self, name: str, how: str, exclude: Iterable[str] = ()) -> None:
        """Give ``name`` a new exclude list by ``how``: "reload" (SIGHUP), "restart", or
        "reload-killed" (SIGHUP to a bridge a failpoint kills there; then started again)."""
        self.write_exclude(name, exclude)
        r = self.regions[name]
        if how == "restart":
            assert self.stop(name) == 0
            self.start(name)
            return
        assert r.proc is not None
        r.proc.send_signal(signal.SIGHUP)
        if how == "reload-killed":
            assert r.proc.wait(timeout=30) == -signal.SIGKILL
            self.start(name)

    # -- bridge processes ---------------------------------------------------
    def start(
        self,
        name: str,
        *,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        args: Iterable[str] = (),
        code: Path = REPO,
    ) -> Region:
        r = self.regions[name]
        assert r.proc is None or r.proc.poll() is not None, f"{name}: bridge already running"
        r.proc = procs.spawn(
            [*r.prefix, sys.executable, "-m", "bridge", "run", "-c", str(r.config_path), *args],
            r.log_path,
            env={"PYTHONPATH": str(code), **(env or {})},
            cwd=code,
        )
        r.starts += 1
        r.ready_before = self.count_events(name, "bridge_ready")
        if wait:
            self.wait_ready(name)
        return r

    def crash_at(self, name: str, failpoints: str, timeout: float = 60) -> None:
        """Start ``name``'s bridge with ``ZKBRIDGE_FAILPOINTS`` and wait until one kills it."""
        r = self.start(name, env={"ZKBRIDGE_FAILPOINTS": failpoints}, wait=False)
        proc = r.proc
        assert proc is not None
        procs.wait_for(lambda: proc.poll() is not None, timeout,
                       message=f"{name}: {failpoints} never fired")
        assert proc.returncode == -9, proc.returncode
        r.proc = None

    def start_all(self) -> None:
        for name in self.regions:
            self.start(name, wait=False)
        for name in self.regions:
            self.wait_ready(name)

    def wait_ready(self, name: str, timeout: float = 60) -> None:
        r = self.regions[name]

        def ready() -> bool:
            if r.proc is not None and r.proc.poll() is not None:
                raise AssertionError(
                    f"bridge {name} exited {r.proc.returncode}:\n{procs.log_tail(r.log_path)}"
                )
            return self.count_events(name, "bridge_ready") > r.ready_before

        procs.wait_for(
            ready,
            timeout,
            interval=0.1,
            message=lambda: f"bridge {name} not ready:\n{procs.log_tail(r.log_path)}",
        )

    def stop(self, name: str) -> int | None:
        r = self.regions[name]
        if r.proc is None:
            return None
        rc = procs.stop(r.proc)
        r.proc = None
        return rc

    def kill(self, name: str) -> None:
        r = self.regions[name]
        if r.proc is not None:
            procs.kill9(r.proc)
            r.proc = None

    def close(self) -> None:
        for name, r in self.regions.items():
            if r.proc is not None:
                self.stop(name)
            try:
                r.client.stop()
            finally:
                r.client.close()

    # -- logs ----------------------------------------------------------------
    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        try:
            text = self.regions[name].log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def count_events(self, name: str, event: str) -> int:
        return sum(1 for e in self.events(name) if e.get("event") == event)

    def assert_clean_logs(self, allowed: Iterable[str] = ()) -> None:
        """Fail on any unexpected error or traceback a bridge logged."""
        ok = set(allowed)
        problems = []
        for name, r in self.regions.items():
            for e in self.events(name):
                if e.get("event") in BAD_EVENTS - ok or (
                    e.get("level") == "error" and e.get("event") not in ok
                ):
                    problems.append(f"{name}: {e}")
            text = r.log_path.read_text(errors="replace") if r.log_path.exists() else ""
            if "Traceback" in text and "traceback" not in ok:
                problems.append(f"{name}: traceback in log:\n{procs.log_tail(r.log_path, 60)}")
        assert not problems, "unexpected bridge errors:\n" + "\n".join(problems[:20])

    # -- state -----------------------------------------------------------
    def differences(
        self, names: Iterable[str] | None = None, meta: bool = True
    ) -> list[Difference]:
        configs = [self.regions[n].settings for n in (names or self.regions)]
        return asyncio.run(verify(configs, meta=meta))

    def wait_converged(
        self, names: Iterable[str] | None = None, timeout: float = 90, meta: bool = True
    ) -> None:
        chosen = list(names or self.regions)
        last: list[Difference] = []

        def same() -> bool:
            nonlocal last
            last = self.differences(chosen, meta=meta)
            return not last

        procs.wait_for(
            same,
            timeout,
            interval=0.5,
            message=lambda: (
                f"regions {chosen} did not converge; {len(last)} differences, first: "
                + "; ".join(f"{d.path}: {d.detail}" for d in last[:5])
            ),
        )

    def tree(self, name: str) -> dict[str, bytes]:
        """The replicated subtree of one region: rel path → bytes (persistent nodes)."""
        r = self.regions[name]
        out: dict[str, bytes] = {}

        def walk(rel: str) -> None:
            for child in r.client.get_children(r.path(rel) if rel else r.mount):
                crel = f"{rel}/{child}"
                data, stat = r.client.get(r.path(crel))
                if stat.ephemeralOwner:
                    continue
                out[crel] = data
                walk(crel)

        walk("")
        return out

    def cli(
        self, *args: str, timeout: float = 120, region: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``zkbridge ARGS``; with ``region``, run where that region's bridge runs (its prefix)."""
        prefix = self.regions[region].prefix if region is not None else ()
        return subprocess.run(
            [*prefix, sys.executable, "-m", "bridge", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )


def scrape(port: int) -> dict[str, float]:
    """A bridge's /metrics on ``port``: each series with its labels → its value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values
