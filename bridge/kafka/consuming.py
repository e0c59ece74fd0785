"""Consuming: the consumer over manually assigned partitions (positions, fetches,
high watermarks, commits), and the query connection beside it for partitions,
offsets and topic ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IncompatibleBrokerVersion, KafkaTimeoutError, OffsetOutOfRangeError

from bridge.errors import KafkaError, OffsetOutOfRange
from bridge.kafka.boundary import _close, _guard, _started
from bridge.kafka.connection import Connection
from bridge.kafka.topicids import _UNKNOWN_TOPIC, _ZERO_ID, TopicIds, _id_text, _TopicIdsRequest
from bridge.kafka.values import FETCH_MAX_WAIT_MS, MAX_RECORD_BYTES, QUERY_TIMEOUT_MS, Record

log = structlog.get_logger("bridge.kafka")


class Consuming(Connection):
    """The consumer part of ``Kafka``."""

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
        return (await self.partitions_of([topic]))[topic]

    async def partitions_of(self, topics: Sequence[str]) -> dict[str, list[int]]:
        """Each topic's partitions, with at most one metadata request for them all."""
        consumer = await self._querier()
        return await _guard("partitions of the topics", _partitions(consumer, topics))

    async def assign(self, positions: dict[tuple[str, int], int | None],
                     leaderless: Collection[tuple[str, int]] = ()) -> None:
        """Assign partitions and seek to each stored position (None: from the start).

        The start of a partition in ``leaderless`` is not waited for: aiokafka
        asks for it once the partition has a leader, and nothing is fetched
        from it before. Waiting held a start up by a request timeout (30 s by
        default) for each such partition of a region that had no position yet.
        """
        consumer = self._need_consumer()
        tps = {TopicPartition(t, p): off for (t, p), off in positions.items()}
        consumer.assign(list(tps))
        for tp, off in tps.items():
            if off is not None:
                consumer.seek(tp, off)
        start = [tp for tp, off in tps.items() if off is None]
        later = [tp for tp in start if (tp.topic, tp.partition) in leaderless]
        now = [tp for tp in start if tp not in later]
        if later:
            # Marked for the reset at once (before its first wait), so no fetch
            # position is taken from elsewhere meanwhile.
            seeking = asyncio.ensure_future(consumer.seek_to_beginning(*later))
            self._pending_seeks.add(seeking)
            seeking.add_done_callback(_settled(self._pending_seeks))
        if now:
            await _guard("seek", consumer.seek_to_beginning(*now))

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
        leaderless: set[tuple[str, int]] = set()
        for error_code, name, topic_id, _, partitions, *_ in resp.topics:
            if error_code == _UNKNOWN_TOPIC:
                missing.add(name)
            elif error_code == 0 and topic_id != _ZERO_ID:
                ids[name] = _id_text(topic_id)
            leaderless.update((name, index) for _, index, leader, *_ in partitions
                              if leader < 0)
        return TopicIds(ids, frozenset(missing), resp.cluster_id, frozenset(leaderless))

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
        if self._consumer is None:
            return {}
        return _highwaters(self._consumer, tps, since_ms)

    async def readable_ends(self, tps: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Each partition's end as reading finds it: ListOffsets, raised to a fetch's watermark.

        tansu lists a partition's end as one past the base offset of the last
        batch produced to it, so after a batch of many records it lists less
        than it acknowledged and serves (150 for 201 records, measured). A
        fetch's high watermark is what reading finds: one fetch, of a record
        just below each listed end, on the query connection. A partition
        listed empty is empty (a batch's base offset is listed one past).
        """
        listed = await self.end_offsets(tps)
        probe = {TopicPartition(t, p): end - 1 for (t, p), end in listed.items() if end > 0}
        if not probe:
            return listed
        consumer = await self._querier()
        async with self._probe_fetch:
            since = int(time.time() * 1000)
            consumer.assign(list(probe))
            try:
                for tp, offset in probe.items():
                    consumer.seek(tp, offset)
                deadline = time.monotonic() + QUERY_TIMEOUT_MS / 1000
                found: dict[tuple[str, int], int] = {}
                while len(found) < len(probe) and time.monotonic() < deadline:
                    await _guard("fetch", consumer.getmany(
                        *probe, timeout_ms=10 * FETCH_MAX_WAIT_MS, max_records=len(probe)))
                    found = _highwaters(consumer, list(listed), since)
            finally:
                consumer.unsubscribe()
        return {tp: max(end, found.get(tp, end)) for tp, end in listed.items()}

    async def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Mirror applied positions into the consumer group, for external lag tools."""
        consumer = self._need_consumer()
        await _guard(
            "commit", consumer.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})
        )

    async def end_offsets(self, tps: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
        consumer = await self._querier()
        res = await self._offsets("end offsets", tps, consumer.end_offsets(
            [TopicPartition(t, p) for t, p in tps]))
        return {(tp.topic, tp.partition): off for tp, off in res.items()}

    async def beginning_offsets(
        self, tps: Sequence[tuple[str, int]]
    ) -> dict[tuple[str, int], int]:
        """Log start offset per partition: what a reader from the start begins with."""
        consumer = await self._querier()
        res = await self._offsets("beginning offsets", tps, consumer.beginning_offsets(
            [TopicPartition(t, p) for t, p in tps]))
        return {(tp.topic, tp.partition): off for tp, off in res.items()}

    async def _offsets(self, what: str, tps: Sequence[tuple[str, int]],
                       asked: Awaitable[dict[TopicPartition, int]]
                       ) -> dict[TopicPartition, int]:
        """``asked``; a timeout caused by a partition without a leader says so (aiokafka
        only says it got no offsets in time)."""
        try:
            return await _guard(what, asked)
        except KafkaError as exc:
            if not isinstance(exc.__cause__, KafkaTimeoutError):
                raise
            down: frozenset[tuple[str, int]] = frozenset()
            with contextlib.suppress(KafkaError):
                down = (await self.topic_ids(sorted({t for t, _ in tps}))).leaderless
            if named := ", ".join(f"{t} partition {p}" for t, p in sorted(down) if (t, p) in tps):
                raise KafkaError(f"{what}: no leader for {named}: every node holding a "
                                 "replica is down; waiting for one") from exc
            raise

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


def _highwaters(consumer: AIOKafkaConsumer, tps: Sequence[tuple[str, int]], since_ms: int
                ) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    assigned = consumer.assignment()
    for topic, part in tps:
        tp = TopicPartition(topic, part)
        if tp not in assigned:
            continue
        hw = consumer.highwater(tp)
        at = consumer.last_poll_timestamp(tp)
        if hw is not None and at is not None and at >= since_ms:
            out[(topic, part)] = hw
    return out


async def _partitions(consumer: AIOKafkaConsumer, topics: Sequence[str]
                      ) -> dict[str, list[int]]:
    known = {t: consumer.partitions_for_topic(t) for t in topics}
    if not all(known.values()):
        # Not in the consumer's metadata (it holds only what it was assigned):
        # ask for all of it, once. (``topics()`` asks too, but keeps what it
        # learns to itself: this used to answer {0} for every topic.)
        cluster = await consumer._client.fetch_all_metadata()
        known = {t: parts or cluster.partitions_for_topic(t) for t, parts in known.items()}
    return {t: sorted(parts or {0}) for t, parts in known.items()}


def _settled(pending: set[asyncio.Future[bool]]) -> Callable[[asyncio.Future[bool]], None]:
    """A done callback: forget the seek, its outcome taken (a failed one is only
    logged: the fetch that follows meets the same error and reports it)."""
    def done(seeking: asyncio.Future[bool]) -> None:
        pending.discard(seeking)
        if not seeking.cancelled() and (exc := seeking.exception()) is not None:
            log.info("seek_failed", error=f"{type(exc).__name__}: {exc}")
    return done
