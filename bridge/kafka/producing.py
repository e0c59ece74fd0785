"""Producing: the producer with acks=all, sending records and waiting for their
acks, and replacing a producer the broker no longer accepts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    OutOfOrderSequenceNumber,
    UnknownProducerId,
)
from aiokafka.errors import (
    KafkaError as AioKafkaError,
)

from bridge.errors import FatalKafkaError, KafkaError
from bridge.kafka.boundary import _guard
from bridge.kafka.connection import Connection
from bridge.kafka.values import MAX_RECORD_BYTES, PRODUCE_BATCH_BYTES, STOP_TIMEOUT

log = structlog.get_logger("bridge.kafka")

# The broker no longer knows this idempotent producer's sequence (it restarted
# and lost the tail of a log, or expired the producer's state): that producer
# can never send again; a new one (new producer id) can.
_PRODUCER_LOST = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch)


class Producing(Connection):
    """The producer part of ``Kafka``."""

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
            # One batch per partition, filled in the records' order and sent
            # when full (the first record of a batch always fits). aiokafka's
            # send() made, resolved and gathered a future per record, and
            # hashed each key in Python: the larger part of publishing's CPU
            # (profiled in steady state). Order within a partition is the
            # records' order either way; each partition still has one batch
            # queued at a time.
            known: set[str] = set()  # topics whose metadata the producer has
            filling: dict[tuple[str, int], tuple[Any, int]] = {}
            sent: list[tuple[tuple[str, int], asyncio.Future[Any], int]] = []
            for i, (topic, key, value) in enumerate(records):
                if topic not in known:
                    await producer.partitions_for(topic)
                    known.add(topic)
                # Partition 0 always: one origin's order lives in one partition, also
                # on a topic created with more (their keys would hash apart, and
                # receivers would drop the pieces of a batch as incomplete).
                tp = (topic, 0)
                batch, n = filling.get(tp) or (producer.create_batch(), 0)
                hdrs = list(extra.get(i, ()))
                if batch.append(timestamp=None, key=key, value=value, headers=hdrs) is None:
                    sent.append((tp, await producer.send_batch(batch, tp[0], partition=tp[1]), n))
                    batch, n = producer.create_batch(), 0
                    batch.append(timestamp=None, key=key, value=value, headers=hdrs)
                filling[tp] = (batch, n + 1)
            for tp, (batch, n) in filling.items():
                sent.append((tp, await producer.send_batch(batch, tp[0], partition=tp[1]), n))
            acked = await asyncio.gather(*(future for _, future, _ in sent))
            ends: dict[tuple[str, int], int] = {}
            for (tp, _, n), md in zip(sent, acked, strict=True):
                ends[tp] = max(ends.get(tp, 0), md.offset + n)  # md.offset: the batch's first
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
