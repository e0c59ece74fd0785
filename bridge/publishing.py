"""Publishing: the outbound queue's units to Kafka, in order, and what follows each ack.

Ordering invariant: a subtree's publisher takes units from its queue in the
order they were queued (``bridge.outbound``), several at a time, and sends
them as one ordered run of records; only after Kafka acknowledged all of them
are their outbox entries deleted (grouped, in the background) and the own
topic's position advanced, so a restart republishes whole batches, never a part.

Each subtree has its own queue and publisher, as it has its own topic: a topic
Kafka cannot take (its partition without a leader, say) holds back that
subtree's changes and heartbeats only. With one publisher for all, it held
every subtree's, and the peers called the whole region silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from bridge import codec, failpoints
from bridge.errors import BridgeError

if TYPE_CHECKING:
    from bridge.engine import Bridge

log = structlog.get_logger("bridge.publishing")

PUBLISH_MAX_RECORDS = 2000
# Acknowledged outbox entries are deleted together, at most every DELETE_GAP
# seconds, DELETE_CHUNK per multi (well under jute.maxbuffer): one delete per
# published batch was a third of the origin's ZooKeeper requests at 200
# writes/s. An entry acked but not yet deleted when the bridge dies is only
# published again, which receivers skip as equal.
DELETE_GAP = 0.1
DELETE_CHUNK = 1000
# The own topic's position (it bounds a replay after a wipe) is written at most
# this often; a stale one only replays a little more.
OWN_POSITION_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One unit for the publisher: a batch's records and its outbox entry (None: heartbeat)."""

    subtree: str
    records: tuple[tuple[bytes, bytes], ...]  # (key, value)
    outbox_path: str | None
    reannounce: bool = False  # the whole state again, after the own topic lost records
    done: asyncio.Event | None = None  # set once Kafka acknowledged these records
    captured_ms: int = 0  # wall clock of the capture (outbox age)
    # Null-value records of collected tombstones: each record's value goes in
    # the NULL_HEADER header (the collected delete) and the record's own is None.
    nulls: bool = False
    size: int = 0  # bytes of an outbox entry's keys and values, counted against QUEUE_BYTES



