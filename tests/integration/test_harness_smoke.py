"""The harness works, and the server behaviour the bridge relies on is what we think it is.

Each broker or ZooKeeper fact the design leans on is an assertion here, so a
new tansu, Kafka or ZooKeeper version that changes it fails loudly in one place.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import IllegalArgumentError, KafkaError, UnknownError
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import BadVersionError, RolledBackError, RuntimeInconsistency
from kazoo.handlers.threading import KazooTimeoutError

from tests.harness import procs
from tests.harness.broker import Broker
from tests.harness.namespace import Namespace
from tests.harness.proxy import ProxyFactory
from tests.harness.zookeeper import KazooFactory, ZkServers, ZooKeeperError, ZooKeeperServer
from tests.harness.zookeeper import version as zookeeper_version

T = TypeVar("T")
Report = Callable[[str], None]

# Kafka protocol error codes the bridge has to recognise in admin responses.
TOPIC_ALREADY_EXISTS = 36
INVALID_REPLICATION_FACTOR = 38


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run one async scenario with a deadline, so a hung client fails the test."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


class StateLog:
    """Collects kazoo connection states with their time since `mark()`."""

    def __init__(self, client: KazooClient) -> None:
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self.events: list[tuple[float, str]] = []
        client.add_listener(self._on_state)

    def mark(self) -> None:
        with self._lock:
            self._t0 = time.monotonic()
            self.events.clear()

    def _on_state(self, state: str) -> None:
        with self._lock:
            self.events.append((round(time.monotonic() - self._t0, 2), str(state)))

    def states(self) -> list[str]:
        with self._lock:
            return [s for _, s in self.events]


# -- ZooKeeper ---------------------------------------------------------------


@pytest.mark.every_zookeeper
def test_every_server_serves_and_commits_transactions(
    zk_servers: ZkServers, zk: KazooFactory, namespace: Namespace
) -> None:
    assert len(zk_servers) == 4
    assert len({s.port for s in zk_servers}) == 4
    for server in zk_servers:
        assert server.running
        assert server.four_letter("ruok") == "imok"
        # The version asked for (ZKBRIDGE_TEST_ZOOKEEPER) is the one that runs.
        assert f"Zookeeper version: {zookeeper_version()}." in server.four_letter("srvr")
        client = zk(server)
        root = namespace.path(server.name)
        client.create(root, b"v0", makepath=True)
        assert client.get(root)[0] == b"v0"

        tx = client.transaction()
        tx.check(root, 0)
        tx.create(root + "/child", b"c")
        tx.set_data(root, b"v1", version=0)
        results = tx.commit()
        assert results[0] is True
        assert results[1] == root + "/child"
        assert client.get(root)[0] == b"v1"
        assert client.get(root + "/child")[0] == b"c"

        # A failed check rolls the whole multi back. kazoo returns exception
        # instances instead of raising: ops before the failure say
        # RolledBackError, the failing one its own error, later ones
        # RuntimeInconsistency.
        tx = client.transaction()
        tx.create(root + "/never", b"")
        tx.check(root, 0)
        tx.set_data(root, b"v2")
        results = tx.commit()
        assert isinstance(results[0], RolledBackError)
        assert isinstance(results[1], BadVersionError)
        assert isinstance(results[2], RuntimeInconsistency)
        assert client.exists(root + "/never") is None
        assert client.get(root)[0] == b"v1"


def negotiated_timeout_ms(server: ZooKeeperServer, client: KazooClient) -> int:
    """The session timeout the server granted, from `cons` (kazoo does not expose it)."""
    sid = f"sid={client.client_id[0]:#x},"
    for line in server.four_letter("cons").splitlines():
        if sid in line:
            return int(line.split(",to=")[1].split(",")[0])
    raise AssertionError(f"session {sid} not in cons output")


@pytest.mark.every_zookeeper
def test_session_timeouts_are_negotiated_between_1s_and_60s(
    zk_servers: ZkServers, zk: KazooFactory
) -> None:
    # tickTime=500: minimum 2 ticks, maximum set by maxSessionTimeout. kazoo
    # keeps the *requested* value in _session_timeout and uses the granted
    # one only for its internal read/connect timeouts.
    server = zk_servers[0]
    short = zk(server, timeout=0.2)
    assert negotiated_timeout_ms(server, short) == 1000
    assert short._session_timeout == 200
    long = zk(server, timeout=600.0)
    assert negotiated_timeout_ms(server, long) == 60000
    usual = zk(server, timeout=4.0)
    assert negotiated_timeout_ms(server, usual) == 4000


@pytest.mark.every_zookeeper
def test_session_expires_through_a_cut_proxy(
    zk_servers: ZkServers,
    zk: KazooFactory,
    tcp_proxy: ProxyFactory,
    namespace: Namespace,
    harness_report: Report,
) -> None:
    server = zk_servers[1]
    proxy = tcp_proxy(server)
    watcher = zk(server)
    client = zk(proxy.address, timeout=2.0)
    assert negotiated_timeout_ms(server, client) == 2000
    # The ephemeral vanishing is the server's word that the session expired.
    marker = namespace.path("alive")
    watcher.ensure_path(namespace.zk_root)
    client.create(marker, b"", ephemeral=True)
    old_session = client.client_id[0]
    log = StateLog(client)

    log.mark()
    proxy.cut()
    procs.wait_for(
        lambda: watcher.exists(marker) is None, 15, message="session never expired on server"
    )
    expired_at = time.monotonic() - log._t0
    # kazoo cannot learn of expiry while cut off: it is only SUSPENDED.
    assert log.states() == [KazooState.SUSPENDED]
    assert client.state == KazooState.SUSPENDED

    proxy.restore()
    procs.wait_for(
        lambda: client.connected and client.client_id[0] != old_session,
        15,
        message=lambda: f"no new session; states {log.events}",
    )
    assert log.states() == [KazooState.SUSPENDED, KazooState.LOST, KazooState.CONNECTED]
    assert client.exists(marker) is None
    harness_report(
        f"session expiry via proxy (timeout 2s): expired on server at {expired_at:.2f}s; "
        f"listener {log.events}; session {old_session:#x} -> {client.client_id[0]:#x}"
    )


@pytest.mark.every_zookeeper
def test_restart_keeps_data_and_wipe_loses_it(namespace: Namespace, harness_report: Report) -> None:
    with ZooKeeperServer("solo") as server:
        first_pid = server.pid
        assert first_pid is not None
        client = KazooClient(hosts=server.hosts, timeout=10.0)
        client.start(15)
        try:
            client.create(namespace.path("kept"), b"x", makepath=True)
            session = client.client_id[0]
            t0 = time.monotonic()
            server.restart()
            restart_s = time.monotonic() - t0
            assert not _pid_alive(first_pid)
            procs.wait_for(lambda: client.connected, 15, message="no reconnect after restart")
            # A restart shorter than the session timeout keeps the session.
            assert client.client_id[0] == session
            assert client.get(namespace.path("kept"))[0] == b"x"

            t0 = time.monotonic()
            server.wipe()
            wipe_s = time.monotonic() - t0
            # The emptied server refuses the old client: it has seen a zxid
            # from the future. kazoo retries forever, SUSPENDED, never LOST.
            procs.wait_for(
                # 3.8: "Refusing session request for client ..."; 3.9: "Refusing
                # session(0x...) ... as it has seen zxid ...".
                lambda: "Refusing session" in procs.log_tail(server.log_path, 200),
                15,
                message="server did not refuse the old client",
            )
            assert client.state == KazooState.SUSPENDED
            # Only a restart (stop resets kazoo's last_zxid) gets it back.
            t0 = time.monotonic()
            client.restart()
            assert client.connected
            assert client.client_id[0] != session
            assert client.exists(namespace.path("kept")) is None
            relogin_s = time.monotonic() - t0
        finally:
            client.stop()
            client.close()
        last_pid = server.pid
    assert last_pid is not None and not _pid_alive(last_pid)
    assert not server.base_dir.exists()
    harness_report(
        f"zk restart {restart_s:.2f}s, wipe {wipe_s:.2f}s, kazoo restart after wipe "
        f"{relogin_s:.2f}s"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- proxy ---------------------------------------------------------------------


@pytest.mark.every_zookeeper
def test_proxy_delay_cut_and_drop_new_against_zookeeper(
    zk_servers: ZkServers,
    zk: KazooFactory,
    tcp_proxy: ProxyFactory,
    namespace: Namespace,
    harness_report: Report,
) -> None:
    server = zk_servers[2]
    proxy = tcp_proxy(server)
    client = zk(proxy.address, timeout=10.0)
    path = namespace.path("p")
    client.create(path, b"1", makepath=True)
    assert proxy.connection_count == 1

    # Delay applies each way, so one request/response costs twice the delay.
    t0 = time.monotonic()
    client.get(path)
    base = time.monotonic() - t0
    proxy.set_delay(0.25)
    t0 = time.monotonic()
    client.get(path)
    delayed = time.monotonic() - t0
    proxy.set_delay(0)
    assert 0.5 <= delayed < 2.0, delayed

    # A short cut: kazoo suspends, reconnects after restore, same session.
    log = StateLog(client)
    session = client.client_id[0]
    proxy.cut()
    procs.wait_for(lambda: KazooState.SUSPENDED in log.states(), 5, message="no SUSPENDED")
    proxy.restore()
    procs.wait_for(lambda: client.connected, 15, message="no reconnect after cut")
    assert client.client_id[0] == session
    assert log.states() == [KazooState.SUSPENDED, KazooState.CONNECTED]

    # A stall holds bytes instead of dropping them: the request completes
    # once the partition heals, on the same connection.
    accepted = proxy.accepted
    proxy.cut(stall=True)
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(client.get(path)[0]))
    reader.start()
    reader.join(0.5)
    assert not result
    proxy.restore()
    reader.join(10)
    assert result == [b"1"]
    assert proxy.accepted == accepted

    # drop_new: open connections keep working, new ones never get a session.
    proxy.drop_new(True)
    assert client.get(path)[0] == b"1"
    with pytest.raises(KazooTimeoutError):
        zk(proxy.address, start_timeout=1.5)
    proxy.drop_new(False)
    assert zk(proxy.address).get(path)[0] == b"1"
    harness_report(f"proxy: get {base * 1000:.1f}ms direct, {delayed:.2f}s with 0.25s delay")


# -- Kafka ---------------------------------------------------------------------


async def _admin(bootstrap: str) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    return admin


def test_topic_admin(broker: Broker, namespace: Namespace) -> None:
    compact = {"cleanup.policy": "compact"}
    name = namespace.topic("admin")

    async def scenario() -> None:
        admin = await _admin(broker.bootstrap)
        try:
            # -1 (broker default) is refused by aiokafka's NewTopic itself.
            with pytest.raises(IllegalArgumentError):
                NewTopic(name, 1, -1, topic_configs=compact)

            resp = await admin.create_topics([NewTopic(name, 1, 1, topic_configs=compact)])
            assert [e[:2] for e in resp.topic_errors] == [(name, 0)]

            configs = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
            entries = {e[0]: e[1] for e in configs[0].resources[0][4]}
            assert entries["cleanup.policy"] == "compact"

            # An existing topic is not an exception: the error is in the response.
            resp = await admin.create_topics([NewTopic(name, 1, 1, topic_configs=compact)])
            assert resp.topic_errors[0][1] == TOPIC_ALREADY_EXISTS

            # tansu takes any replication factor on one broker; Kafka refuses it.
            many = namespace.topic("rf3")
            resp = await admin.create_topics([NewTopic(many, 1, 3)])
            expected = 0 if broker.kind == "tansu" else INVALID_REPLICATION_FACTOR
            assert resp.topic_errors[0][1] == expected

            assert name in await admin.list_topics()
            resp = await admin.delete_topics([name])
            assert list(resp.topic_error_codes) == [(name, 0)]
            # Kafka answers the delete before every broker's metadata drops
            # the topic: a listing right after may still show it (seen once).
            for _ in range(100):
                if name not in await admin.list_topics():
                    break
                await asyncio.sleep(0.1)
            assert name not in await admin.list_topics()
        finally:
            await admin.close()

    run(scenario())


def test_produce_and_consume_with_manual_assignment(broker: Broker, namespace: Namespace) -> None:
    topic = namespace.topic("data")
    tp = TopicPartition(topic, 0)
    big = b"x" * 1_000_000
    headers = [("origin", b"r1"), ("empty", b"")]

    async def scenario() -> None:
        admin = await _admin(broker.bootstrap)
        producer = AIOKafkaProducer(
            bootstrap_servers=broker.bootstrap, acks="all", enable_idempotence=False
        )
        consumer = AIOKafkaConsumer(
            bootstrap_servers=broker.bootstrap,
            group_id=namespace.topic("group"),
            enable_auto_commit=False,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        try:
            await admin.create_topics(
                [NewTopic(topic, 1, 1, topic_configs={"cleanup.policy": "compact"})]
            )
            await producer.start()
            first = await producer.send_and_wait(topic, b"v0", key=b"/a", headers=headers)
            assert first.offset == 0
            meta = await producer.send_and_wait(topic, big, key=b"/big")
            assert meta.offset == 1
            for i in range(3):
                await producer.send_and_wait(topic, b"v%d" % i, key=b"/k%d" % i)

            await consumer.start()
            consumer.assign([tp])
            assert await consumer.beginning_offsets([tp]) == {tp: 0}
            assert await consumer.end_offsets([tp]) == {tp: 5}
            consumer.seek(tp, 0)
            records: list[Any] = []
            while len(records) < 5:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                records.extend(batch.get(tp, []))
            assert [r.offset for r in records] == [0, 1, 2, 3, 4]
            assert records[0].key == b"/a"
            assert list(records[0].headers) == headers
            assert records[1].value == big
            assert list(records[1].headers) == []

            assert await consumer.committed(tp) is None
            await consumer.commit({tp: 3})
            assert await consumer.committed(tp) == 3
        finally:
            await consumer.stop()
            await producer.stop()
            await admin.close()

        # Another member of the group reads what the first committed.
        other = AIOKafkaConsumer(
            bootstrap_servers=broker.bootstrap,
            group_id=namespace.topic("group"),
            enable_auto_commit=False,
        )
        await other.start()
        try:
            other.assign([tp])
            assert await other.committed(tp) == 3
        finally:
            await other.stop()

    run(scenario())


@pytest.mark.parametrize("which", ["broker", "tansu"])
def test_idempotent_producer_support_matches_the_flag(
    which: str, request: pytest.FixtureRequest, namespace: Namespace, harness_report: Report
) -> None:
    broker: Broker = request.getfixturevalue(which)
    topic = namespace.topic("idem")
    if broker.kind != "tansu":
        _create(broker.bootstrap, topic)

    async def scenario() -> str:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=True)
        try:
            await producer.start()
            await producer.send_and_wait(topic, b"v", key=b"k")
            return "ok"
        except KafkaError as exc:
            return f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
        finally:
            await producer.stop()

    t0 = time.monotonic()
    outcome = run(scenario(), timeout=30)
    if broker.supports_idempotence:
        assert outcome == "ok"
    else:
        # tansu 0.6: InitProducerId fails at start(), quickly, not a hang.
        assert outcome.startswith(f"{UnknownError.__module__}.UnknownError"), outcome
    harness_report(
        f"idempotent producer on {broker.kind}: {outcome} ({time.monotonic() - t0:.2f}s)"
    )


def _create(bootstrap: str, topic: str) -> None:
    async def go() -> None:
        admin = await _admin(bootstrap)
        try:
            await admin.create_topics([NewTopic(topic, 1, 1)])
        finally:
            await admin.close()

    run(go())


def test_tansu_specifics(tansu: Broker, namespace: Namespace, harness_report: Report) -> None:
    """What tansu does that real Kafka (default config) does not: guard code against both."""
    broker = tansu
    topic = namespace.topic("tansu")
    tp = TopicPartition(topic, 0)
    auto_partitions: list[int] = []

    async def scenario() -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=broker.bootstrap, max_request_size=20 * 1024 * 1024
        )
        admin = await _admin(broker.bootstrap)
        await producer.start()
        try:
            # Producing to a missing topic creates it (Kafka: per broker
            # setting), with several partitions, not one.
            meta = await producer.send_and_wait(topic, b"v", key=b"k")
            assert meta.offset == 0
            assert topic in await admin.list_topics()
            partitions = await producer.partitions_for(topic)
            assert len(partitions) > 1
            auto_partitions.append(len(partitions))
            # No broker-side size limit (Kafka: ~1 MiB by default): the
            # bridge must enforce its own.
            meta = await producer.send_and_wait(topic, b"x" * 10_000_000, partition=0)
            assert meta.offset >= 0
            # Deleting and re-creating a topic starts again at offset 0.
            await producer.send_and_wait(topic, b"v", partition=0)
            await admin.delete_topics([topic])
            await admin.create_topics([NewTopic(topic, 1, 1)])
            meta = await producer.send_and_wait(topic, b"v", partition=0)
            assert (meta.topic, meta.offset) == (tp.topic, 0)
        finally:
            await producer.stop()
            await admin.close()

    run(scenario())
    harness_report(f"tansu auto-creates topics on produce with {auto_partitions[0]} partitions")


@pytest.mark.parametrize("which", ["broker", "tansu"])
def test_broker_restart_keeps_topics_on_kafka_and_loses_them_on_tansu(
    which: str, request: pytest.FixtureRequest, namespace: Namespace
) -> None:
    broker: Broker = request.getfixturevalue(which)
    if not broker.managed:
        pytest.skip("cannot restart an external Kafka")
    topic = namespace.topic("restart")

    async def create() -> list[str]:
        admin = await _admin(broker.bootstrap)
        try:
            await admin.create_topics([NewTopic(topic, 1, 1)])
            # Kafka answers CreateTopics before every listing shows the topic.
            for _ in range(100):
                if topic in await admin.list_topics():
                    break
                await asyncio.sleep(0.1)
            return list(await admin.list_topics())
        finally:
            await admin.close()

    async def topics() -> list[str]:
        admin = await _admin(broker.bootstrap)
        try:
            return list(await admin.list_topics())
        finally:
            await admin.close()

    assert topic in run(create())
    old_pid = broker.pid
    assert old_pid is not None
    broker.restart()
    assert not _pid_alive(old_pid)
    # tansu keeps everything in memory; Kafka's log dirs survive a restart.
    assert (topic in run(topics())) == (broker.kind != "tansu")


def test_proxied_broker_survives_a_cut(proxied_broker: Broker, namespace: Namespace) -> None:
    proxy = proxied_broker.proxy
    assert proxy is not None
    topic = namespace.topic("cut")

    async def scenario() -> None:
        admin = await _admin(proxied_broker.bootstrap)
        producer = AIOKafkaProducer(
            bootstrap_servers=proxied_broker.bootstrap, request_timeout_ms=2000
        )
        await producer.start()
        try:
            await admin.create_topics([NewTopic(topic, 1, 1)])
            await producer.send_and_wait(topic, b"before", partition=0)
            proxy.cut()
            with pytest.raises((KafkaError, TimeoutError)):
                await asyncio.wait_for(producer.send_and_wait(topic, b"during", partition=0), 3)
            proxy.restore()
            # Unlike a tansu restart, the topic and its records are still
            # there ("during" may or may not have been retried in between).
            meta = await asyncio.wait_for(producer.send_and_wait(topic, b"after", partition=0), 20)
            assert meta.offset in (1, 2)
        finally:
            await producer.stop()
            await admin.close()

    run(scenario())


def test_a_server_that_cannot_start_fails_fast_with_its_log() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = ZooKeeperServer("clash", port=taken.getsockname()[1], start_timeout=30)
        try:
            with pytest.raises(ZooKeeperError, match="Address already in use"):
                server.start()
            assert not server.running
            assert server.pid is None
        finally:
            server.close()
