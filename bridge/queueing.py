"""The publish queue: bounded in records and bytes, fed from the outbox when it spills.

Memory stays bounded however long Kafka is away: the queue holds at most
about ``QUEUE_RECORDS`` records, or ``QUEUE_BYTES`` bytes, of outbox entries
(whichever comes first, and one batch more). Beyond that (and at the
start of every term, for what earlier terms left) the subtree *spills*:
entries stay only in the outbox, and the feeder reads them back a chunk
at a time, in capture order, as the publisher makes room; meanwhile it
counts the outbox's entries, which the backlog gauge shows. Until it has
caught up with the outbox (its last pass runs under the subtree's lock, so
no capture slips in between), new captures are not queued directly: the
feeder reaches them in their place, so the order never changes.

Every record leaves stamped with this ensemble's incarnation (schema 1.2,
``inc``), so that a second ensemble publishing as the same region shows on
the topic. A capture stamps its events before writing the outbox entry, so
the entry holds each record's value exactly as published (encoded once).
What an entry holds without this ensemble's current stamp (written by an
older release, or before a restore gave the ensemble a new marker) is
stamped again here (``enqueue_pending``): the outbox lives in the ensemble,
so whatever it holds belongs to the ensemble's current incarnation.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

import structlog

from bridge import codec, statecodec
from bridge.clock import hlc_to_ms
from bridge.errors import BridgeError
from bridge.model import Event
from bridge.publishing import Outgoing, Publishing

if TYPE_CHECKING:
    from bridge.engine import Bridge
    from bridge.store import SubtreeStore

log = structlog.get_logger("bridge.queueing")

# Records of outbox entries the queue holds before the subtree spills (see the
# module docstring). The environment variable exists for tests.
QUEUE_RECORDS = int(os.environ.get("ZKBRIDGE_QUEUE_RECORDS") or 20_000)
# Large values reach the record bound late: 20,000 records of 500 KB are 10 GB.
QUEUE_BYTES = int(os.environ.get("ZKBRIDGE_QUEUE_BYTES") or 64 << 20)
FEED_CHUNK = 500  # a feeder pass that found fewer entries is near the end: the last pass follows
# Outbox entries read at a time. A start-up capture's entries hold up to a
# thousand events (700 KB) each: reading 500 at once, as the feeder first
# did, ran a 256 MB ZooKeeper out of heap on `scripts/bench --large`.
FEED_GROUP = 16
# While spilled, the outbox's entries are counted this often (seconds): the
# backlog gauge then shows them, not only the part queued (a few hundred
# records when values are large and the byte bound holds the queue).
COUNT_EVERY = 5.0
START = (-2, "")  # an outbox key before every entry


class Queueing(Publishing):
    """The publisher's queue of outbox entries (``Outbound`` adds capture and heartbeats)."""

    def __init__(self, bridge: Bridge) -> None:
        super().__init__(bridge)
        # Spilled subtrees: their outbox entries are queued by the feeder only,
        # from the entry after ``cursor`` (the last one queued).
        self.draining: dict[str, bool] = dict.fromkeys(bridge.stores, False)
        self.cursor: dict[str, tuple[int, str]] = dict.fromkeys(bridge.stores, START)
        self.spilled: dict[str, asyncio.Event] = {n: asyncio.Event() for n in bridge.stores}
        # While spilled: entries in the outbox when last counted, and when (monotonic).
        self.in_outbox: dict[str, int] = dict.fromkeys(bridge.stores, 0)
        self._counted: dict[str, float] = dict.fromkeys(bridge.stores, 0.0)

    def reset(self) -> None:
        """At a term's end: the next term reads the outbox back from the start."""
        self.queues = {n: asyncio.Queue() for n in self.queues}
        for name in self.queued:
            self.queued[name] = self.queued_bytes[name] = self.in_outbox[name] = 0
            self.unacked[name].clear()
            self.draining[name] = False
            self.cursor[name] = START
            self.spilled[name].clear()

    def stamp(self, event: Event) -> bytes:
        """The record value of ``event`` with this ensemble's incarnation."""
        return codec.encode(replace(event, inc=self.bridge.incarnation))

    def enqueue(self, subtree: str, outbox_path: str | None,
                records: list[tuple[bytes, bytes]], *, reannounce: bool = False,
                done: asyncio.Event | None = None, captured_ms: int = 0,
                nulls: bool = False, fed: bool = False) -> None:
        size = 0 if outbox_path is None else sum(len(k) + len(v) for k, v in records)
        if outbox_path is not None and not fed:
            self.bridge.overflow.written(subtree, size)
            if self.draining[subtree]:
                return  # in the outbox: the feeder queues it in its place
            if self.full(subtree):
                self.spill(subtree)
                return
        unit = Outgoing(subtree, tuple(records), outbox_path, reannounce, done,
                        captured_ms or int(time.time() * 1000), nulls, size)
        self.queues[subtree].put_nowait(unit)
        if outbox_path is not None:
            self.queued[subtree] += len(records)
            self.queued_bytes[subtree] += size
            self.unacked[subtree][outbox_path] = unit.captured_ms
            self.cursor[subtree] = self.bridge.stores[subtree].outbox.key(outbox_path)

    def full(self, subtree: str, part: int = 1) -> bool:
        """Whether ``subtree``'s queued outbox entries reach ``1/part`` of either bound."""
        return (self.queued[subtree] * part >= QUEUE_RECORDS
                or self.queued_bytes[subtree] * part >= QUEUE_BYTES)

    def recheck_outbox(self, store: SubtreeStore) -> None:
        """After a lost answer to an outbox write: let the feeder queue what is there.

        The write may have committed although its caller retried and found
        nothing left to do; the entry is then in the outbox only. The feeder
        reads everything after the last queued entry, in order (found by
        chaos seed 967338: a capture ``multi`` lost its answer to a
        ZooKeeper majority loss, committed, and its entry was never published).
        Call it before queueing the retry's own entries, under the subtree's lock.
        """
        if store.outbox.unsure:
            store.outbox.unsure = False
            self.spill(store.layout.name, why="an outbox write's answer was lost")

    def spill(self, subtree: str, *, start: bool = False, why: str | None = None) -> None:
        """Queue ``subtree``'s outbox entries from the outbox only (feeder), until caught up.

        ``start``: a new term, whose first entries are whatever earlier terms left.
        """
        if start:
            self.cursor[subtree] = START
        elif why is not None:
            log.info("outbox_reread", subtree=subtree, reason=why)
        elif not self.draining[subtree]:
            log.warning("outbox_spilled", subtree=subtree, queued=self.queued[subtree],
                        queued_bytes=self.queued_bytes[subtree],
                        hint="Kafka is slow or away; further changes wait in the outbox "
                             "and are read back in order as publishing catches up")
        self.draining[subtree] = True
        self.spilled[subtree].set()

    async def feeder(self, name: str) -> None:
        """Queue a spilled subtree's outbox entries, in order, as the publisher makes room."""
        while True:
            await self.spilled[name].wait()
            queued = 0
            while True:
                fed = await self._feed_pass(name, wait=True)
                queued += fed
                if fed < FEED_CHUNK:
                    break
            # The last pass under the lock: no capture (or collection) can
            # write an entry between it and queueing directly again.
            async with self.bridge.locks[name]:
                queued += await self._feed_pass(name, wait=False)
                self.draining[name] = False
                self.spilled[name].clear()
                self.in_outbox[name] = 0
            log.info("outbox_caught_up", subtree=name, entries=queued)

    async def _feed_pass(self, name: str, *, wait: bool) -> int:
        """Queue every outbox entry after the cursor; returns how many."""
        b = self.bridge
        store = b.stores[name]
        fed = 0
        for index, directory in await b.retry("list outbox", store.outbox.dirs):
            if index < self.cursor[name][0]:
                continue

            async def names(i: int = index, d: str = directory) -> list[str]:
                return await store.outbox.names(i, d)

            after = [n for n in await b.retry("list outbox", names)
                     if (index, n) > self.cursor[name]]
            for i in range(0, len(after), FEED_GROUP):
                if wait:
                    await self._room_for(name)
                part = after[i : i + FEED_GROUP]
                paths = [f"{directory}/{n}" for n in part]

                async def read(p: list[str] = paths) -> list[tuple[str, list[bytes]]]:
                    return await store.outbox.read(p)

                self.enqueue_pending(name, await b.retry("read outbox", read))
                # Past the chunk even if entries vanished meanwhile (published).
                self.cursor[name] = max(self.cursor[name], (index, part[-1]))
                fed += len(part)
        return fed

    async def _room_for(self, name: str) -> None:
        """Wait until the queue is below half of both bounds, counting the outbox meanwhile."""
        while True:
            if time.monotonic() - self._counted[name] >= COUNT_EVERY:
                self._counted[name] = time.monotonic()
                self.in_outbox[name] = await self.bridge.retry(
                    "count outbox", self.bridge.stores[name].outbox.depth)
            async with self._room:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._room.wait_for(lambda: not self.full(name, part=2)), COUNT_EVERY)
                    return

    def backlog(self, subtree: str) -> int:
        """Captured changes not yet acknowledged by Kafka: the queued records, and
        while spilled at least the outbox's entries (each holds one or more)."""
        queued = self.queued[subtree]
        return max(queued, self.in_outbox[subtree]) if self.draining[subtree] else queued

    def oldest_age(self, subtree: str) -> float:
        """Seconds since the oldest capture not yet acknowledged by Kafka (0: none)."""
        pending = self.unacked[subtree]
        if not pending:
            return 0.0
        return max(0.0, time.time() - min(pending.values()) / 1000)

    def enqueue_nulls(self, subtree: str, outbox_path: str, events: Iterable[Event],
                      captured_ms: int = 0) -> None:
        """Null-value records for collected tombstones, behind everything queued before."""
        self.enqueue(subtree, outbox_path, [(e.key, self.stamp(e)) for e in events],
                     captured_ms=captured_ms, nulls=True)

    def enqueue_pending(self, subtree: str, entries: list[tuple[str, list[bytes]]]) -> None:
        """Outbox entries read back (the feeder's), in their order."""
        for path, payloads in entries:
            if payloads and all(statecodec.is_null_entry(p) for p in payloads):
                with contextlib.suppress(BridgeError):
                    events = [codec.decode(p) for p in payloads]
                    self.enqueue(subtree, path, [(e.key, self.stamp(e)) for e in events],
                                 nulls=True, fed=True)
                    continue
            records = []
            captured = 0
            for payload in payloads:
                try:
                    event = codec.decode(payload)
                except BridgeError:
                    records.append((b"/", payload))
                    continue
                # Captures stamp their events; older entries are stamped here.
                records.append((event.key, payload if event.inc == self.bridge.incarnation
                                else self.stamp(event)))
                captured = captured or hlc_to_ms(event.batch or event.ts)
            self.enqueue(subtree, path, records, captured_ms=captured, fed=True)
