"""This ensemble's identity, and the check that no other ensemble runs as this region.

The *incarnation* marker under the state path names this ensemble's
lifetime: a wiped ensemble gets a new one and is rebuilt from the topics (a
legitimate restore), and every record it publishes carries it. Records of
another incarnation that are still being *published* on this region's own
topic mean a second ensemble runs as this region: the bridge refuses to
start, or stops, with exit status 4. A restore is told apart by time: the
old incarnation's records stop when its ensemble (and its bridge) is gone,
while a twin keeps heartbeating. Once running, the inbound pipeline watches
the own topic's tail (``Inbound.own_record``).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Collection
from functools import partial
from typing import TYPE_CHECKING

import structlog

from bridge.errors import BridgeError, DuplicateRegionError
from bridge.inbound import FETCH_MAX_RECORDS, decode_record, duplicate_message
from bridge.kafka import Kafka
from bridge.status import now_ms

if TYPE_CHECKING:
    from bridge.engine import Bridge

log = structlog.get_logger("bridge.twin")

_INC = re.compile(r"[0-9a-f]{1,64}")
# Start-up twin check: how many of the own topic's last records to look at.
TWIN_LOOKBACK = 50

TopicPartition = tuple[str, int]


async def establish_incarnation(b: Bridge) -> bool:
    """Set ``b.incarnation``, marking this ensemble's state first if it has none.

    True when the marker was missing (a new or wiped ensemble).
    """
    path = f"{b.settings.state_path}/incarnation"
    node = await b.zk.get(path)
    if node is not None:
        b.incarnation = marker(node.data)
        return False
    await b.zk.ensure_path(b.settings.state_path)
    new = uuid.uuid4().hex
    try:
        await b.zk.create(path, new.encode())
    except BridgeError:
        node = await b.zk.get(path)  # a racing bridge of this region made it
        b.incarnation = marker(node.data if node else b"")
        return False
    b.incarnation = new
    log.warning("state_initialised", state_path=b.settings.state_path,
                incarnation=new, hint="new or wiped ensemble: rebuilding from the topics")
    return True


def marker(raw: bytes) -> str:
    text = raw.decode("ascii", "replace")
    # A marker of an unexpected shape still names this ensemble: its digest does.
    return text if _INC.fullmatch(text) else uuid.uuid5(uuid.NAMESPACE_OID, text).hex


async def check(b: Bridge, reader: Kafka, names: Collection[str]
                ) -> dict[TopicPartition, int] | None:
    """Refuse to start while another ensemble is publishing as these subtrees' region.

    Returns the own partitions' ends it read, for the own-topic survey to
    go on from, unless it watched the topics (then they are old: None).

    Records of another incarnation on the own topic are history after a
    restore (the wiped ensemble's bridge published them) and live only
    when a second ensemble runs with this region's name. So: if any of
    the topic's last records is another incarnation's and recent (within
    three heartbeats), watch the topic for three heartbeat intervals
    before publishing anything; a new record of that incarnation means a
    twin.
    """
    window = 3 * b.settings.heartbeat_interval + 1.0
    tps = []
    for name in names:
        topic = b.topic(name, b.region)
        tps += [(topic, p) for p in await b.retry(
            f"partitions of {topic}", partial(reader.partitions, topic))]
    ends = await b.retry("end offsets", lambda: reader.readable_ends(tps))
    begins = await b.retry("beginning offsets", lambda: reader.beginning_offsets(tps))
    tail = {tp: max(begins.get(tp, 0), end - TWIN_LOOKBACK)
            for tp, end in ends.items() if end > begins.get(tp, 0)}
    if not tail:
        return ends
    recent = now_ms() - int(1000 * window)
    others = {inc: ts for inc, ts, _ in await _own_records(b, reader, tail, ends, 10.0)
              if inc != b.incarnation and ts >= recent}
    if not others:
        return ends
    log.warning("twin_check", incarnations=sorted(others), window_s=window,
                hint="another incarnation of this region published moments ago: a "
                     "restore, or a second ensemble with this region's name; watching")
    fresh = await _own_records(b, reader, dict(ends), None, window)
    for inc, _ts, where in fresh:
        if inc != b.incarnation:
            raise DuplicateRegionError(duplicate_message(
                b.region, where[0], theirs=inc, ours=b.incarnation,
                seen=f"a record at offset {where[1]} while starting"))
    return None


async def _own_records(b: Bridge, reader: Kafka, start: dict[TopicPartition, int],
                       until: dict[TopicPartition, int] | None, seconds: float
                       ) -> list[tuple[str, int, TopicPartition]]:
    """(incarnation, timestamp ms, (topic, offset)) of stamped records from ``start``.

    Reads up to ``until`` (end offsets) or, when None, for ``seconds``.
    """
    await reader.assign(dict(start))
    out: list[tuple[str, int, TopicPartition]] = []
    done = dict(start)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if until is not None and all(done.get(tp, 0) >= e for tp, e in until.items()):
            break
        for rec in await reader.fetch(200, FETCH_MAX_RECORDS):
            done[(rec.topic, rec.partition)] = rec.offset + 1
            event, reason, _ = decode_record(rec, b.inbound.own.get(rec.topic, ""), b.region)
            if event is not None and not reason and event.inc is not None:
                out.append((event.inc, rec.timestamp_ms, (rec.topic, rec.offset)))
    return out
