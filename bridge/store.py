"""One subtree's replication state in the region's own ensemble, and its two atomic writes.

Holds the layout (metadata mirror, outbox, positions, conflicts under the
state path; the outbox and the positions have modules of their own,
``bridge.outbox`` and ``bridge.positions``), an in-memory copy of the
metadata for the leadership term (the leader is its only writer, so it is
read once, by the start-up scan), and the two writes that matter, each one
``multi`` behind the epoch check:

* capture: a closed batch of local changes becomes new metadata for every path
  in it plus one outbox entry holding the whole batch;
* apply: a complete batch of a peer's events becomes new znode content, new
  metadata and the peer's new position, together.

Callers never run a capture and an apply of one subtree at the same time
(the pipelines share one lock per subtree). Version checks in every multi
catch what slips past (an application writing meanwhile): the metadata read
again, the batch is planned afresh, never reordered.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import structlog

from bridge import batching, closure, codec, failpoints, tombstones
from bridge.acl import HOLD, AclPolicy
from bridge.clock import HybridClock, Order, compare
from bridge.errors import CodecError, NoPermission, VersionConflict, ZooKeeperError
from bridge.layout import Change, Layout, ancestors, classify, is_excluded, join, parent
from bridge.model import Event, NodeMeta, Op, VectorClock, content_hash
from bridge.outbox import Outbox
from bridge.plan import (
    Applied,
    CapturedBatch,
    LocalChanges,
    MetaEntry,
    NeedRead,
    Outcome,
    Plan,
    Planner,
    view_of,
)
from bridge.positions import Positions
from bridge.zk import Create, Delete, Node, SetData, ZooKeeper, gather_limited

__all__ = ["Applied", "CapturedBatch", "Change", "Collected", "Layout", "LocalChanges", "MetaEntry",
           "Outcome", "SubtreeStore", "classify", "is_excluded", "join"]

log = structlog.get_logger("bridge.store")

RETRIES = 20
CLOSURE_ROUNDS = 50
# Znodes per multiRead, and multiReads in flight: a reply holds each znode's
# data (up to 1 MB each), so neither side buffers more than a few chunks.
# The environment variable exists for tests of reads that take several replies.
READ_CHUNK = int(os.environ.get("ZKBRIDGE_READ_CHUNK") or 500)
READS_IN_FLIGHT = 4
GC_CHUNK = 500  # metadata deletes per collection multi, well under jute.maxbuffer
# A large capture's ACL reads: changes per group (one piece's worth), and
# groups read ahead of the piece being written.
ACL_GROUP = batching.MAX_BATCH_EVENTS
ACL_GROUPS_AHEAD = 4


@dataclass(frozen=True, slots=True)
class Collected:
    """What a collection did: metadata removed, and the outbox entries of its nulls."""

    removed: tuple[str, ...]
    nulls: tuple[CapturedBatch, ...]  # events: the collected tombstones as deletes


class SubtreeStore(Planner):
    def __init__(
        self,
        zk: ZooKeeper,
        layout: Layout,
        *,
        region: str,
        clock: HybridClock,
        max_data_bytes: int,
        exclude: Sequence[str] = (),
        acl: AclPolicy | None = None,
    ) -> None:
        self.zk = zk
        self.acl = acl or AclPolicy("copy", None)
        # A second session to the same ensemble, for a large capture's ACL
        # reads (``_pieces``); without it (or while it is down) they use ``zk``.
        self.acl_reader: ZooKeeper | None = None
        self.layout = layout
        self.region = region
        self.clock = clock
        self.max_data_bytes = max_data_bytes
        self.exclude = tuple(exclude)
        # This ensemble's incarnation (set at each term's start), stamped on
        # captured events: the outbox holds each record's value as published.
        self.incarnation: str | None = None
        self.oversized: dict[str, int] = {}  # rel → size, for status and metrics
        # rel → "read" or "write": znodes the bridge's identity may not touch.
        self.held_back: dict[str, str] = {}
        self.held_events: dict[str, Event] = {}  # remote events waiting for permission
        self.metas: dict[str, MetaEntry] = {}
        # Where paths go back when a batch had to be cut before closing.
        self.requeue: Callable[[set[str]], None] = lambda rels: None
        # Told the znodes an apply wrote and the frame of its reply: their
        # notifications up to that frame are of that write (``written``).
        self.settled: Callable[[set[str], int], None] = lambda rels, frame: None
        self.outbox = Outbox(zk, layout)
        self.positions = Positions(zk, layout)
        # Tombstone collection (see bridge.tombstones): own counters of new
        # paths start above ``gc_floor``; the record's version fences its update.
        self.gc_floor = 0
        self.gc_collected = 0
        self._gc_version: int | None = None
        self._suspect: set[str] = set()  # metadata a lost multi may have changed
        self._suspect_peers: set[str] = set()

    def _replicable(self, rel: str) -> bool:
        return rel != "/" and not self.excluded(rel)

    async def setup(self) -> None:
        lay = self.layout
        for path in (lay.mount, lay.meta_root, lay.outbox, lay.positions, lay.conflicts,
                     lay.held, lay.topic_ids):
            await self.zk.ensure_path(path)
        self.metas = {"/": MetaEntry(None, 0)}
        self.positions.forget()
        await self.load_held()
        self.outbox.reset()
        await self.read_gc()

    async def read_gc(self) -> None:
        node = await self.zk.get(self.layout.gc)
        self._gc_version = node.stat.version if node else None
        self.gc_floor, self.gc_collected = codec.decode_gc(node.data) if node else (0, 0)

    # -- the metadata cache --------------------------------------------------
    def load_meta(self, rel: str, node: Node | None) -> None:
        """Record a metadata znode read by a scan (``None``: it does not exist)."""
        if node is None:
            self.metas.pop(rel, None)
        else:
            self.metas[rel] = MetaEntry(codec.decode_meta(node.data), node.stat.version)

    def live_children(self, rel: str) -> list[str]:
        prefix = "/" if rel == "/" else rel + "/"
        return [r for r, e in self.metas.items()
                if r.startswith(prefix) and "/" not in r[len(prefix):]
                and e.meta is not None and not e.meta.deleted]

    async def _multi(self, plan: Plan, peer: str | None = None) -> tuple[list[object], int]:
        """Commit a plan; when the answer is lost, what it touched is read again first.

        A ``multi`` cut off by a lost connection may or may not have committed:
        the cached metadata (and the peer's position version) of what it
        touched is unknown until read back, or the next capture would take our
        own write for an application's.
        """
        try:
            return await self.zk.commit(plan.ops)
        except (VersionConflict, NoPermission):
            raise
        except ZooKeeperError:
            self._suspect |= set(plan.metas)
            if peer is not None:
                self._suspect_peers.add(peer)
            raise

    async def _settle(self) -> None:
        if self._suspect:
            await self.refresh_meta(self._suspect)
            self._suspect.clear()
        for peer in list(self._suspect_peers):
            await self.positions.read(peer)
            self._suspect_peers.discard(peer)

    async def refresh_meta(self, rels: Iterable[str]) -> None:
        """Read metadata again after a failed multi (the cache may be behind)."""
        todo = sorted(set(rels))
        nodes = await self.zk.read_many([("data", self.layout.meta(r)) for r in todo])
        for rel, node in zip(todo, nodes, strict=True):
            self.load_meta(rel, node if isinstance(node, Node) else None)

    async def _read(self, rels: Iterable[str]) -> dict[str, Node | NoPermission | None]:
        return (await self._read_framed(rels))[0]

    async def _read_framed(self, rels: Iterable[str]
                           ) -> tuple[dict[str, Node | NoPermission | None], dict[str, int]]:
        """The znodes, and the frame of the reply that read each (chunks of 500).

        A few chunks are in flight at once; the session answers them in order.
        """
        todo = sorted(set(rels))
        parts = [todo[i : i + READ_CHUNK] for i in range(0, len(todo), READ_CHUNK)]
        replies = await gather_limited([self.zk.read_many_framed(
            [("data", self.layout.znode(r)) for r in part]) for part in parts], READS_IN_FLIGHT)
        out: dict[str, Node | NoPermission | None] = {}
        at: dict[str, int] = {}
        for part, (nodes, frame) in zip(parts, replies, strict=True):
            out.update(zip(part, nodes, strict=True))
            at.update(dict.fromkeys(part, frame))
        return out, at

    def _commit(self, plan: Plan) -> None:
        self.metas.update(plan.metas)

    def written(self, plan: Plan) -> set[str]:
        """The replicated znodes a plan writes, each behind a check of the version it read.

        Once such a ``multi`` committed, every change to these znodes that was
        notified before its reply is accounted for: made before the apply read
        the znode (a local change then stops the apply, ``LocalChanges``), or
        by the apply itself; one in between would have failed the ``multi``.
        So the capture need not read them back for those notifications.
        """
        out = set()
        for op in plan.ops:
            if isinstance(op, Create) or (isinstance(op, SetData | Delete) and op.version >= 0):
                rel = self.layout.rel_of(op.path)
                if rel is not None and rel != "/":
                    out.add(rel)
        return out

    # -- capture ---------------------------------------------------------------
    async def capture(self, rels: Iterable[str],
                      notified: Callable[[], Mapping[str, tuple[int, int] | None]] = dict,
                      on_batch: Callable[[CapturedBatch], None] | None = None,
                      unbroken: Callable[[], None] = lambda: None,
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
        """
        await self._settle()
        taken = {r for r in rels if self._replicable(r)}
        reads: dict[str, Node | NoPermission | None] = {}
        at: dict[str, int] = {}  # path → frame of the reply that read it
        seen: dict[str, list[tuple[int, int] | None]] = {}  # notifications, by call of notified()
        snapshots: list[int] = []  # the last reply frame of each read
        todo = set(taken)
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
        for rel, node in reads.items():
            if isinstance(node, NoPermission):
                self.hold(rel, "read")
                continue
            if self.held_back.pop(rel, None) == "read":
                log.info("znode_released", subtree=self.layout.name, path=rel)
            meta = self.meta(rel)
            change = classify(node, meta)
            if change is Change.MAYBE_PLACEHOLDER:
                live = self.live_children(rel)
                missing = [c for c in live if c not in reads]
                if missing:
                    raise NeedRead(missing)
                change = Change.NONE if live else Change.PUT
                if live:
                    cleanup.append(rel)
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
        if not changes and not cleanup:
            return []
        changes.sort(key=lambda c: c[0])
        deleted = {rel for _, op, rel, _ in changes if op is Op.DELETE}
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
                # Nothing to announce: a placeholder's cleanup rides on a later batch.
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
            nxt = await anext(pieces, None)
            if nxt is not None:
                log.info("batch_split", subtree=self.layout.name, events=len(changes))
            while True:
                plan, part, enc = ahead
                if nxt is None:
                    # Over the committed metadata: every earlier piece has committed.
                    self._cleanup_ops(plan, views, [*deleted, *cleanup], cleanup)
                await self.outbox.entry_ops(plan.ops, codec.encode_outbox(enc))
                unbroken()
                sending = asyncio.ensure_future(self._multi(plan))
                try:
                    await asyncio.sleep(0)  # sent: the next piece is built meanwhile
                    if nxt is not None:
                        ahead = prepare(nxt, plan.metas)
                finally:
                    try:
                        results, _ = await sending
                        failpoints.hit(failpoints.CAPTURE_COMMITTED)
                    except ZooKeeperError:
                        self.outbox.answer_lost(held_entry=True)
                        raise
                self._commit(plan)
                created = str(results[-1])
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
                if nxt is None:
                    return out
                nxt = await anext(pieces, None)
        finally:
            await pieces.aclose()

    async def _pieces(self, changes: Sequence[tuple[object, Op, str, Node | None]]
                      ) -> AsyncGenerator[list[Event], None]:
        """The events of ``changes`` (in order), cut into pieces within a ``multi``'s bounds.

        A large capture reads their ACLs ``ACL_GROUP`` changes at a time, a
        few groups ahead of the piece being written, on ``acl_reader``.
        Reading every ACL before the first piece kept the receiving regions
        idle for most of a start-up capture; on the capture's own session a
        read queued behind a piece's ``multi`` waits for its commit (tried),
        hence a second one. A small capture, or one without that session,
        reads them all first on its own session, as one group.
        """
        reader, group = self.zk, max(len(changes), 1)
        if len(changes) > ACL_GROUP and self.acl_reader and self.acl_reader.connected:
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
                (self.layout.znode(rel), rel, node.stat.aversion)
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

    # -- apply -------------------------------------------------------------------
    async def apply(self, events: Sequence[Event],
                    position: tuple[str, dict[int, int]] | None = None, *,
                    if_live: frozenset[int] = frozenset()) -> Applied:
        """Apply a peer's complete batch (or consecutive batches) as one ``multi``.

        ``position`` (the peer and its new offsets) commits in the same
        ``multi``, so a restart never applies a batch twice or half. After a
        failed ``multi`` the metadata and the position's version are read
        again: a ``multi`` whose answer was lost may have committed. Raises ``LocalChanges``
        when a path it touches changed locally unannounced: the caller
        captures those first and calls again. ``if_live``: indexes of events
        (collected tombstones carried by null records) that apply only over a
        live version, never where the path is absent or already deleted.
        """
        await self._settle()
        wanted = {e.path for e in events} | {parent(e.path) for e in events}
        wanted.discard("/")
        for _ in range(RETRIES):
            reads = await self._read(wanted)
            while True:
                local = [r for r, n in reads.items() if not isinstance(n, NoPermission)
                         and not self.excluded(r) and r not in self.oversized
                         and r not in self.held_back
                         and classify(n, self.meta(r)) in (Change.PUT, Change.DELETE,
                                                            Change.MAYBE_PLACEHOLDER)]
                if local:
                    raise LocalChanges(local)
                try:
                    plan, result = self._plan_apply(events, reads, if_live)
                    break
                except NeedRead as more:
                    wanted |= more.rels
                    reads.update(await self._read(more.rels - set(reads)))
            released = self._release_held(plan, result)
            if position is not None:
                plan.ops.append(self.positions.op(*position))
            if not plan.ops:
                return result
            try:
                _, frame = await self._multi(plan, position[0] if position else None)
            except NoPermission as exc:
                rel = self.layout.rel_of(exc.path or "")
                if rel is None:
                    raise
                self.hold(rel, "write")
                continue
            except VersionConflict:
                await self.refresh_meta(set(plan.metas) | wanted)
                if position is not None:
                    await self.positions.read(position[0])
                continue
            self._commit(plan)
            self.settled(self.written(plan), frame)
            self.held_events.update(plan.held)
            for rel in released:
                self.held_events.pop(rel, None)
                if self.held_back.get(rel) == "write":
                    del self.held_back[rel]
                log.info("znode_released", subtree=self.layout.name, path=rel)
            if position is not None:
                self.positions.written(position[0])
            for rel, carried in plan.acls:
                try:
                    await self.acl.converge(self.zk, self.layout.znode(rel), rel, carried)
                except NoPermission:
                    self.hold(rel, "write")
            return result
        raise VersionConflict(f"apply in {self.layout.name}: kept changing, will retry")

    def _release_held(self, plan: Plan, result: Applied) -> list[str]:
        """Held events this apply settles (applied, or met by an equal or newer version):
        their records go in the same ``multi``."""
        out = []
        for e, outcome in result.outcomes:
            held = self.held_events.get(e.path)
            if held is None or outcome is Outcome.HELD_BACK or e.path in plan.held:
                continue
            if e == held or compare(held.vc, e.vc) in (Order.BEFORE, Order.EQUAL):
                plan.ops.append(Delete(self.layout.held_node(e.path), -1))
                out.append(e.path)
        return out

    async def load_held(self) -> None:
        """The held events a previous term kept (``setup`` reads them at each term)."""
        self.held_events.clear()
        for name in await self.zk.children(self.layout.held) or []:
            node = await self.zk.get(f"{self.layout.held}/{name}")
            if node is None:
                continue
            try:
                event = codec.decode(node.data)
            except CodecError:
                log.warning("held_event_unreadable", subtree=self.layout.name, znode=name)
                continue
            self.held_events[event.path] = event
            self.held_back.setdefault(event.path, "write")
    # -- tombstone collection ----------------------------------------------
    async def collect(self, rels: Sequence[str]) -> Collected:
        """Forget the tombstones ``rels`` (already known stable) whose znodes are absent.

        Each ``multi`` is fenced, checks every metadata version it deletes and
        moves the counter floor with them. It also writes one outbox entry
        holding a null-value record per tombstone it removes (see
        ``bridge.tombstones``): in the same ``multi``, so a crash between the
        collection and the publish cannot lose the nulls, and in the outbox's
        order, so each null follows every record this region published
        before it. The caller holds the lock and queues the entries returned.
        """
        await self._settle()
        reads = await self._read(rels)
        absent = [r for r, n in reads.items() if n is None]
        doomed = tombstones.removable(self.metas, absent)
        done: list[str] = []
        entries: list[CapturedBatch] = []
        for i in range(0, len(doomed), GC_CHUNK):
            part = doomed[i : i + GC_CHUNK]
            floor = tombstones.floor_after(self.metas, part, self.region, self.gc_floor)
            nulls = tombstones.null_events(self.metas, part, origin=self.region,
                                           subtree=self.layout.name)
            count = sum(1 for r in part if (e := self.metas.get(r)) and e.meta is not None)
            plan = Plan(ops=[Delete(self.layout.meta(r), self.metas[r].version) for r in part])
            record = codec.encode_gc(floor, self.gc_collected + count)
            plan.ops.append(Create(self.layout.gc, record) if self._gc_version is None
                            else SetData(self.layout.gc, record, self._gc_version))
            if nulls:
                await self.outbox.entry_ops(plan.ops, codec.encode_null_entry(nulls))
            try:
                results = await self.zk.multi(plan.ops)
            except VersionConflict:
                await self.refresh_meta(part)
                await self.read_gc()
                break
            except ZooKeeperError:
                self._suspect |= set(part)
                self.outbox.answer_lost(held_entry=bool(nulls))
                await self.read_gc()  # may have committed: read again first
                raise
            self._gc_version = 0 if self._gc_version is None else self._gc_version + 1
            self.gc_floor, self.gc_collected = floor, self.gc_collected + count
            for rel in part:
                self.metas.pop(rel, None)
            done += part
            if nulls:
                created = str(results[-1])
                self.outbox.written(created)
                entries.append(CapturedBatch(tuple(nulls), (), created))
        return Collected(tuple(done), tuple(entries))

    def tombstones_held(self) -> int:
        return sum(1 for e in self.metas.values() if e.meta is not None and e.meta.deleted)

    # -- conflicts ---------------------------------------------------------
    async def trim_conflicts(self, keep: int) -> None:
        names = sorted(await self.zk.children(self.layout.conflicts) or [])
        for name in names[: max(0, len(names) - keep)]:
            await self.zk.delete(f"{self.layout.conflicts}/{name}")

