"""One real standalone ZooKeeper server in a temporary directory: Debian's 3.8 jars, or
an Apache ZooKeeper release resolved by mvn (``ZKBRIDGE_TEST_ZOOKEEPER=3.9``; 3.5 for
the test that the bridge refuses it)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kazoo.client import KazooClient

from tests.harness import procs
from tests.harness.managed import ServerProcess

JAVA_DIR = Path("/usr/share/java")
CONF_DIR = Path("/etc/zookeeper/conf")
# zookeeper.jar's manifest Class-Path names its own dependencies; adding the
# whole of /usr/share/java would put six SLF4J bindings on the class path and
# the arbitrary winner logs to stdout with ANSI colours. One binding to log4j
# 1.2 makes the output deterministic and uses the packaged log4j.properties.
CLASSPATH_JARS = ("zookeeper.jar", "slf4j-log4j12.jar", "log4j-1.2.jar")
MAIN_CLASS = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
# The TLS client port needs ZooKeeper's Netty connection factory (Debian's
# libnetty-java, a dependency of its zookeeper package).
NETTY_JARS = tuple(f"netty-{m}.jar" for m in (
    "buffer", "codec", "common", "handler", "resolver", "transport",
    "transport-native-unix-common"))

# Releases from Maven (scripts/bootstrap resolves tests/harness/zookeeper-mvn/pom.xml
# into .cache/zookeeper-<version>: 3.9, and 3.5), with a logback configuration that
# logs as the 3.8 servers do.
MVN_CONF = Path(__file__).resolve().parent / "zookeeper-mvn"
DEBIAN = "3.8"


def version() -> str:
    """The ZooKeeper the tests run: ZKBRIDGE_TEST_ZOOKEEPER, Debian's 3.8 by default."""
    wanted = os.environ.get("ZKBRIDGE_TEST_ZOOKEEPER", DEBIAN)
    if not re.fullmatch(r"3\.[0-9]+", wanted):
        raise ZooKeeperError(f"ZKBRIDGE_TEST_ZOOKEEPER={wanted}: not a release line such as 3.9")
    return wanted


def mvn_lib(release: str) -> Path:
    return Path(__file__).resolve().parents[2] / ".cache" / f"zookeeper-{release}" / "lib"


def classpath(tls: bool = False, release: str | None = None) -> str:
    """The server's (and zkCli's) class path for ``release`` (default: ``version()``)."""
    release = release or version()
    if release != DEBIAN:
        jars = sorted(mvn_lib(release).glob("*.jar"))
        if not jars:
            raise ZooKeeperError(f"no ZooKeeper {release} jars in {mvn_lib(release)}: run "
                                 "scripts/bootstrap (3.9 and 3.5), or resolve that release "
                                 "with tests/harness/zookeeper-mvn/pom.xml")
        return ":".join([*(str(j) for j in jars), str(MVN_CONF)])
    jars = [*CLASSPATH_JARS, *(NETTY_JARS if tls else ())]
    return ":".join([*(str(JAVA_DIR / j) for j in jars), str(CONF_DIR)])


KazooFactory = Callable[..., KazooClient]
"""The `zk` fixture: `zk(server_or_hosts=None, **kazoo_kwargs)` -> started client."""


class ZooKeeperError(RuntimeError):
    """The server did not start or stop as asked; the message holds its log tail."""


