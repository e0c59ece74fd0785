"""Capture: a closed batch of local changes becomes new metadata for every path in it
plus one outbox entry holding the whole batch, in one ``multi`` behind the epoch check.

Ordering invariant: a batch holds every change to the subtree up to the read
reply that closed it (``bridge.closure``), its events sorted by the zxid that
made them; a batch too large for one ``multi`` is cut into pieces written in
that order, each published as it commits. Callers never run a capture and an
apply of one subtree at the same time (the subtree's lock).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping, Sequence

import structlog

from bridge import batching, closure, codec, failpoints, statecodec
from bridge.acl import HOLD
from bridge.errors import NoPermission, VersionConflict, ZooKeeperError
from bridge.layout import Change, ancestors, classify, parent
from bridge.model import Event, NodeMeta, Op, VectorClock, content_hash
from bridge.plan import CapturedBatch, MetaEntry, NeedRead, Plan, View, view_of
from bridge.storecore import RETRIES, StoreCore
from bridge.zk import Delete, Node

log = structlog.get_logger("bridge.capture")

CLOSURE_ROUNDS = 50
# A large capture's ACL reads: changes per group (one piece's worth), and
# groups read ahead of the piece being written.
ACL_GROUP = batching.MAX_BATCH_EVENTS
ACL_GROUPS_AHEAD = 4


class Capturing(StoreCore):
    """The capture half of a subtree's store (``SubtreeStore`` adds apply and the rest)."""

    async def capture(self, rels: Iterable[str],
                      notified: Callable[[], Mapping[str, tuple[int, int] | None]] = dict,
                      on_batch: Callable[[CapturedBatch], None] | None = None,
                      unbroken: Callable[[], None] = lambda: None,
                      prefetched: Mapping[str, tuple[Node, int]] | None = None,
                      ) -> list[CapturedBatch]:
        """Announce the local changes among ``rels``: a closed batch (or several, if large).

        The batch is the subtree's state at one read reply, holding every
        change up to it (``bridge.closure``). ``notified()`` says which paths
        were notified since it was last called, each with the frames of its
        first and latest notification. The paths are read (several multiReads
        when many), then only what the latest reply still lacks, until some
        reply closes a batch (a bounded fixpoint). Paths notified after that
        reply, or not in the batch, go to the next batch (``requeue``).

        ``on_batch`` gets each batch as soon as its ``multi`` committed, so a
        large capture (a start-up one) is published while the rest is written;
        the batches are returned only without it. ``unbroken`` runs before each
        commit and raises if the notifications the batch relies on may have a gap.
        ``prefetched``: paths already read on this session (by a scan, with the
        frame of each reply), not notified since: not read again.
        """
        await self._settle()
        taken = {r for r in rels if self._replicable(r)}
        reads: dict[str, Node | NoPermission | None] = {}
        at: dict[str, int] = {}  # path → frame of the reply that read it
        seen: dict[str, list[tuple[int, int] | None]] = {}  # notifications, by call of notified()
        snapshots: list[int] = []  # the last reply frame of each read
        for r, (node, frame) in (prefetched or {}).items():
            if r in taken:
                reads[r], at[r] = node, frame
        if at:
            snapshots.append(max(at.values()))
        todo = taken - reads.keys()
        rounds = 0
        for _ in range(RETRIES + CLOSURE_ROUNDS):
            if todo:
                more, frames = await self._read_framed(todo)
                reads.update(more)
                at.update(frames)
                snapshots.append(max(frames.values()))
            for r, f in notified().items():
                if self._replicable(r):
                    seen.setdefault(r, []).append(f)
            found = closure.close(taken, at, seen, snapshots)
            if found.snapshot is None and rounds < CLOSURE_ROUNDS:
                rounds += 1
                todo = set(found.unread)
                continue
            if found.snapshot is None:
                log.warning("batch_not_closed", subtree=self.layout.name, rounds=rounds,
                            hint="the application writes new paths faster than one read")
                found = closure.Closure(max(snapshots, default=0), frozenset(at), frozenset())
            again = closure.later(found, taken, seen)
            if again:
                self.requeue(again)
            todo = set()
            try:
                batch = reads if len(found.batch) == len(reads) else {
                    r: reads[r] for r in found.batch}  # (every batch path was read)
                return await self._capture(batch, on_batch, unbroken)
            except NeedRead as more_rels:
                taken |= more_rels.rels
                todo = set(more_rels.rels)
            except VersionConflict:
                await self.refresh_meta(set(reads) | {a for r in reads for a in ancestors(r)})
        raise VersionConflict(f"capture in {self.layout.name}: kept changing, will retry")

    async def _capture(self, reads: dict[str, Node | NoPermission | None],
                       on_batch: Callable[[CapturedBatch], None] | None = None,
                       unbroken: Callable[[], None] = lambda: None,
                       ) -> list[CapturedBatch]:
        changes: list[tuple[tuple[int, int, int, str], Op, str, Node | None]] = []
        cleanup: list[str] = []  # tombstoned placeholders left empty by local deletes
        holders: set[str] = set()  # tombstoned placeholders above a gone znode, to read
        for rel, node in reads.items():
            if isinstance(node, NoPermission):
                self.hold(rel, "read")
                continue
            if self.held_back.pop(rel, None) == "read":
                log.info("znode_released", subtree=self.layout.name, path=rel)
            if self.pre_join(rel, node):
                continue  # published, if no peer has it, once the subtree has joined
            meta = self.meta(rel)
            change = Change.DELETE if self.join_gone(rel, node) else classify(node, meta)
            if change is Change.MAYBE_PLACEHOLDER:
                assert node is not None and meta is not None
                live = self.live_children(rel)
                missing = [c for c in live if c not in reads]
                if missing:
                    raise NeedRead(missing)
                if live or left_over(node, meta):
                    change = Change.NONE
                    cleanup.append(rel)
                else:
                    change = Change.PUT
            elif node is None and change is Change.NONE and self._holds(rel):
                cleanup.append(rel)  # the application deleted a placeholder: unmarked
            elif node is None and change is Change.NONE and (
                    p := parent(rel)) != "/" and p not in reads and self._holds(p):
                # An ephemeral znode (never in the metadata) is gone: the
                # placeholder it kept may now be empty. (An excluded one's
                # going is not captured; the next audit finds that.)
                holders.add(p)
            if change is Change.PUT:
                assert node is not None
                if len(node.data) > self.max_data_bytes:
                    self._report_oversized(rel, len(node.data))
                    continue
                changes.append((batching.order_key(Op.PUT, rel, node.stat.mzxid), Op.PUT, rel,
                                node))
            elif change is Change.DELETE:
                changes.append((batching.order_key(Op.DELETE, rel, 0), Op.DELETE, rel, None))
            if change is not Change.PUT:
                self.oversized.pop(rel, None)
        if holders:
            raise NeedRead(holders)
        if not changes and not cleanup:
            return []
        changes.sort(key=lambda c: c[0])
        deleted = {rel for _, op, rel, _ in changes if op is Op.DELETE}
        for rel in deleted:
            self.acl.forget(rel)
        parents = {parent(r) for r in deleted | set(cleanup)} - {"/"}
        need = [p for p in parents if p not in reads and (m := self.meta(p)) is not None
                and m.deleted]
        if need:
            raise NeedRead(need)
        # Only local deletes need them (placeholders left empty): a start-up
        # capture of 100,000 puts would build as many for nothing.
        views = {r: view_of(n) for r, n in reads.items()
                 if not isinstance(n, NoPermission)} if deleted or cleanup else {}
        pieces = self._pieces(changes)
        out: list[CapturedBatch] = []
        try:
            nxt = await anext(pieces, None)
            if nxt is None:
                # Nothing to announce. Placeholders whose last children were
                # never replicated go now; one whose child's delete is still
                # to announce goes with the batch that announces it.
                await self._remove_placeholders(
                    views, [r for r in cleanup if not self.live_children(r)])
                return []

            def prepare(part: list[Event], before: Mapping[str, MetaEntry]
                        ) -> tuple[Plan, list[Event], list[bytes]]:
                plan = Plan()
                for e in part:
                    self._meta_op(plan, e.path, NodeMeta(
                        vc=e.vc, data_hash=content_hash(e.data), deleted=e.op is Op.DELETE,
                        writer=self.region, ts=e.ts), before)
                part = batching.stamp(part, self.clock.now())
                return plan, part, [codec.encode(e) for e in part]

            ahead = prepare(nxt, {})
            # Only the last piece carries the cleanup of local deletes. With one
            # due, each piece waits for the next (its ACL reads) to know whether
            # it is the last; without, it goes at once, and the next is read and
            # built while its multi is in flight.
            last_matters = bool(deleted or cleanup)
            nxt = await anext(pieces, None) if last_matters else None
            split = False
            while True:
                plan, part, enc = ahead
                if last_matters and nxt is None:
                    # Over the committed metadata: every earlier piece has committed.
                    self._cleanup_ops(plan, views, [*deleted, *cleanup], cleanup)
                marker = self.overflow
                entry = marker is None
                if marker is None:
                    await self.outbox.entry_ops(plan.ops, statecodec.encode_outbox(enc))
                elif not self.overflow_marked:
                    # Before the first change that skips the outbox: a restart
                    # then knows that what changed must be published again.
                    await self.zk.ensure_path(marker)
                    self.overflow_marked = True
                unbroken()
                sending = asyncio.ensure_future(self._multi(plan))
                failed: Exception | None = None  # raised once this piece is recorded
                try:
                    await asyncio.sleep(0)  # sent: the next piece is built meanwhile
                    if not last_matters:
                        try:
                            nxt = await anext(pieces, None)
                        except Exception as exc:
                            failed, nxt = exc, None
                    if nxt is not None:
                        if not split:
                            split = True
                            log.info("batch_split", subtree=self.layout.name,
                                     events=len(changes))
                        ahead = prepare(nxt, plan.metas)
                finally:
                    try:
                        results, _ = await sending
                        failpoints.hit(failpoints.CAPTURE_COMMITTED)
                    except ZooKeeperError:
                        self.outbox.answer_lost(held_entry=entry)
                        raise
                # Recorded before anything else may fail: an entry that committed
                # and was not queued would be published out of order.
                self._commit(plan)
                created = str(results[-1]) if entry else None
                if created is not None:
                    self.outbox.written(created)
                batch = CapturedBatch(tuple(part), tuple(enc), created)
                for e in part:
                    self.oversized.pop(e.path, None)
                if on_batch is None:
                    out.append(batch)
                else:
                    # Handed on, not kept: a start-up capture's batches are
                    # published (and freed) while the rest is still written.
                    on_batch(batch)
                if failed is not None:
                    raise failed
                if nxt is None:
                    return out
                if last_matters:
                    nxt = await anext(pieces, None)
        finally:
            await pieces.aclose()

    def _holds(self, rel: str) -> bool:
        meta = self.meta(rel)
        return meta is not None and meta.deleted and meta.placeholder

    async def _remove_placeholders(self, views: dict[str, View | None],
                                   cleanup: list[str]) -> None:
        """Delete tombstoned placeholders with no child left, and such ancestors.

        Their tombstones stay deleted, only no longer marked as placeholders:
        nothing to publish, no outbox entry.
        """
        plan = Plan()
        self._cleanup_ops(plan, views, cleanup, cleanup)
        if not plan.ops:
            return
        await self._multi(plan)
        self._commit(plan)
        removed = [self.layout.rel_of(op.path) for op in plan.ops if isinstance(op, Delete)]
        if removed:
            log.info("placeholder_removed", subtree=self.layout.name, paths=removed)

    async def _pieces(self, changes: Sequence[tuple[object, Op, str, Node | None]]
                      ) -> AsyncGenerator[list[Event], None]:
        """The events of ``changes`` (in order), cut into pieces within a ``multi``'s bounds.

        A large capture reads their ACLs ``ACL_GROUP`` changes at a time, a
        few groups ahead of the piece being written, on ``acl_reader``.
        Reading every ACL before the first piece kept the receiving regions
        idle for most of a start-up capture; on the capture's own session a
        read queued behind a piece's ``multi`` waits for its commit (tried),
        hence a second one. A small capture, or one without that session,
        reads them all first on its own session, as one group. A capture
        whose ACLs are all known reads none: it goes a group at a time on its
        own session, without the second one's ``sync`` (under a writer's
        burst that round trip waited behind the writes, up to 100 ms).
        """
        reader, group = self.zk, max(len(changes), 1)
        if len(changes) > ACL_GROUP:
            if self.acl.all_known((rel, node.stat.czxid, node.stat.aversion)
                                  for _, _, rel, node in changes if node is not None):
                group = ACL_GROUP
            elif self.acl_reader and self.acl_reader.connected:
                reader, group = self.acl_reader, ACL_GROUP
                # Its server may lag the one that answered the capture's reads: a
                # znode of the batch must not look gone to it.
                await reader.sync(self.layout.mount)
        groups = [changes[i:i + group] for i in range(0, len(changes), group)]
        reading: deque[asyncio.Future[list[tuple[str, ...] | str | None]]] = deque()
        started = 0

        async def read(part: Sequence[tuple[object, Op, str, Node | None]]
                       ) -> list[tuple[str, ...] | str | None]:
            got = await self.acl.announce_many(reader, [
                (self.layout.znode(rel), rel, node.stat.czxid, node.stat.aversion)
                for _, _, rel, node in part if node is not None])
            failpoints.hit(failpoints.ACL_READ)
            return got

        try:
            for part in groups:
                while started < len(groups) and len(reading) < ACL_GROUPS_AHEAD:
                    reading.append(asyncio.ensure_future(read(groups[started])))
                    started += 1
                carried = iter(await reading.popleft())
                events = self._events(part, carried)
                for chunk in batching.split([batching.size_estimate(e) for e in events]):
                    yield [events[i] for i in chunk]
        finally:
            for task in reading:
                task.cancel()
            await asyncio.gather(*reading, return_exceptions=True)

    def _events(self, changes: Sequence[tuple[object, Op, str, Node | None]],
                carried: Iterator[tuple[str, ...] | str | None]) -> list[Event]:
        """The events announcing ``changes``; ``carried``: each put's ACL, in order."""
        events: list[Event] = []
        for _, op, rel, node in changes:
            acl = next(carried) if node is not None else None
            if acl == HOLD:
                # Narrower than `acl: open` may publish: never widened elsewhere.
                self.hold(rel, HOLD)
                continue
            if self.held_back.get(rel) == HOLD:
                del self.held_back[rel]
            prev = self.meta(rel)
            # A path without metadata may have had a tombstone collected here that
            # another region still holds: start above every collected counter.
            vc = (prev.vc.incremented(self.region) if prev
                  else VectorClock.of({self.region: self.gc_floor + 1}))
            ts = self.clock.now(after=prev.ts if prev else 0)
            events.append(Event(origin=self.region, subtree=self.layout.name, path=rel, op=op,
                                vc=vc, ts=ts, writer=self.region,
                                data=node.data if node is not None else None,
                                acl=acl if isinstance(acl, tuple) else None,
                                inc=self.incarnation))
        return events


def left_over(node: Node, meta: NodeMeta) -> bool:
    """Is this empty, childless znode over a tombstone the placeholder the bridge kept?

    Its last children were never in the metadata (an application's ephemeral
    znodes, excluded paths), so only its identity tells it from a znode an
    application deleted and created again, which is a new write.
    """
    return meta.placeholder and meta.placeholder_czxid == node.stat.czxid != 0
