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

The state and the primitives both writes use are in ``bridge.storecore``,
the capture in ``bridge.capture``; this module adds the apply, the held
events, and tombstone collection. Callers never run a capture and an apply
of one subtree at the same time (the pipelines share one lock per subtree).
Version checks in every multi catch what slips past (an application writing
meanwhile): the metadata read again, the batch is planned afresh, never
reordered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from bridge import codec, failpoints, joinlist, statecodec, tombstones
from bridge.chain import Chaining
from bridge.clock import Order, compare
from bridge.errors import CodecError, Refused, VersionConflict, ZooKeeperError
from bridge.layout import Change, Layout, classify, is_excluded, join, parent
from bridge.model import Event
from bridge.plan import (
    WRITE_HOLDS,
    Applied,
    CapturedBatch,
    LocalChanges,
    MetaEntry,
    NeedRead,
    Outcome,
    Plan,
)
from bridge.storecore import RETRIES
from bridge.zk import Create, Delete, Node, SetData

__all__ = ["Applied", "CapturedBatch", "Change", "Collected", "Layout", "LocalChanges", "MetaEntry",
           "Outcome", "SubtreeStore", "classify", "is_excluded", "join"]

log = structlog.get_logger("bridge.store")

GC_CHUNK = 500  # metadata deletes per collection multi, well under jute.maxbuffer


def _under(rel: str, events: Sequence[Event]) -> list[str]:
    """The paths of ``events`` at or below ``rel`` (``rel`` itself if none is)."""
    return sorted({e.path for e in events if is_excluded(e.path, (rel,))}) or [rel]


@dataclass(frozen=True, slots=True)
class Collected:
    """What a collection did: metadata removed, and the outbox entries of its nulls."""

    removed: tuple[str, ...]
    nulls: tuple[CapturedBatch, ...]  # events: the collected tombstones as deletes