class ZooKeeperServer(ServerProcess):
    """A standalone server on `host` (127.0.0.1) with its config, data and log under `base_dir`.

    The client port is chosen once, so `restart()` and `wipe()` come back at the
    same address and connected clients can reconnect to it.
    tickTime=500 puts the minimum session timeout at 1 s (2 ticks) so session
    expiry tests stay short; the maximum is raised to 60 s.
    `prefix` goes before the java command line: `("ip", "netns", "exec", NAME)`
    runs the server inside a network namespace, bound to that namespace's `host`.
    """

    def __init__(
        self,
        name: str = "zk",
        base_dir: Path | None = None,
        port: int | None = None,
        start_timeout: float = 60.0,
        *,
        host: str = "127.0.0.1",
        prefix: Sequence[str] = (),
        extra_config: Sequence[str] = (),
        release: str | None = None,
    ) -> None:
        self.name = name
        self.release = release  # a release line other than the suite's (``version()``)
        self.extra_config = tuple(extra_config)  # more zoo.cfg lines, e.g. an auth provider
        self.tls = any(line.startswith("secureClientPort=") for line in self.extra_config)
        self.host = host
        self.prefix = tuple(prefix)
        self._own_dir = base_dir is None
        self.base_dir = (
            Path(tempfile.mkdtemp(prefix=f"zkbridge-{name}-")) if base_dir is None else base_dir
        )
        self.port = port if port is not None else procs.free_port()
        self.start_timeout = start_timeout
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "zookeeper.log"
        self.config_path = self.base_dir / "zoo.cfg"
        self.startup_seconds: float | None = None
        """Seconds from spawn to serving, for the last start (reported by tests)."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._spawned_at = 0.0

    @property
    def hosts(self) -> str:
        return f"{self.host}:{self.port}"

    def _write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            "\n".join(
                [
                    "tickTime=500",
                    f"clientPort={self.port}",
                    f"clientPortAddress={self.host}",
                    f"dataDir={self.data_dir}",
                    "admin.enableServer=false",
                    "maxSessionTimeout=60000",
                    "4lw.commands.whitelist=*",
                    # Tests create thousands of short sessions from one address.
                    "maxClientCnxns=0",
                    # Hard quotas (setquota -N/-B) are refused only when enforced.
                    "enforceQuota=true",
                    # TTL znodes (createTTL) are refused unless extended types are on,
                    # as an operator who uses them has it.
                    "extendedTypesEnabled=true",
                    *self.extra_config,
                    "",
                ]
            )
        )

    def spawn(self) -> None:
        """Start the JVM without waiting; pair with `wait_ready()` to start several at once."""
        if self.running:
            raise ZooKeeperError(f"{self.name} is already running (pid {self.pid})")
        self._write_config()
        argv = [
            *self.prefix,
            "java",
            # Keep the JVM small and quick: 2 cores, several servers at once.
            "-Xms32m",
            "-Xmx256m",
            "-XX:+UseSerialGC",
            f"-Dzookeeper.log.dir={self.base_dir}",
            "-Dzookeeper.root.logger=INFO,CONSOLE",
            "-Dzookeeper.jmx.log4j.disable=true",
            # Empty containers and expired TTL znodes are removed at this interval
            # (a minute by default): tests wait seconds, not minutes, for it.
            "-Dznode.container.checkIntervalMs=500",
            "-cp",
            classpath(self.tls, self.release),
            MAIN_CLASS,
            str(self.config_path),
        ]
        with open(self.log_path, "a") as log:
            log.write(f"==== {time.strftime('%H:%M:%S')} starting {self.name} on {self.hosts}\n")
        self._spawned_at = time.monotonic()
        self._proc = procs.spawn(argv, self.log_path, cwd=self.base_dir)

    def four_letter(self, cmd: str, timeout: float = 2.0) -> str:
        """Send a four-letter word (ruok, srvr, mntr, cons, ...) and return the reply."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as s:
            s.sendall(cmd.encode("ascii"))
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")

    def _serving(self) -> bool:
        # `ruok` answers imok as soon as the port is open; `srvr` only reports
        # a Mode once the server accepts requests.
        return "Mode: standalone" in self.four_letter("srvr")

    def wait_ready(self, timeout: float | None = None) -> float:
        """Block until the server serves requests; return and record the startup seconds."""
        proc = self._proc
        if proc is None:
            raise ZooKeeperError(f"{self.name} was not started")
        limit = self.start_timeout if timeout is None else timeout
        end = time.monotonic() + limit
        while True:
            if proc.poll() is not None:
                self.stop()
                raise ZooKeeperError(
                    f"{self.name} exited with {proc.returncode} while starting; "
                    f"log {self.log_path}:\n{procs.log_tail(self.log_path)}"
                )
            try:
                if self._serving():
                    break
            except OSError:
                pass
            if time.monotonic() >= end:
                self.stop()
                raise ZooKeeperError(
                    f"{self.name} not serving on {self.hosts} after {limit:.0f}s; "
                    f"log {self.log_path}:\n{procs.log_tail(self.log_path)}"
                )
            time.sleep(0.05)
        self.startup_seconds = time.monotonic() - self._spawned_at
        return self.startup_seconds

    def start(self) -> ZooKeeperServer:
        self.spawn()
        self.wait_ready()
        return self

    def freeze(self) -> None:
        """SIGSTOP: the server hangs with its sockets open, like a stuck machine."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Stop and start again with the same data and port (sessions survive if quick)."""
        self.stop()
        self.start()

    def wipe(self) -> None:
        """Stop, delete all data, start empty: an ensemble restored from nothing."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.start()

    def close(self) -> None:
        """Stop and, when the directory was ours, remove it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"ZooKeeperServer({self.name!r}, {self.hosts}, pid={self.pid})"


def zk_cli(hosts: str, *command: str, script: str | None = None, timeout: float = 60) -> str:
    """Run one command of ZooKeeper's own shell (``setquota -N 5 /p``), or ``script``'s
    lines in one session (``addauth`` then what it allows); return its output.

    Raises ZooKeeperError when the shell exits non-zero or prints that the command failed.
    """
    out = subprocess.run(
        ["java", "-cp", classpath(), "org.apache.zookeeper.ZooKeeperMain", "-server", hosts,
         *command],
        input=script if script is not None else "", capture_output=True, text=True,
        timeout=timeout)
    text = out.stdout + out.stderr
    failed = ("Command failed", "Exception", "Insufficient permission",
              "Authentication is not valid")
    if out.returncode != 0 or any(f in text for f in failed):
        what = " ".join(command) or (script or "").replace("\n", "; ")
        raise ZooKeeperError(f"zkCli {what} failed ({out.returncode}):\n{text}")
    return text


def start_all(servers: Iterable[ZooKeeperServer]) -> dict[str, float]:
    """Start servers in parallel (JVM start dominates); stop them all if any fails.

    Returns each server's startup seconds by name.
    """
    group = list(servers)
    try:
        for s in group:
            s.spawn()
        return {s.name: s.wait_ready() for s in group}
    except BaseException:
        for s in group:
            s.stop()
        raise


@dataclass
class ZkServers:
    """Three region servers plus a spare for 'a new region joins' tests."""

    regions: tuple[ZooKeeperServer, ...]
    spare: ZooKeeperServer
    startup_seconds: dict[str, float] = field(default_factory=dict)
    """Per server, from the parallel start; `total` is the wall time for all."""

    @property
    def all(self) -> tuple[ZooKeeperServer, ...]:
        return (*self.regions, self.spare)

    def __getitem__(self, index: int) -> ZooKeeperServer:
        return self.all[index]

    def __iter__(self) -> Iterator[ZooKeeperServer]:
        return iter(self.all)

    def __len__(self) -> int:
        return len(self.all)

    def heal(self) -> None:
        """Undo what a test may have done to the shared servers: thaw, start stopped ones."""
        for s in self.all:
            s.thaw()
        stopped = [s for s in self.all if not s.running]
        if stopped:
            start_all(stopped)
