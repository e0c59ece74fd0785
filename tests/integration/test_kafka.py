"""zkbridge on Apache Kafka: idempotent producer, topics, compaction, restarts, lost log dirs, stop.

Each fact here is one that tansu could not show: a broker that keeps its data
across a restart, a log cleaner that really compacts, a broker-chosen
replication factor, and a broker that refuses the idempotent producer
(tansu, used here on purpose).
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from bridge import codec
from bridge.errors import FatalKafkaError
from bridge.kafka import Kafka
from bridge.model import Op
from tests.conftest import REGION_NAMES, ZkServers
from tests.harness import procs
from tests.harness.broker import Broker, KafkaBroker
from tests.harness.procs import wait_for
from tests.integration.federation import Federation
from tests.integration.test_operations import status_json

Report = Callable[[str], None]


def _kafka_only(broker: Broker) -> None:
    if broker.kind != "kafka":
        pytest.skip("needs Apache Kafka started by the harness")


def _fed(tmp: Path, token: str, broker: Broker, zk: ZkServers, *, spare: bool = False
         ) -> Federation:
    servers = dict(zip(REGION_NAMES, zk.regions, strict=True))
    if spare:
        servers["r4"] = zk.spare
    return Federation(tmp, token, broker, servers)


@pytest.fixture
def on_proxied(tmp_path: Path, token: str, proxied_broker: Broker, zk_servers: ZkServers
               ) -> Iterator[Federation]:
    fed = _fed(tmp_path, token, proxied_broker, zk_servers)
    try:
        yield fed
    finally:
        fed.close()


def _records(bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes | None]]:
    """Every record left in partition 0 of `topic`, as (key, value), from the start."""

    async def go() -> list[tuple[bytes | None, bytes | None]]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest")
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            end = (await consumer.end_offsets([tp]))[tp]
            consumer.seek(tp, 0)
            out: list[tuple[bytes | None, bytes | None]] = []
            last = -1
            # Compaction leaves gaps in the offsets: stop at the last offset, not a count.
            while last < end - 1:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                for m in batch.get(tp, []):
                    out.append((m.key, m.value))
                    last = m.offset
                if not batch and await consumer.position(tp) >= end:
                    break
            return out
        finally:
            await consumer.stop()

    return asyncio.run(asyncio.wait_for(go(), 60))


def _data_events(bootstrap: str, topic: str) -> list[tuple[str, Op]]:
    events = (codec.decode(v) for _, v in _records(bootstrap, topic) if v is not None)
    return [(e.path, e.op) for e in events if e.op is not Op.HEARTBEAT]


# -- the idempotent producer ------------------------------------------------------


def test_broker_refusing_init_producer_id_stops_the_bridge_with_one_clear_error(
    on_tansu: Federation,
) -> None:
    fed = on_tansu
    r1 = fed["r1"]
    fed.write_config("r1", kafka={"enable_idempotence": True})
    t0 = time.monotonic()
    fed.start("r1", wait=False)
    assert r1.proc is not None
    rc = r1.proc.wait(timeout=60)
    took = time.monotonic() - t0
    r1.proc = None
    assert rc == 1
    errors = [e for e in fed.events("r1") if e.get("level") == "error"]
    assert len(errors) == 1, errors
    assert errors[0]["event"] == "bridge_stopped"
    assert "kafka.enable_idempotence" in errors[0]["error"]
    assert "InitProducerId" in errors[0]["error"]
    assert not [e for e in fed.events("r1") if e.get("event") == "retrying"
                and e.get("what") == "start producer"]
    assert took < 30, f"took {took:.1f}s"


def test_idempotent_producer_is_the_default_and_works(federation: Federation) -> None:
    fed = federation
    _kafka_only(fed.broker)
    assert all(fed[n].settings.kafka.enable_idempotence for n in fed.regions)
    fed.start_all()
    r1 = fed["r1"]
    for i in range(20):
        r1.client.create(r1.path(f"/i{i}"), b"%d" % i)
    fed.wait_converged()
    fed.assert_clean_logs()


# -- topics ------------------------------------------------------------------------


def test_topics_get_the_broker_default_replication_factor(
    federation: Federation, harness_report: Report
) -> None:
    fed = federation
    _kafka_only(fed.broker)
    settings = fed["r1"].settings
    assert settings.kafka.replication_factor == -1
    topic = f"{fed.prefix}.{fed.subtree}.r1"

    async def go() -> tuple[list[str], int, str]:
        kafka = Kafka(settings.kafka, client_id="test")
        created = await kafka.ensure_topics([topic])
        admin = AIOKafkaAdminClient(bootstrap_servers=fed.broker.bootstrap)
        await admin.start()
        try:
            [desc] = await admin.describe_topics([topic])
            replicas = len(desc["partitions"][0]["replicas"])
            configs = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic)])
            entries = {e[0]: e[1] for e in configs[0].resources[0][4]}
            return created, replicas, entries["cleanup.policy"]
        finally:
            await admin.close()

    created, replicas, policy = asyncio.run(go())
    assert created == [topic]
    assert (replicas, policy) == (1, "compact")  # default.replication.factor=1 here

    # More replicas than brokers: one clear, fatal reason naming the key, no retry loop.
    too_many = dataclasses.replace(settings.kafka, replication_factor=3)

    async def refused() -> None:
        await Kafka(too_many, client_id="test").ensure_topics([topic + "-rf3"])

    with pytest.raises(FatalKafkaError, match=r"kafka\.replication_factor"):
        asyncio.run(refused())
    harness_report(f"Kafka: bridge topics created with the broker default RF ({replicas})")


def test_a_topic_created_with_several_partitions_keeps_the_origin_s_order(
    federation: Federation,
) -> None:
    # An operator pre-created r1's topic with 3 partitions (a Kafka habit).
    # Before, the producer hashed each key to a partition: a batch's records
    # were split, receivers dropped the pieces as incomplete ("the origin
    # republishes", which it never did) and r2 lost 29 of 30 creates.
    fed = federation
    topic = f"{fed.prefix}.{fed.subtree}.r1"

    async def go() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=fed.broker.bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(topic, 3, 1, topic_configs={"cleanup.policy": "compact"})])
        finally:
            await admin.close()

    asyncio.run(go())
    fed.start("r1")
    fed.start("r2")
    r1, r2 = fed["r1"], fed["r2"]
    r1.client.ensure_path(r1.path("/data"))
    with r1.client.transaction() as t:  # one batch
        for i in range(30):
            t.create(r1.path(f"/data/d{i}"), b"x")
    for i in range(30):
        r1.client.set(r1.path("/data/d0"), str(i).encode())
    fed.wait_converged(["r1", "r2"], timeout=30)
    assert r2.client.get(r2.path("/data/d0"))[0] == b"29"
    for name in ("r1", "r2"):  # r1 publishes to it, r2 reads it: both say so
        warned = [e for e in fed.events(name) if e.get("event") == "topic_partitions"]
        assert [(e["topic"], e["partitions"]) for e in warned] == [(topic, 3)], name
    assert not [e for e in fed.events("r2") if e.get("event") == "incomplete_batch_dropped"]
    fed.assert_clean_logs()


def test_a_topic_made_beforehand_with_a_wrong_config_is_named_and_a_low_limit_only_waits(
    federation: Federation,
) -> None:
    # r1's topic: cleanup.policy=delete, max.message.bytes 100,000. Both are
    # named at start; a 200 KB znode waits in the outbox (before, with an
    # error naming no setting) until the limit is raised, then it replicates.
    fed = federation
    _kafka_only(fed.broker)
    topic = f"{fed.prefix}.{fed.subtree}.r1"

    async def admin_call(fn: Callable[[AIOKafkaAdminClient], Any]) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=fed.broker.bootstrap)
        await admin.start()
        try:
            await fn(admin)
        finally:
            await admin.close()

    asyncio.run(admin_call(lambda a: a.create_topics([NewTopic(
        topic, 1, 1, topic_configs={"cleanup.policy": "delete",
                                    "max.message.bytes": "100000"})])))
    fed.start("r1")
    fed.start("r2")

    def named(name: str, event: str) -> list[dict[str, Any]]:
        return [e for e in fed.events(name) if e.get("event") == event]

    for name in ("r1", "r2"):
        wait_for(lambda n=name: named(n, "topic_not_compacted")  # type: ignore[misc]
                 and named(n, "topic_message_limit"), 20,
                 message=f"{name} did not name the topic's settings")
        assert [(e["topic"], e["cleanup_policy"])
                for e in named(name, "topic_not_compacted")] == [(topic, "delete")]
        [limit] = named(name, "topic_message_limit")
        assert (limit["topic"], limit["max_message_bytes"]) == (topic, 100000)
        assert limit["needed"] > 1_000_000
    r1, r2 = fed["r1"], fed["r2"]
    r1.client.create(r1.path("/big"), b"x" * 200_000)
    r1.client.create(r1.path("/after"), b"y")
    wait_for(lambda: any("max.message.bytes" in e["error"] for e in named("r1", "retrying")),
             20, message="the refused publish did not name the setting")
    assert r2.client.exists(r2.path("/big")) is None
    asyncio.run(admin_call(lambda a: a.alter_configs(
        [ConfigResource(ConfigResourceType.TOPIC, topic,
                        configs={"cleanup.policy": "compact",
                                 "max.message.bytes": str(limit["needed"])})])))
    wait_for(lambda: r2.client.exists(r2.path("/after")) is not None, 30,
             message="publishing did not resume once the limit was raised")
    assert r2.client.get(r2.path("/big"))[0] == b"x" * 200_000
    fed.assert_clean_logs()


def _create_compacting(bootstrap: str, topics: list[str]) -> None:
    # What an operator tuning compaction would set; the bridge only sets
    # cleanup.policy when it creates a topic itself, so these are made first.
    configs = {
        "cleanup.policy": "compact",
        "segment.ms": "200",
        "min.cleanable.dirty.ratio": "0.01",
        "min.compaction.lag.ms": "0",
        "delete.retention.ms": "100",
    }

    async def go() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(t, 1, 1, topic_configs=configs) for t in topics])
        finally:
            await admin.close()

    asyncio.run(go())


def test_new_region_bootstraps_exactly_from_topics_the_cleaner_compacted(
    make_federation: Callable[..., Federation], harness_report: Report
) -> None:
    fed = make_federation(spare=True)
    _kafka_only(fed.broker)
    topics = [f"{fed.prefix}.{fed.subtree}.{n}" for n in fed.regions]
    _create_compacting(fed.broker.bootstrap, topics)
    for name in ("r1", "r2", "r3"):
        fed.start(name, wait=False)
    for name in ("r1", "r2", "r3"):
        fed.wait_ready(name)
    r1, r2 = fed["r1"], fed["r2"]
    versions = 15
    for v in range(versions):
        for k in range(10):
            region = r1 if k % 2 else r2  # both regions' topics get compacted
            if v == 0:
                region.client.create(region.path(f"/k{k}"), b"v0")
            else:
                region.client.set(region.path(f"/k{k}"), b"v%d" % v)
        time.sleep(0.1)  # spread writes over several segments
    fed.wait_converged(["r1", "r2", "r3"])
    for k in range(0, 10, 3):
        r1.client.delete(r1.path(f"/k{k}"))
    r2.client.create(r2.path("/kept"), b"last")
    fed.wait_converged(["r1", "r2", "r3"])
    written = 10 * versions + 4 + 1

    # The cleaner really ran: far fewer data records are left than were written.
    def compacted() -> int | None:
        left = sum(len(_data_events(fed.broker.bootstrap, t)) for t in topics[:2])
        return left if left < written // 2 else None

    left = wait_for(compacted, 90, interval=1.0, message="the log cleaner never compacted")
    harness_report(f"Kafka compaction: {written} data records written, {left} left")

    fed.start("r4")
    fed.wait_converged()
    tree = fed.tree("r4")
    assert tree == fed.tree("r1")
    assert sorted(tree) == sorted(["/kept", *(f"/k{k}" for k in range(10) if k % 3)])
    assert all(v == b"v%d" % (versions - 1) for p, v in tree.items() if p != "/kept")
    fed.assert_clean_logs()


# -- restarts and lost log dirs ------------------------------------------------------


def test_broker_restart_keeps_data_nothing_reannounced_nothing_lost(
    federation: Federation,
) -> None:
    fed = federation
    _kafka_only(fed.broker)
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    for i in range(10):
        r1.client.create(r1.path(f"/before{i}"), b"b")
    fed.wait_converged()
    broker = fed.broker
    broker.stop()
    # Written while Kafka is down: captured into the outbox, published later.
    for i in range(5):
        r2.client.create(r2.path(f"/during{i}"), b"d")
    time.sleep(2)
    broker.start()
    for i in range(5):
        r1.client.create(r1.path(f"/after{i}"), b"a")
    fed.wait_converged(timeout=120)
    assert len(fed.tree("r3")) == 20
    for name in ("r1", "r2"):
        counts = Counter(_data_events(broker.bootstrap, f"{fed.prefix}.{fed.subtree}.{name}"))
        assert counts and set(counts.values()) == {1}, f"{name} re-announced: {counts}"
    assert sum(1 for p, _ in _data_events(
        broker.bootstrap, f"{fed.prefix}.{fed.subtree}.r1")) == 15
    for name in fed.regions:  # data kept: no loss seen, nothing rewound or re-announced
        assert fed.count_events(name, "topic_lost_records") == 0
        assert fed.count_events(name, "own_topic_lost_records") == 0
        assert fed.count_events(name, "own_topic_reannounced") == 0
    fed.assert_clean_logs()


def test_broker_crash_loses_nothing(federation: Federation, harness_report: Report) -> None:
    fed = federation
    _kafka_only(fed.broker)
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    for i in range(10):
        r1.client.create(r1.path(f"/before{i}"), b"b")
    fed.wait_converged()
    fed.broker.kill()  # SIGKILL: no controlled shutdown, logs recovered at start
    for i in range(5):
        r2.client.create(r2.path(f"/during{i}"), b"d")
    time.sleep(2)
    fed.broker.start()
    for i in range(5):
        r1.client.create(r1.path(f"/after{i}"), b"a")
    fed.wait_converged(timeout=120)
    assert len(fed.tree("r3")) == 20
    resets = sum(fed.count_events(n, "producer_reset") for n in fed.regions)
    harness_report(f"Kafka SIGKILL + restart: converged, {resets} producer resets")
    fed.assert_clean_logs()


@pytest.fixture
def own_kafka(tmp_path: Path, harness_report: Report) -> Iterator[KafkaBroker]:
    broker = KafkaBroker(tmp_path / "kafka")
    try:
        broker.start()
        harness_report(f"dedicated Kafka start: {broker.startup_seconds:.2f}s")
        yield broker
    finally:
        broker.close()


def test_lost_broker_log_dirs_are_recovered_with_resync(
    tmp_path: Path, token: str, own_kafka: KafkaBroker, zk_servers: ZkServers
) -> None:
    fed = _fed(tmp_path, token, own_kafka, zk_servers)
    try:
        fed.start_all()
        r1, r2, r3 = fed["r1"], fed["r2"], fed["r3"]
        for i in range(10):
            r1.client.create(r1.path(f"/a{i}"), b"a")
            r2.client.create(r2.path(f"/b{i}"), b"b")
        fed.wait_converged()
        fed.stop("r3")
        for i in range(10):
            r1.client.create(r1.path(f"/c{i}"), b"c")
        wait_for(lambda: len(fed.tree("r2")) == 30, 30)
        # The runbook: stop the bridges, bring Kafka back empty, start them
        # (each recreates its topics), then resync every region.
        fed.stop("r1")
        fed.stop("r2")
        own_kafka.wipe_log_dirs()
        for name in fed.regions:
            fed.start(name)
        # No operator needed any more: each origin sees its publish position
        # above its new topic's end and re-announces; resync stays harmless.
        fed.wait_converged()
        assert len(fed.tree("r3")) == 30
        for name in fed.regions:
            out = fed.cli("resync", "-c", str(fed[name].config_path))
            assert out.returncode == 0, out.stderr
            assert "re-announced" in out.stdout
        fed.wait_converged()
        assert len(fed.tree("r3")) == 30
        r3.client.create(r3.path("/after"), b"x")
        fed.wait_converged()
        fed.assert_clean_logs(allowed={"topic_lost_records", "own_topic_lost_records"})
    finally:
        fed.close()


# -- prompt stop ---------------------------------------------------------------------


def _sigterm_seconds(fed: Federation, name: str) -> float:
    r = fed[name]
    assert r.proc is not None
    t0 = time.monotonic()
    r.proc.send_signal(signal.SIGTERM)
    try:
        r.proc.wait(timeout=10)
    finally:
        took = time.monotonic() - t0
        procs.stop(r.proc)
        r.proc = None
    return took


def test_sigterm_in_a_retry_loop_ends_the_process_within_2s(
    on_proxied: Federation, harness_report: Report
) -> None:
    fed = on_proxied
    proxy = fed.broker.proxy
    assert proxy is not None
    proxy.cut()  # Kafka unreachable (connections blackholed) from the start
    fed.start("r1", wait=False)
    # Each attempt waits out the request timeout: SIGTERM lands in the middle of one.
    wait_for(lambda: fed.count_events("r1", "retrying") >= 1, 60,
             message="the bridge never entered its retry loop")
    # `status` names the step the start waits on, and why (before: "STALE ... stuck,
    # or cut off from ZooKeeper", the status record not written until the start ended).
    def verdict() -> dict[str, Any]:
        said: dict[str, Any] = status_json(fed, "r1")["verdict"]
        return said

    wait_for(lambda: [p["kind"] for p in verdict()["problems"]] == ["STARTING", "ERRORS"],
             10, message=verdict)  # the errors once the record is rewritten (every 2 s)
    line = verdict()["line"]
    assert line.startswith("STARTING: leader "), line
    assert "connecting to Kafka and checking the topics" in line, line
    took = _sigterm_seconds(fed, "r1")
    harness_report(f"SIGTERM in a Kafka retry loop: exited after {took:.2f}s")
    assert took < 2.0
    assert fed.count_events("r1", "bridge_stopped_cleanly") == 1
    fed.assert_clean_logs()


def test_sigterm_while_kafka_is_cut_keeps_unpublished_changes_in_the_outbox(
    on_proxied: Federation, harness_report: Report
) -> None:
    fed = on_proxied
    proxy = fed.broker.proxy
    assert proxy is not None
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    r1.client.create(r1.path("/first"), b"1")
    wait_for(lambda: r2.client.exists(r2.path("/first")), 30)
    proxy.cut(stall=True)
    for i in range(5):
        r1.client.create(r1.path(f"/pending{i}"), b"p")
    outbox = f"{fed.state_path}/subtrees/{fed.subtree}/outbox"

    def entries() -> list[str]:  # the outbox is sharded into buckets
        return [e for b in r1.client.get_children(outbox)
                for e in r1.client.get_children(f"{outbox}/{b}")]

    wait_for(lambda: len(entries()) >= 1, 30,
             message="changes were not captured into the outbox")
    time.sleep(1)
    took = _sigterm_seconds(fed, "r1")
    harness_report(f"SIGTERM with Kafka stalled: exited after {took:.2f}s")
    assert took < 2.0
    left: Any = entries()
    assert left, "unacked changes must stay in the outbox"
    proxy.restore()
    fed.start("r1")
    fed.wait_converged()
    wait_for(lambda: entries() == [], 10, message="the outbox was not drained")
    assert all(r2.client.exists(r2.path(f"/pending{i}")) for i in range(5))
