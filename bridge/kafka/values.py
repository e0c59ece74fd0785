"""The Kafka adapter's values: the record a fetch returns, its limits and timeouts."""

from __future__ import annotations

from dataclasses import dataclass

MAX_RECORD_BYTES = 1_048_576
# Bytes per produce batch. aiokafka sends one batch per partition per request
# and one request at a time per broker: with its default (16 KB, some 60
# records) a thousand-event capture took 17 round trips, 0.2-0.3 s, to
# publish. Half of a broker's default message.max.bytes (1 MB); a record
# larger than this still goes, in a batch of its own.
PRODUCE_BATCH_BYTES = 512 * 1024
# Upper bound on an idle fetch's wait. Kafka answers as soon as data
# arrives anyway; some compatible brokers (tansu) only answer on this timer,
# which then adds up to this much to every event's latency. An idle bridge
# pays 20 fetches a second per connection for it.
FETCH_MAX_WAIT_MS = 50
# What an event adds to its znode's data (its path twice, clock, ACL entries),
# generously: a topic limit that passes the start's check passes real records.
RECORD_HEADROOM = 16 * 1024


def publish_limit(max_data_bytes: int) -> int:
    """The smallest ``max.message.bytes`` a topic needs: a full produce batch, or the
    record of the largest znode replicated."""
    return max(PRODUCE_BATCH_BYTES, max_data_bytes + RECORD_HEADROOM)


QUERY_TIMEOUT_MS = 5000  # offset and metadata queries (see Kafka._querier)
STOP_TIMEOUT = 0.4

# How long the cleaner keeps a null-value record (a Kafka tombstone) after
# compacting the records it covers. A bridge publishes one for each tombstone
# it collects; a region reading the topic within this time still sees the
# null, and the collected delete it carries, after the key's older records
# are gone (README, "Tombstones"). A region bootstrapping later finds
# neither, which is fine: the key's older records went with them.
DELETE_RETENTION_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = ()
