"""Topic ids: the Metadata v12 request (KIP-516) aiokafka lacks, and its answer.

``TopicIds`` is what ``Kafka.topic_ids`` returns; the request and response
types let the client send Metadata v12 by hand on aiokafka's connection.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import ClassVar

from aiokafka.protocol.abstract import AbstractType
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)


@dataclass(frozen=True, slots=True)
class TopicIds:
    """Kafka's identity of topics: a topic deleted and re-created gets a new id.

    ``ids`` holds the topics the broker gave an id for; ``missing`` the ones it
    does not know at all. A broker without topic ids (before Metadata v10, or
    one answering the all-zero id) leaves ``ids`` empty: offsets alone decide.
    """

    ids: Mapping[str, str] = field(default_factory=dict)
    missing: frozenset[str] = frozenset()
    cluster_id: str | None = None
    # Partitions without a leader (every node holding a replica is down): asking
    # for their offsets would wait out the request timeout, and the whole check.
    leaderless: frozenset[tuple[str, int]] = frozenset()


# Metadata v12 (KIP-516 topic ids), which aiokafka does not request: its own
# metadata stops at v5. Only what this bridge reads is named; the layout is
# Kafka's, field for field, or the answer would not parse.
_UNKNOWN_TOPIC = 3
_ZERO_ID = bytes(16)


class _Uuid(AbstractType[bytes]):  # type: ignore[misc]
    @classmethod
    def encode(cls, value: bytes) -> bytes:
        return value

    @classmethod
    def decode(cls, data: BytesIO) -> bytes:
        raw = data.read(16)
        if len(raw) != 16:
            raise ValueError("Buffer underrun decoding uuid")
        return raw


class _MetadataResponseV12(Response):  # type: ignore[misc]
    API_KEY = 3
    API_VERSION = 12
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("brokers", CompactArray(
            ("node_id", Int32), ("host", CompactString("utf-8")), ("port", Int32),
            ("rack", CompactString("utf-8")), ("tags", TaggedFields))),
        ("cluster_id", CompactString("utf-8")),
        ("controller_id", Int32),
        ("topics", CompactArray(
            ("error_code", Int16),
            ("name", CompactString("utf-8")),
            ("topic_id", _Uuid),
            ("is_internal", Boolean),
            ("partitions", CompactArray(
                ("error_code", Int16), ("partition_index", Int32), ("leader_id", Int32),
                ("leader_epoch", Int32), ("replica_nodes", CompactArray(Int32)),
                ("isr_nodes", CompactArray(Int32)), ("offline_replicas", CompactArray(Int32)),
                ("tags", TaggedFields))),
            ("topic_authorized_operations", Int32),
            ("tags", TaggedFields))),
        ("tags", TaggedFields),
    )


class _MetadataRequestV12(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION: ClassVar[bool] = True
    API_KEY = 3
    API_VERSION = 12
    RESPONSE_TYPE = _MetadataResponseV12
    SCHEMA = Schema(
        ("topics", CompactArray(
            ("topic_id", _Uuid), ("name", CompactString("utf-8")), ("tags", TaggedFields))),
        ("allow_auto_topic_creation", Boolean),
        ("include_topic_authorized_operations", Boolean),
        ("tags", TaggedFields),
    )


class _TopicIdsRequest(Request[_MetadataRequestV12]):  # type: ignore[misc]
    API_KEY = 3

    def __init__(self, topics: Sequence[str]) -> None:
        self.topics = topics

    def build(self, request_struct_class: type[_MetadataRequestV12]) -> _MetadataRequestV12:
        return request_struct_class(
            [(_ZERO_ID, t, {}) for t in self.topics], False, False, {})


def _id_text(raw: bytes) -> str:
    # How Kafka prints a topic id (kafka-topics --describe): URL-safe base64.
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")