class SubtreeStore(Chaining):
    async def setup(self) -> None:
        lay = self.layout
        await self.zk.ensure_path(lay.mount)
        if await self.zk.exists(lay.meta_root) is None:
            # The subtree's first start here: marked before its state is made, so
            # a crash in between still finds it joining.
            await self.zk.ensure_path(lay.joining)
        elif (away := await self.zk.exists(lay.away)) is not None:
            await self._back(away.version)
        for path in (lay.meta_root, lay.outbox, lay.positions, lay.conflicts,
                     lay.held, lay.topic_ids, lay.rereads):
            await self.zk.ensure_path(path)
        recorded = await self.zk.get(lay.mount_record)
        self.mount_before = recorded.data.decode("utf-8", "replace") if recorded else None
        if self.moved_from is not None:
            log.warning("subtree_moved", subtree=lay.name, before=self.moved_from,
                        now=lay.mount, action="the start-up scan compares what is at the new "
                        "mount with the state of the old one")
        try:
            self.read_under = await self.positions.read_excluded()
        except CodecError:
            self.read_under = None
        self.joining = None  # what a term set aside is read again by this term's scan
        self.join_records.clear()
        # Paths excluded when the peers' topics were last read and not now (a
        # restart with a new exclude list) join like a new region's copy: marked
        # before anything (the scan, the topics' re-read) takes them in.
        await self.mark_joining(self.included())
        self.join_held, self.join_list_line = (await joinlist.load(self.zk, lay)
                                               if self.joining is not None else (None, None))
        self.metas = {"/": MetaEntry(None, 0)}
        self.positions.forget()
        await self.load_held()
        self.outbox.reset()
        await self.read_gc()


    async def _back(self, version: int) -> None:
        """Configured again after starts without it: what the region's applications
        changed there meanwhile joins, the whole subtree (the marker made anew, its
        czxid the line), as a path included again does."""
        lay = self.layout
        # A join crashed before it left starts over whole: its list goes first (a
        # znode of it deleted while away was deleted while not replicated).
        await joinlist.drop(self.zk, lay)
        await self.zk.multi([Delete(lay.away, version),
                             *self._new_marker(await self.zk.get(lay.joining), b"")])
        log.info("subtree_back", subtree=lay.name,
                 action="the peers' versions of what this region changed there while "
                        "away first")

    async def note_mount(self) -> None:
        """Record the mount the state now describes (after a scan passed the breaker)."""
        lay = self.layout
        if self.mount_before == lay.mount:
            return
        data = lay.mount.encode()
        if self.mount_before is None and await self.zk.exists(lay.mount_record) is None:
            await self.zk.multi([Create(lay.mount_record, data)])
        else:
            await self.zk.multi([SetData(lay.mount_record, data)])
        self.mount_before = lay.mount

    async def save_join_held(self) -> None:
        """After a scan of a join whose list is not whole for its marker (its first; one
        after the marker was widened, or after a crash while the list was written):
        add the unrecorded znodes it set aside."""
        if self.joining is None or self.join_list_line == self.join_zxid:
            return
        held = frozenset(r for r, read in self.joining.items()
                         if read is not None and self.join_records.get(r) is None)
        listed = self.join_held or frozenset()
        await joinlist.save(self.zk, self.layout, sorted(held - listed), self.join_zxid)
        self.join_held, self.join_list_line = listed | held, self.join_zxid

    def included(self) -> tuple[str, ...]:
        """The paths excluded when the peers' topics were last read and not now."""
        return tuple(x for x in self.read_under or () if not is_excluded(x, self.exclude))

    async def mark_joining(self, paths: tuple[str, ...] = ()) -> None:
        """Read the joining marker, first made or widened for ``paths`` (an exclude
        list that no longer holds them): ``joining``, ``join_scope``, ``join_zxid``.

        Its data is the paths that join, none for the whole mount (a first start).
        Widened, it is made again: its czxid, the line between what the region
        held before and the applications' writes since, is now for the new
        paths; those joining already keep theirs in its data (``join_lines``).
        """
        lay = self.layout
        node = await self.zk.get(lay.joining)
        scope: tuple[str, ...] | None = None
        lines: dict[str, int] = {}
        try:
            if node is not None and node.data:
                scope, lines = statecodec.decode_marker(node.data)
        except CodecError:
            scope, lines = None, {}  # unreadable: all of the subtree joins, the safe side
        if paths and (node is None or (scope is not None and not set(paths) <= set(scope))):
            if node is not None and scope is not None:
                # The paths joining already keep their line: a write an application
                # made there since their join began (a crashed one's bridge down)
                # is no part of what the region held before.
                lines = {p: lines.get(p, node.stat.czxid) for p in scope}
            scope = tuple(sorted({*(scope or ()), *paths}))
            await self.zk.multi(self._new_marker(node, statecodec.encode_marker(scope, lines)))
            node = await self.zk.get(lay.joining)
            log.info("paths_joining", subtree=lay.name, paths=list(paths),
                     action="the peers' versions of what this region holds there first")
            failpoints.hit(failpoints.JOIN_MARKED)
        if node is None:
            self.joining, self.join_scope, self.join_zxid = None, None, 0
            return
        if self.joining is None:
            self.joining = {}
        self.join_scope, self.join_zxid = scope, node.stat.czxid
        self.join_lines = lines

    def _new_marker(self, node: Node | None, data: bytes) -> list[Create | Delete]:
        """The joining marker made anew (its czxid, the line, moves to now)."""
        lay = self.layout
        return [*([Delete(lay.joining, node.stat.version)] if node else []),
                Create(lay.joining, data)]

    async def read_gc(self) -> None:
        node = await self.zk.get(self.layout.gc)
        self._gc_version = node.stat.version if node else None
        self.gc_floor, self.gc_collected = statecodec.decode_gc(node.data) if node else (0, 0)


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
        # Each refusal holds back at least one more event: it never uses up a retry.
        for _ in range(RETRIES + len(events)):
            reads = await self._read(wanted)
            while True:
                local = self.unannounced(reads)
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
            except Refused as exc:
                rel = self.layout.rel_of(exc.path or "")
                if rel is None:
                    raise
                # A placeholder parent refused stands for the events below it.
                for culprit in _under(rel, events):
                    self.hold(culprit, exc.hold)
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
                if self.held_back.get(rel) in WRITE_HOLDS:
                    del self.held_back[rel]
                log.info("znode_released", subtree=self.layout.name, path=rel)
            if position is not None:
                self.positions.written(position[0])
            for rel, carried in plan.acls:
                try:
                    await self.acl.converge(self.zk, self.layout.znode(rel), rel, carried)
                except Refused as exc:
                    self.hold(rel, exc.hold)
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
            record = statecodec.encode_gc(floor, self.gc_collected + count)
            plan.ops.append(Create(self.layout.gc, record) if self._gc_version is None
                            else SetData(self.layout.gc, record, self._gc_version))
            if nulls:
                await self.outbox.entry_ops(plan.ops, statecodec.encode_null_entry(nulls))
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
        if not self.rebuilding:
            self._tombstones = sum(1 for e in self.metas.values()
                                   if e.meta is not None and e.meta.deleted)
        return self._tombstones

    # -- conflicts ---------------------------------------------------------
    async def trim_conflicts(self, keep: int) -> None:
        names = sorted(await self.zk.children(self.layout.conflicts) or [])
        for name in names[: max(0, len(names) - keep)]:
            await self.zk.delete(f"{self.layout.conflicts}/{name}")
