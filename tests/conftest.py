"""Shared fixtures: real ZooKeeper servers, the Kafka broker, kazoo clients, unique names.

Server fixtures are session-scoped and lazy: only tests that ask for them (in
practice, tests/integration) start JVMs or tansu, so `pytest tests/unit` stays
server-free. `broker` is Apache Kafka (ZKBRIDGE_TEST_BROKER=tansu runs the
suite on tansu instead); `tansu` is always tansu, for its smoke subset.
Tests share the servers and isolate themselves with the `namespace` fixture
(own znode root, own topic prefix) instead of restarting.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kazoo.client import KazooClient

from tests.harness.broker import EXTERNAL_ENV, Broker
from tests.harness.namespace import Namespace, new_token
from tests.harness.proxy import ProxyFactory, TcpProxy
from tests.harness.zookeeper import KazooFactory, ZkServers, ZooKeeperServer, start_all
from tests.harness.zookeeper import version as zookeeper_version

REGION_NAMES = ("r1", "r2", "r3")
SPARE_NAME = "spare"

_report_key = pytest.StashKey[list[str]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_report_key] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/integration needs servers: mark it so that
    # `-m "not integration"` works without each module remembering to.
    for item in items:
        if "integration" in Path(str(item.path)).parts:
            item.add_marker(pytest.mark.integration)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    lines = config.stash.get(_report_key, [])
    if lines:
        terminalreporter.section("harness")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def harness_report(pytestconfig: pytest.Config) -> Callable[[str], None]:
    """Add a line to the 'harness' section printed after the run (timings, facts)."""
    return pytestconfig.stash[_report_key].append


@pytest.fixture(scope="session")
def zk_servers(harness_report: Callable[[str], None]) -> Iterator[ZkServers]:
    """Servers r1, r2, r3 (regions) and spare, started in parallel once per session.

    Shared: use the `namespace` fixture for paths. A test may stop, wipe,
    freeze them; they are started/thawed again after it (data a wipe removed
    stays removed).
    """
    servers = [ZooKeeperServer(n) for n in (*REGION_NAMES, SPARE_NAME)]
    try:
        t0 = time.monotonic()
        timings = start_all(servers)
        timings["total"] = time.monotonic() - t0
        harness_report(
            f"ZooKeeper {zookeeper_version()} x4 parallel start: "
            + ", ".join(f"{k}={v:.2f}s" for k, v in timings.items())
        )
        yield ZkServers(regions=tuple(servers[:3]), spare=servers[3], startup_seconds=timings)
    finally:
        for s in servers:
            s.thaw()
            s.close()


def _start_broker(
    proxied: bool, report: Callable[[str], None], kind: str | None = None
) -> Broker:
    broker = Broker.from_env(proxied=proxied, kind=kind)
    try:
        broker.start()
    except BaseException:
        broker.close()
        raise
    if broker.managed:
        report(f"{broker.kind} start (proxied={proxied}): {broker.startup_seconds:.2f}s")
    else:
        report(f"external Kafka at {broker.bootstrap}")
    return broker


@pytest.fixture(scope="session")
def broker(harness_report: Callable[[str], None]) -> Iterator[Broker]:
    """Apache Kafka on a free port (or tansu, or the Kafka named by ZKBRIDGE_TEST_KAFKA)."""
    b = _start_broker(False, harness_report)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="session")
def tansu(harness_report: Callable[[str], None]) -> Iterator[Broker]:
    """tansu whatever the suite's broker: the demo's broker, for the smoke subset."""
    b = _start_broker(False, harness_report, kind="tansu")
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="session")
def proxied_broker(harness_report: Callable[[str], None]) -> Iterator[Broker]:
    """A second broker reached only through `proxied_broker.proxy` (cut it to lose Kafka).

    Skipped with an external Kafka: its advertised listeners bypass any proxy.
    """
    if os.environ.get(EXTERNAL_ENV, "").strip():
        pytest.skip(f"needs a managed broker ({EXTERNAL_ENV} is set)")
    b = _start_broker(True, harness_report)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(autouse=True)
def _heal_shared_servers(request: pytest.FixtureRequest) -> Iterator[None]:
    # A test may stop, freeze or cut shared servers; put them back afterwards
    # so the next test does not fail for someone else's reason. Only acts on
    # fixtures the test already instantiated, so it never starts servers.
    yield
    names = request.fixturenames
    if "zk_servers" in names:
        fleet: ZkServers = request.getfixturevalue("zk_servers")
        fleet.heal()
    for name in ("broker", "proxied_broker", "tansu"):
        if name in names:
            b: Broker = request.getfixturevalue(name)
            if b.proxy is not None:
                b.proxy.restore()
                b.proxy.set_delay(0)
                b.proxy.drop_new(False)
            if b.managed and not b.running:
                b.start()


@pytest.fixture
def zk(zk_servers: ZkServers) -> Iterator[KazooFactory]:
    """Factory for started kazoo clients, all stopped and closed at teardown.

    `zk()` connects to the first region; `zk(server_or_hosts, **kazoo_kwargs)`
    to anything else (a ZooKeeperServer, a TcpProxy address, a hosts string).
    """
    clients: list[KazooClient] = []

    def connect(
        target: ZooKeeperServer | str | None = None,
        *,
        start_timeout: float = 15.0,
        **kwargs: Any,
    ) -> KazooClient:
        if target is None:
            target = zk_servers.regions[0]
        hosts = target.hosts if isinstance(target, ZooKeeperServer) else target
        client = KazooClient(hosts=hosts, **kwargs)
        clients.append(client)
        client.start(timeout=start_timeout)
        return client

    try:
        yield connect
    finally:
        for c in clients:
            try:
                c.stop()
            finally:
                c.close()


@pytest.fixture
def tcp_proxy() -> Iterator[ProxyFactory]:
    """Factory for started TcpProxy instances in front of a server or "host:port"."""
    proxies: list[TcpProxy] = []

    def make(target: ZooKeeperServer | str) -> TcpProxy:
        hosts = target.hosts if isinstance(target, ZooKeeperServer) else target
        host, port = hosts.rsplit(":", 1)
        proxy = TcpProxy(host, int(port), name=f"to-{port}")
        proxies.append(proxy)
        return proxy.start()

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.stop()


@pytest.fixture
def token() -> str:
    """A unique short token per test, e.g. 't7f3a2'."""
    return new_token()


@pytest.fixture
def namespace(token: str) -> Namespace:
    """Per-test znode root (`/t7f3a2`) and topic prefix (`zkbridge-t7f3a2`)."""
    return Namespace(token)
