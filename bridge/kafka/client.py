"""The Kafka adapter's client: everything it does, in one module for now.

Topic creation (compacted), publishing with acks=all, consuming manually
assigned partitions from positions the caller supplies, offset queries and
topic ids (the request itself is in ``topicids``).
aiokafka's exceptions are translated into ``bridge.errors`` through ``boundary``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import (
    IncompatibleBrokerVersion,
    InvalidProducerEpoch,
    OffsetOutOfRangeError,
    OutOfOrderSequenceNumber,
    TopicAlreadyExistsError,
    UnknownProducerId,
)
from aiokafka.errors import (
    KafkaError as AioKafkaError,
)
from aiokafka.helpers import create_ssl_context

from bridge.config import KafkaSettings
from bridge.errors import FatalKafkaError, KafkaError, OffsetOutOfRange
from bridge.kafka.boundary import _FATAL, _close, _guard, _started
from bridge.kafka.topicids import _UNKNOWN_TOPIC, _ZERO_ID, TopicIds, _id_text, _TopicIdsRequest
from bridge.kafka.values import (
    DELETE_RETENTION_MS,
    FETCH_MAX_WAIT_MS,
    MAX_RECORD_BYTES,
    PRODUCE_BATCH_BYTES,
    QUERY_TIMEOUT_MS,
    STOP_TIMEOUT,
    Record,
)

log = structlog.get_logger("bridge.kafka")

# The broker no longer knows this idempotent producer's sequence (it restarted
# and lost the tail of a log, or expired the producer's state): that producer
# can never send again; a new one (new producer id) can.
_PRODUCER_LOST = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch)


class Kafka:
    """Producer, consumer and admin client for one bridge, sharing one config."""

    def __init__(self, settings: KafkaSettings, *, client_id: str) -> None:
        self.settings = settings
        self.client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        # Offset and metadata queries go on a connection of their own: a broker
        # answers one request per connection at a time, so on the fetching
        # consumer's connection each waited behind a long-polling fetch (up to
        # fetch_max_wait_ms: 200 ms for the two offset lookups of a topic check,
        # which held every applied batch back by as much once a second).
        self._probe: AIOKafkaConsumer | None = None
        self._probe_lock = asyncio.Lock()
        self._secure_ok = False
        self._producer_lock = asyncio.Lock()
        self._producer_started = False
        self._ids_unsupported = False

    def _common(self) -> dict[str, Any]:
        s = self.settings
        opts: dict[str, Any] = {
            "bootstrap_servers": s.bootstrap_servers,
            "client_id": self.client_id,
            "request_timeout_ms": int(s.request_timeout * 1000),
            "security_protocol": s.security_protocol,
        }
        if s.ssl is not None:
            opts["ssl_context"] = create_ssl_context(
                cafile=s.ssl.cafile, certfile=s.ssl.certfile, keyfile=s.ssl.keyfile
            )
        elif s.security_protocol in ("SSL", "SASL_SSL"):
            opts["ssl_context"] = create_ssl_context()
        if s.sasl is not None:
            opts["sasl_mechanism"] = s.sasl.mechanism
            opts["sasl_plain_username"] = s.sasl.username
            opts["sasl_plain_password"] = s.sasl.password
        return opts

    async def _check_security(self) -> None:
        """Fail at once on a broker we must not or cannot talk to (untrusted TLS, bad SASL).

        aiokafka's bootstrap logs such a cause and then raises the same retriable
        "Unable to bootstrap" it raises for a broker that is merely down, so one
        connection made here first tells the two apart. Unreachable brokers stay
        retriable.
        """
        if self._secure_ok or self.settings.security_protocol == "PLAINTEXT":
            return
        opts = self._common()
        unreachable: list[str] = []
        # The first server that answers decides; only if none does is it retriable.
        for server in (s.strip() for s in self.settings.bootstrap_servers.split(",")):
            host, _, port = server.rpartition(":")
            try:
                conn = await create_conn(
                    host.strip("[]"),
                    int(port),
                    client_id=self.client_id,
                    request_timeout_ms=opts["request_timeout_ms"],
                    ssl_context=opts.get("ssl_context"),
                    security_protocol=opts["security_protocol"],
                    sasl_mechanism=opts.get("sasl_mechanism", "PLAIN"),
                    sasl_plain_username=opts.get("sasl_plain_username"),
                    sasl_plain_password=opts.get("sasl_plain_password"),
                )
            except ssl.SSLCertVerificationError as exc:
                raise FatalKafkaError(
                    f"TLS to {server}: the broker's certificate is not trusted "
                    f"({exc.verify_message}); check kafka.ssl.cafile"
                ) from exc
            except ssl.SSLError as exc:
                raise FatalKafkaError(
                    f"TLS to {server}: handshake failed ({exc.reason or exc}); check "
                    "kafka.security_protocol and kafka.ssl"
                ) from exc
            except _FATAL as exc:
                user = self.settings.sasl.username if self.settings.sasl else "?"
                raise FatalKafkaError(
                    f"SASL to {server}: authentication of {user!r} failed "
                    f"({type(exc).__name__}); check kafka.sasl.username, "
                    "kafka.sasl.password and kafka.sasl.mechanism"
                ) from exc
            except (AioKafkaError, OSError, TimeoutError) as exc:
                unreachable.append(f"{server}: {type(exc).__name__} {exc}")
                continue
            conn.close()
            self._secure_ok = True
            return
        # Down or unreachable: the caller retries.
        raise KafkaError("connect: " + "; ".join(unreachable))

    # -- admin ---------------------------------------------------------
    async def ensure_topics(self, names: Iterable[str]) -> list[str]:
        """Create missing topics, compacted, one partition (keeps each origin's order)."""
        await self._check_security()
        admin = AIOKafkaAdminClient(**self._common())
        created = []
        try:
            await _guard("connect admin", admin.start())
            existing = set(await _guard("list topics", admin.list_topics()))
            for name in names:
                if name in existing:
                    continue
                rf = self.settings.replication_factor
                topic = NewTopic(
                    name=name,
                    num_partitions=1,
                    replication_factor=rf,
                    # aiokafka only lets -1 (broker default) through with an
                    # assignment mapping present; an empty one assigns nothing.
                    replica_assignments={} if rf == -1 else None,
                    topic_configs={"cleanup.policy": "compact",
                                   "delete.retention.ms": str(DELETE_RETENTION_MS)},
                )
                resp = await _guard(f"create topic {name}", admin.create_topics([topic]))
                for err in resp.topic_errors:
                    # The admin client reports per-topic failures in the response
                    # instead of raising; 36 is TOPIC_ALREADY_EXISTS (a racing peer).
                    code = err[1]
                    if code == TopicAlreadyExistsError.errno:
                        continue
                    if code:
                        message = err[2] if len(err) > 2 else ""
                        raise FatalKafkaError(
                            f"cannot create topic {name}: error {code} {message}; check "
                            "kafka.replication_factor and the broker's topic ACLs, or create "
                            "it yourself with cleanup.policy=compact"
                        )
                created.append(name)
        finally:
            await admin.close()
        return created

    async def delete_topics(self, names: Sequence[str]) -> None:
        admin = AIOKafkaAdminClient(**self._common())
        try:
            await _guard("connect admin", admin.start())
            await _guard("delete topics", admin.delete_topics(list(names)))
        finally:
            await admin.close()

    # -- producer ------------------------------------------------------
    async def start_producer(self) -> None:
        await self._check_security()
        producer = AIOKafkaProducer(
            **self._common(),
            acks="all",
            enable_idempotence=self.settings.enable_idempotence,
            max_request_size=MAX_RECORD_BYTES + 65536,
            max_batch_size=PRODUCE_BATCH_BYTES,
            linger_ms=2,
        )
        try:
            await _guard("connect producer", producer.start())
        except KafkaError as exc:
            await producer.stop()
            cause = exc.__cause__
            if (
                self.settings.enable_idempotence
                and isinstance(cause, AioKafkaError)
                and not cause.retriable
            ):
                # The broker answered, and refused: with idempotence on, the
                # only request start() makes after metadata is InitProducerId.
                # Retrying gets the same answer forever.
                raise FatalKafkaError(
                    f"connect producer: the broker refused InitProducerId "
                    f"({type(cause).__name__}), so it does not support idempotent "
                    "producers; set kafka.enable_idempotence: false for this broker"
                ) from exc
            raise
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer
        self._producer_started = True

    async def send_all(
        self, records: Sequence[tuple[str, bytes, bytes | None]],
        headers: Mapping[int, Sequence[tuple[str, bytes]]] | None = None,
    ) -> dict[tuple[str, int], int]:
        """Send (topic, key, value) records, a None value being a Kafka tombstone; wait
        for all acks. ``headers`` maps a record's index to its headers.

        Returns, per partition written, the offset after the last record acked.
        """
        producer = await self._live_producer()
        extra = headers or {}

        async def send() -> dict[tuple[str, int], int]:
            futures = [await producer.send(t, value=v, key=k, headers=list(extra[i]))
                       if i in extra else await producer.send(t, value=v, key=k)
                       for i, (t, k, v) in enumerate(records)]
            acked = await asyncio.gather(*futures)
            ends: dict[tuple[str, int], int] = {}
            for md in acked:
                key = (md.topic, md.partition)
                ends[key] = max(ends.get(key, 0), md.offset + 1)
            return ends

        try:
            return await _guard("publish", send())
        except KafkaError as exc:
            if isinstance(exc.__cause__, _PRODUCER_LOST):
                await self._drop_producer(producer, type(exc.__cause__).__name__)
            raise

    async def _live_producer(self) -> AIOKafkaProducer:
        async with self._producer_lock:
            if self._producer is None:
                if not self._producer_started:
                    raise KafkaError("producer not started")
                await self.start_producer()
            assert self._producer is not None
            return self._producer

    async def _drop_producer(self, producer: AIOKafkaProducer, reason: str) -> None:
        """Forget a producer the broker no longer accepts; the next send starts a new one."""
        broken: Any = producer
        async with self._producer_lock:
            if self._producer is not producer:
                return  # a concurrent sender already replaced it
            self._producer = None
        log.warning("producer_reset", reason=reason,
                    hint="the broker lost this producer's state (restart, lost log); "
                         "unacked changes stay in the outbox and go out with a new producer")
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await broken.stop()
        except Exception as exc:  # it is broken anyway
            log.debug("producer_stop_failed", error=str(exc))

    # -- consumer ------------------------------------------------------
    async def start_consumer(self, group_id: str | None, *, reset: str = "earliest") -> None:
        """Start the consumer; ``reset="none"`` makes an out-of-range position an error.

        The bridge's own consumer uses "none": a position beyond a topic's end
        means the topic lost records, which must be reported and handled, never
        silently "reset" by the client.
        """
        await self._check_security()
        consumer = AIOKafkaConsumer(
            **self._common(),
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=reset,
            max_partition_fetch_bytes=2 * MAX_RECORD_BYTES,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            fetch_max_bytes=8 * MAX_RECORD_BYTES,
        )
        self._consumer = await _started(consumer)

    def _need_consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise KafkaError("consumer not started")
        return self._consumer

    async def _querier(self) -> AIOKafkaConsumer:
        """The client for offset and metadata queries (started on first use)."""
        self._need_consumer()
        async with self._probe_lock:
            if self._probe is None:
                # A short request timeout: the receiver's topic checks wait on
                # this connection, and one left dead by a network cut is only
                # replaced once a request on it times out.
                opts = self._common()
                opts["request_timeout_ms"] = min(opts["request_timeout_ms"], QUERY_TIMEOUT_MS)
                self._probe = await _started(AIOKafkaConsumer(
                    **opts, group_id=None, enable_auto_commit=False))
            return self._probe

    async def partitions(self, topic: str) -> list[int]:
        consumer = await self._querier()
        parts = await _guard(f"partitions of {topic}", _partitions(consumer, topic))
        return sorted(parts)

    async def assign(self, positions: dict[tuple[str, int], int | None]) -> None:
        """Assign partitions and seek to each stored position (None: from the start)."""
        consumer = self._need_consumer()
        tps = {TopicPartition(t, p): off for (t, p), off in positions.items()}
        consumer.assign(list(tps))
        for tp, off in tps.items():
            if off is None:
                await _guard("seek", consumer.seek_to_beginning(tp))
            else:
                consumer.seek(tp, off)

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self._need_consumer().seek(TopicPartition(topic, partition), offset)

    async def fetch(self, timeout_ms: int, max_records: int) -> list[Record]:
        consumer = self._need_consumer()
        try:
            batches = await _guard(
                "fetch", consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
            )
        except KafkaError as exc:
            cause = exc.__cause__
            if isinstance(cause, OffsetOutOfRangeError):
                found = cause.args[0] if cause.args and isinstance(cause.args[0], dict) else {}
                offsets = {(tp.topic, tp.partition): int(o) for tp, o in found.items()}
                raise OffsetOutOfRange(f"fetch: offsets out of range {offsets}",
                                       offsets) from cause
            raise
        out = []
        for tp, msgs in batches.items():
            for m in msgs:
                out.append(Record(tp.topic, tp.partition, m.offset, m.key, m.value, m.timestamp,
                                  tuple((h[0], bytes(h[1] or b"")) for h in m.headers or ())))
        return out

    async def topic_ids(self, topics: Sequence[str]) -> TopicIds:
        """Each topic's id (Metadata v12), through the query connection.

        aiokafka's own metadata has no topic ids, so the request is sent here
        by hand. A broker that does not offer v12 answers once; after that
        the bridge stops asking and relies on offsets.
        """
        if self._ids_unsupported or not topics:
            return TopicIds()
        consumer = await self._querier()
        client: Any = consumer._client  # aiokafka's AIOKafkaClient: the one place we reach in
        node = client.get_random_node()
        if node is None:
            raise KafkaError("topic ids: no broker known")
        try:
            resp = await _guard("topic ids", client.send(node, _TopicIdsRequest(list(topics))))
        except (NotImplementedError, IncompatibleBrokerVersion):
            # aiokafka's answers to a version the broker lacks, or to a broker
            # that did not list its versions.
            self._ids_unsupported = True
            log.info("topic_ids_unavailable", reason="the broker does not offer Metadata v12",
                     hint="a re-created topic is recognised by its offsets only")
            return TopicIds()
        ids: dict[str, str] = {}
        missing: set[str] = set()
        for error_code, name, topic_id, *_ in resp.topics:
            if error_code == _UNKNOWN_TOPIC:
                missing.add(name)
            elif error_code == 0 and topic_id != _ZERO_ID:
                ids[name] = _id_text(topic_id)
        return TopicIds(ids, frozenset(missing), resp.cluster_id)

    async def timestamps_at(
        self, offsets: dict[tuple[str, int], int], within: float = 10.0
    ) -> dict[tuple[str, int], int]:
        """Timestamp (ms) of the record at each offset: how old the oldest unapplied event is."""
        consumer = self._need_consumer()
        tps = {TopicPartition(t, p): o for (t, p), o in offsets.items()}
        consumer.assign(list(tps))
        for tp, off in tps.items():
            consumer.seek(tp, off)
        found: dict[tuple[str, int], int] = {}
        deadline = asyncio.get_running_loop().time() + within
        while len(found) < len(tps) and asyncio.get_running_loop().time() < deadline:
            batch = await _guard("fetch", consumer.getmany(timeout_ms=500, max_records=len(tps)))
            for tp, msgs in batch.items():
                if msgs and (tp.topic, tp.partition) not in found:
                    found[(tp.topic, tp.partition)] = msgs[0].timestamp
                    consumer.pause(tp)
        return found

    def highwater(self, topic: str, positions: dict[int, int]) -> dict[int, int]:
        """End offsets seen by the last fetch (no request); the position where unknown."""
        out = dict(positions)
        if self._consumer is None:
            return out
        for tp in self._consumer.assignment():
            if tp.topic == topic:
                hw = self._consumer.highwater(tp)
                if hw is not None:
                    out[tp.partition] = hw
        return out

    def highwaters_since(self, tps: Sequence[tuple[str, int]], since_ms: int
                         ) -> dict[tuple[str, int], int]:
        """High watermarks that a fetch answered at or after ``since_ms`` (wall clock ms)."""
        out: dict[tuple[str, int], int] = {}
        if self._consumer is None:
            return out
        assigned = self._consumer.assignment()
        for topic, part in tps:
            tp = TopicPartition(topic, part)
            if tp not in assigned:
                continue
            hw = self._consumer.highwater(tp)
            at = self._consumer.last_poll_timestamp(tp)
            if hw is not None and at is not None and at >= since_ms:
                out[(topic, part)] = hw
        return out

    async def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Mirror applied positions into the consumer group, for external lag tools."""
        consumer = self._need_consumer()
        await _guard(
            "commit", consumer.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})
        )

    async def end_offsets(self, tps: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
        consumer = await self._querier()
        res = await _guard(
            "end offsets", consumer.end_offsets([TopicPartition(t, p) for t, p in tps])
        )
        return {(tp.topic, tp.partition): off for tp, off in res.items()}

    async def beginning_offsets(
        self, tps: Sequence[tuple[str, int]]
    ) -> dict[tuple[str, int], int]:
        """Log start offset per partition: what a reader from the start begins with."""
        consumer = await self._querier()
        res = await _guard(
            "beginning offsets",
            consumer.beginning_offsets([TopicPartition(t, p) for t, p in tps]),
        )
        return {(tp.topic, tp.partition): off for tp, off in res.items()}

    async def reset_queries(self) -> None:
        """Close the query connection: the next query opens a new one.

        For a query that got no answer in time. aiokafka closes a connection
        on its own request timeout only, and a caller's shorter deadline
        would otherwise leave every later query queued on the dead one.
        """
        async with self._probe_lock:
            probe, self._probe = self._probe, None
        if probe is not None:
            await _close("query consumer", probe)

    async def stop(self) -> None:
        """Close both clients, each within STOP_TIMEOUT seconds.

        Nothing is lost by not waiting longer: every change that matters was
        acked before its outbox entry went, and a producer's flush against an
        unreachable broker would otherwise hold a stopping process for a
        whole request timeout.
        """
        closers = [_close(what, c) for what, c in
                   (("producer", self._producer), ("consumer", self._consumer),
                    ("query consumer", self._probe)) if c is not None]
        self._producer = self._consumer = self._probe = None
        await asyncio.gather(*closers)


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        # Metadata may be stale right after topic creation; topics() refreshes it.
        await consumer.topics()
        parts = consumer.partitions_for_topic(topic)
    return set(parts or {0})