class Publishing:
    """The publishing half of the outbound pipeline (``Outbound`` adds capture and the queue)."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.queues: dict[str, asyncio.Queue[Outgoing]] = {
            n: asyncio.Queue() for n in bridge.stores}
        # Records and bytes of outbox entries queued and not yet acked, per subtree.
        self.queued: dict[str, int] = dict.fromkeys(bridge.stores, 0)
        self.queued_bytes: dict[str, int] = dict.fromkeys(bridge.stores, 0)
        # outbox path → capture wall ms, until Kafka acknowledged the entry.
        self.unacked: dict[str, dict[str, int]] = {n: {} for n in bridge.stores}
        self._room = asyncio.Condition()
        # Set once the subtree's own topic was surveyed this term (``bridge.owntopic``):
        # nothing of it is published before, so that nothing this term publishes
        # can pass for what the topic kept or lost. A survey waits for its
        # partition's leader; the other subtrees publish meanwhile.
        self.surveyed: dict[str, asyncio.Event] = {n: asyncio.Event() for n in bridge.stores}
        self._own_ends: dict[str, dict[int, int]] = {}
        self._own_written = 0.0
        self._own_lock = asyncio.Lock()
        self._doomed: list[tuple[str, str]] = []  # (subtree, outbox path) acked, to delete
        self._deleter: asyncio.Task[None] | None = None
        self._own_writer: asyncio.Future[None] | None = None

    async def publisher(self) -> None:
        """Every subtree's publisher; one that fails ends them all (the term's end),
        its error raised as itself (fenced, a fatal Kafka error), not in a group."""
        try:
            async with asyncio.TaskGroup() as group:
                for name in self.queues:
                    group.create_task(self._publish_from(name))
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None

    async def _publish_from(self, name: str) -> None:
        queue = self.queues[name]
        await self.surveyed[name].wait()
        while True:
            batch = [await queue.get()]
            size = len(batch[0].records)
            while not queue.empty() and size < PUBLISH_MAX_RECORDS:
                nxt = queue.get_nowait()
                batch.append(nxt)
                size += len(nxt.records)
            await self.publish(batch)

    async def publish(self, units: list[Outgoing]) -> None:
        b = self.bridge
        records: list[tuple[str, bytes, bytes | None]] = []
        headers: dict[int, list[tuple[str, bytes]]] = {}
        for u in units:
            topic = b.topic(u.subtree, b.region)
            for k, v in u.records:
                if u.nulls:
                    headers[len(records)] = [(codec.NULL_HEADER, v)]
                records.append((topic, k, None if u.nulls else v))
        subtrees = sorted({u.subtree for u in units})
        ends = await b.retry(f"publish {', '.join(subtrees)}",
                             lambda: b.kafka.send_all(records, headers))
        for u in units:
            if u.done is not None:
                u.done.set()
            if u.reannounce:
                b.stats[f"reannounced:{u.subtree}"] += len(u.records)
                continue
            if u.outbox_path is None:
                b.stats["heartbeats_sent"] += 1
                continue
            self.queued[u.subtree] -= len(u.records)
            self.queued_bytes[u.subtree] -= u.size
            b.overflow.acked(u.subtree, u.size)
            self.unacked[u.subtree].pop(u.outbox_path, None)
            b.stats[f"{'nulls_published' if u.nulls else 'published'}:{u.subtree}"] += len(
                u.records)
        async with self._room:
            self._room.notify_all()  # a feeder may be waiting for the queue to shrink
        failpoints.hit(failpoints.AFTER_PUBLISH)
        paths = [(u.subtree, u.outbox_path) for u in units if u.outbox_path is not None]
        if paths:
            # Acknowledged entries go while the next batch is already published.
            self._doomed += paths
            if self._deleter is None or self._deleter.done():
                self._deleter = asyncio.ensure_future(self._delete_acked())
        for (topic, part), end in ends.items():
            subtree = next(u.subtree for u in units if b.topic(u.subtree, b.region) == topic)
            self._own_ends.setdefault(subtree, {})[part] = end
            b.inbound.own_acked(topic, part, end)
        # The own-topic position only bounds a replay after a wipe: once a
        # second is plenty (heartbeats write what is left when it goes idle).
        if time.monotonic() - self._own_written >= OWN_POSITION_SECONDS:
            self._write_own_aside()

    async def _delete_acked(self) -> None:
        while self._doomed:
            await asyncio.sleep(DELETE_GAP)  # let more acks gather
            entries, self._doomed = self._doomed, []
            for i in range(0, len(entries), DELETE_CHUNK):
                await self._delete(entries[i : i + DELETE_CHUNK])

    async def _delete(self, entries: list[tuple[str, str]]) -> None:
        b = self.bridge
        paths = [p for _, p in entries]
        with contextlib.suppress(BridgeError, asyncio.CancelledError):
            await b.retry("outbox delete", lambda: b.zk.delete_many(paths))
            for subtree in sorted({s for s, _ in entries}):
                done = [p for s, p in entries if s == subtree]
                await b.stores[subtree].outbox.drop_empty_buckets(done)

    async def settle(self) -> None:
        """Wait for outbox deletes in flight (end of term)."""
        if self._deleter is not None:
            await asyncio.gather(self._deleter, return_exceptions=True)
        if self._own_writer is not None:
            await asyncio.gather(self._own_writer, return_exceptions=True)

    async def store_own_position(self, subtree: str, parts: dict[int, int]) -> None:
        """Store the own topic's position the start-up replay reached.

        Never below what Kafka acknowledged: the publisher runs meanwhile and
        may already have stored a later one.
        """
        topic = self.bridge.topic(subtree, self.bridge.region)
        acked = self.bridge.inbound.own_max_end
        cur = self._own_ends.setdefault(subtree, {})
        for part, end in parts.items():
            cur[part] = max(cur.get(part, 0), end, acked.get((topic, part), 0))
        await self._write_own_positions()

    def _write_own_aside(self) -> None:
        """Store the own topic's acknowledged ends in the background, one write at a time.

        Aside because a ZooKeeper slowed by an fsync stall (2 s seen on this
        machine) held the publisher and the heartbeats up with the write, and
        peers saw this region's heartbeats go stale. A failure that ended the
        write (fenced, the term over) is raised here, by the next call.
        """
        w = self._own_writer
        if w is not None and not w.done():
            return
        if w is not None and not w.cancelled() and (exc := w.exception()) is not None:
            raise exc
        self._own_writer = (asyncio.ensure_future(self._write_own_positions())
                            if self._own_ends else None)

    async def _write_own_positions(self) -> None:
        async with self._own_lock:
            self._own_written = time.monotonic()
            ends, self._own_ends = self._own_ends, {}
            try:
                for subtree, parts in ends.items():
                    store = self.bridge.stores[subtree]
                    await self.bridge.retry(
                        "store publish position", lambda s=store, p=dict(parts):
                        s.positions.write(self.bridge.region, p))  # type: ignore[misc]
            except BaseException:
                for subtree, parts in ends.items():  # written again next time
                    cur = self._own_ends.setdefault(subtree, {})
                    for part, end in parts.items():
                        cur[part] = max(cur.get(part, 0), end)
                raise

    async def drain(self, deadline: float = 10.0) -> None:
        """On shutdown, publish what is queued; what is left stays in the outbox.

        Each subtree's on its own: one whose topic Kafka cannot take does not
        keep the others' from being acknowledged (and published again later)."""
        left: dict[str, int] = {}

        async def one(name: str) -> None:
            queue = self.queues[name]
            units: list[Outgoing] = []
            while not queue.empty():
                units.append(queue.get_nowait())
            units = [u for u in units if u.outbox_path is not None]
            if units and not self.surveyed[name].is_set():
                left[name] = len(units)
                raise BridgeError(f"{name}: its own topic had no leader since the start, "
                                  "so it was not surveyed and publishes nothing")
            if units:
                left[name] = len(units)
                await self.publish(units)
                del left[name]

        try:
            async with asyncio.timeout(deadline):
                results = await asyncio.gather(*(one(n) for n in self.queues),
                                               return_exceptions=True)
                await self.settle()
                if self._own_ends:
                    await self._write_own_positions()
            errors = [r for r in results if isinstance(r, BaseException)]
            for error in errors:
                if not isinstance(error, BridgeError):
                    raise error
            if errors:
                raise errors[0]
        except (TimeoutError, BridgeError) as exc:
            log.warning("drain_incomplete", left=sum(left.values()), subtrees=sorted(left),
                        error=str(exc) or type(exc).__name__,
                        hint="kept in the outbox; published at next start")
