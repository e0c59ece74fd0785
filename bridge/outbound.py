"""The outbound pipeline: watch → closed batch → outbox → publish, in order.

This module takes changes from the watches to the publisher's queue;
``bridge.queueing`` bounds the queue and feeds it from the outbox;
``bridge.publishing`` sends the queue to Kafka and deletes what was acked.

Ordering invariant: for each subtree, batches are captured one at a time
(under the subtree's lock, which apply shares), committed to the outbox in
that order, and published in that order by a single publisher; heartbeats go
through the same queue so no other record lands inside a batch. A batch
leaves the outbox only after Kafka acknowledged every record of it, so a
restart republishes whole batches, in order, never a part of one.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import structlog

from bridge import codec, failpoints
from bridge.errors import NotificationGap
from bridge.model import Event, Op, VectorClock
from bridge.queueing import Queueing
from bridge.store import CapturedBatch, SubtreeStore
from bridge.zk import Node

if TYPE_CHECKING:
    from bridge.engine import Bridge

log = structlog.get_logger("bridge.outbound")

CAPTURE_GATHER = 0.005


class Outbound(Queueing):
    def __init__(self, bridge: Bridge) -> None:
        super().__init__(bridge)
        self.dirty: dict[str, set[str]] = {n: set() for n in bridge.stores}
        # rel → frame of its latest tree notification, for rels in ``dirty`` marked
        # since it was last taken (see ``settled``); absent: never settled by an apply.
        # (first, latest) frame, so ``take_framed`` and ``settled`` each see theirs.
        self.frames: dict[str, dict[str, tuple[int, int]]] = {n: {} for n in bridge.stores}
        for name, store in bridge.stores.items():
            store.settled = functools.partial(self.settled, name)
        self.wake: dict[str, asyncio.Event] = {n: asyncio.Event() for n in bridge.stores}
        self.capturing: dict[str, int] = dict.fromkeys(bridge.stores, 0)
        self._beating: dict[str, asyncio.Event] = {}  # the last heartbeat's ack, per subtree
        # Set once this term's publisher runs (the own-topic checks passed). The
        # start-up scan reads meanwhile, and captures only then: each batch is
        # published as it commits, none waits in the queue for the checks.
        self.publishing = asyncio.Event()

    def reset(self) -> None:
        super().reset()
        self.publishing.clear()
        for ready in self.surveyed.values():
            ready.clear()
        w, self._own_writer = self._own_writer, None
        if w is not None:
            w.cancel()  # the next leader reads the position back
            if w.done() and not w.cancelled():
                w.exception()  # retrieved: it failed with the term
        self._beating.clear()
        for name in self.dirty:
            self.dirty[name].clear()
            self.frames[name].clear()

    # -- capture -------------------------------------------------------------
    def mark(self, subtree: str, rel: str, frame: int | None = None) -> None:
        """A watch says ``rel`` may have changed (called on the event loop).

        ``frame``: the notification's place in the session's order (tree watch only).
        """
        dirty, frames = self.dirty[subtree], self.frames[subtree]
        if frame is None:
            frames.pop(rel, None)
        elif rel not in dirty:
            frames[rel] = (frame, frame)
        elif rel in frames:
            frames[rel] = (frames[rel][0], frame)
        dirty.add(rel)
        self.wake[subtree].set()

    def take(self, subtree: str) -> set[str]:
        """The pending paths, now the caller's to capture."""
        return set(self.take_framed(subtree))

    def take_framed(self, subtree: str) -> dict[str, tuple[int, int] | None]:
        """The pending paths, each with the frames of its first and latest notification
        since it was last taken (None: unknown, or not notified by the tree watch)."""
        taken, self.dirty[subtree] = self.dirty[subtree], set()
        frames, self.frames[subtree] = self.frames[subtree], {}
        return {rel: frames.get(rel) for rel in taken}

    def restore(self, subtree: str, rels: set[str]) -> None:
        """Give back paths taken but not captured; an apply never settles these."""
        for rel in rels:
            self.frames[subtree].pop(rel, None)
        self.dirty[subtree] |= rels

    def settled(self, subtree: str, rels: set[str], frame: int) -> None:
        """An apply's ``multi`` wrote ``rels`` and was answered at ``frame``.

        The notifications of these znodes numbered below ``frame`` are of that
        write or of changes it accounted for (``SubtreeStore.written``):
        reading them back would find nothing to announce, and would cost the
        receiver a read and its lock after every batch it applies.
        """
        dirty, frames = self.dirty[subtree], self.frames[subtree]
        done = [r for r in rels if r in dirty and frames.get(r, (frame, frame))[1] < frame]
        for rel in done:
            dirty.discard(rel)
            del frames[rel]
        if done:
            self.bridge.stats[f"own_notifications_settled:{subtree}"] += len(done)

    async def capture_loop(self, name: str) -> None:
        while True:
            await self.wake[name].wait()
            # Writes an application makes a few milliseconds apart share one
            # batch: each batch costs a read, a multi and its share of deletes.
            await asyncio.sleep(CAPTURE_GATHER)
            self.wake[name].clear()
            async with self.bridge.locks[name]:
                await self.flush(name)

    async def flush(self, name: str, extra: set[str] | None = None,
                    since: int | None = None,
                    prefetched: Mapping[str, tuple[Node, int]] | None = None) -> None:
        """Capture every pending local change of ``name`` (caller holds its lock).

        A batch is closed only over changes that were all notified, so none
        commits if the connection dropped since ``since`` (a scan's start)
        or since this capture began: changes made while it was away reached
        no watch. After a drop, the first capture is a rescan's, which finds
        them (``Watching.ensure_seen``); a capture the drop interrupted leaves
        its paths pending for it.

        ``prefetched``: a scan's reads of ``extra`` (``ScanResult.reads``), used
        by the first attempt for the paths not notified since the scan began.
        """
        b = self.bridge
        if since is None:
            await b.watching.ensure_seen(name)
            since = b.watching.session_gen
        store = b.stores[name]
        pending = self.take(name)
        rels = pending | (extra or set())
        if not rels:
            return
        taken: set[str] = set(rels)
        # A path notified since the scan read it may have changed after that read
        # (a taken notification's frame is not kept: any pending one counts).
        fresh = [{r: v for r, v in (prefetched or {}).items() if r not in pending}]

        def notified() -> dict[str, tuple[int, int] | None]:  # once per read of the capture
            self.bridge.stats[f"capture_reads:{name}"] += 1
            new = self.take_framed(name)
            taken.update(new)
            return new

        def requeue(left: set[str]) -> None:
            self.restore(name, left)
            self.wake[name].set()

        def committed(batch: CapturedBatch) -> None:
            # A batch is queued the moment it commits: a start-up capture of
            # thousands of znodes is published while it is still being written.
            self.recheck_outbox(store)
            self.captured(store, batch)

        def unbroken() -> None:  # before each commit
            if b.watching.session_gen != since:
                raise NotificationGap(f"capture {name}: the ZooKeeper connection dropped")

        store.requeue = requeue
        self.capturing[name] += 1  # from before its first stamp until its batches are queued
        try:
            try:
                # Only the first attempt: a retry's notifications start after the scan's.
                await b.retry(f"capture {name}", lambda: store.capture(
                    rels, notified, committed, unbroken, fresh.pop() if fresh else None))
            except BaseException as exc:
                self.restore(name, taken)  # not captured: the next attempt reads them again
                if isinstance(exc, NotificationGap):
                    b.stats[f"captures_deferred:{name}"] += 1
                    self.recheck_outbox(store)  # a commit whose answer the drop took
                    return
                raise
            await self.bridge.watching.after_capture(name, taken)
            self.recheck_outbox(store)
        finally:
            self.capturing[name] -= 1

    def captured(self, store: SubtreeStore, batch: CapturedBatch) -> None:
        name = store.layout.name
        self.bridge.stats[f"captured:{name}"] += len(batch.events)
        failpoints.hit(failpoints.AFTER_OUTBOX_WRITE)
        if batch.outbox_path is None:
            # The outbox is full (bridge.overflow): published by the re-announce.
            self.bridge.stats[f"captured_without_outbox:{name}"] += len(batch.events)
            return
        self.enqueue(name, batch.outbox_path, [
            (e.key, p if e.inc == self.bridge.incarnation else self.stamp(e))
            for e, p in zip(batch.events, batch.payloads, strict=True)])

    # -- heartbeats --------------------------------------------------------
    async def heartbeats(self, interval: Callable[[], float],
                         sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        b = self.bridge
        while True:
            for name in b.stores:
                # Also behind a backlog: receivers judge liveness by heartbeats
                # alone. But one at a time: a publisher that cannot reach Kafka
                # is not handed one more every second.
                last = self._beating.get(name)
                if last is not None and not last.is_set():
                    continue
                # Causal stability counts on every event stamped below a heartbeat
                # that carries `applied` being ahead of it on the topic: true when
                # no capture is between stamping its events and queueing them.
                # Otherwise the heartbeat only tells liveness (receivers do not
                # count one without `applied`). Not the subtree's lock: a
                # heartbeat must not wait behind a long capture or apply.
                # A spilled subtree has captures still in the outbox, stamped
                # below this heartbeat and not ahead of it: liveness only.
                # So has one whose outbox overflowed, or that re-announces its
                # state (after an overflow or after topic loss), until that is done.
                applied = (None if self.capturing[name] or self.draining[name]
                           or b.overflow.unannounced(name)
                           else b.streams.applied_report(name))
                hb = Event(origin=b.region, subtree=name, path="/", op=Op.HEARTBEAT,
                           vc=VectorClock(), ts=b.clock.now(), writer=b.region,
                           inc=b.incarnation, applied=applied)
                # Through the publisher's queue: never inside another batch's records.
                self._beating[name] = acked = asyncio.Event()
                self.enqueue(name, None, [(hb.key, codec.encode(hb))], done=acked)
            self._write_own_aside()  # what the publisher left when it went idle
            await sleep(interval())
