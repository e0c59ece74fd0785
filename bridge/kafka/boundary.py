"""The boundary with aiokafka: its exceptions translated into ``bridge.errors``
(``_guard``), and its clients started and stopped without leaking one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import (
    AuthenticationFailedError,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    MessageSizeTooLargeError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
)
from aiokafka.errors import (
    KafkaError as AioKafkaError,
)

from bridge.errors import FatalKafkaError, KafkaError
from bridge.kafka.values import STOP_TIMEOUT

log = structlog.get_logger("bridge.kafka")

T = TypeVar("T")

_FATAL = (
    AuthenticationFailedError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
    ClusterAuthorizationFailedError,
)


async def _guard(what: str, coro: Awaitable[T]) -> T:
    try:
        return await coro
    except _FATAL as exc:
        raise FatalKafkaError(
            f"{what}: {type(exc).__name__}: refused by the broker; check kafka.sasl "
            "credentials and the ACLs of this region's principal"
        ) from exc
    except MessageSizeTooLargeError as exc:
        raise KafkaError(
            f"{what}: {type(exc).__name__}: a record batch is larger than the topic's "
            "max.message.bytes (or the broker's message.max.bytes) allows; raise it "
            "(the bridge logs topic_message_limit with the value at start); retried until "
            "then, nothing is lost") from exc
    except AioKafkaError as exc:
        raise KafkaError(f"{what}: {type(exc).__name__} {exc}") from exc
    except (OSError, TimeoutError) as exc:
        raise KafkaError(f"{what}: {type(exc).__name__} {exc}") from exc


async def _close(what: str, client: AIOKafkaProducer | AIOKafkaConsumer) -> None:
    """Stop ``client`` within STOP_TIMEOUT seconds; a failure is logged, not raised."""
    try:
        async with asyncio.timeout(STOP_TIMEOUT):
            await client.stop()
    except TimeoutError:
        log.warning("kafka_stop_timeout", client=what, timeout_s=STOP_TIMEOUT)
    except asyncio.CancelledError:
        # aiokafka re-raises the cancellation of its own fetch task (one
        # waiting to retry an unreachable broker) from stop(): a failed
        # close, unless this task itself is being cancelled.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.warning("kafka_stop_failed", client=what, error="cancelled inside aiokafka")
    except Exception as exc:  # shutting down: report, don't mask the cause
        log.warning("kafka_stop_failed", client=what, error=str(exc))


async def _started(consumer: AIOKafkaConsumer) -> AIOKafkaConsumer:
    """``consumer``, started; closed again if it could not start."""
    try:
        await _guard("connect consumer", consumer.start())
    except BaseException:
        await consumer.stop()
        raise
    return consumer
