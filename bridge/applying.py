"""Applying peers' batches: in stream order, one ``multi`` per batch (or run of batches).

Ordering invariant: each peer's complete batches are applied in the order
the inbound pipeline fetched them, one complete batch (or several
consecutive ones of the same peer and partition) per ``multi``, and that
``multi`` also stores the peer's new position. So a reader here sees only
states the origin had at batch boundaries, and a restart resumes exactly
after the last batch applied, never inside one and never twice. Applies of
one subtree never overlap each other or a capture (the subtree's lock); a
local change not yet announced is captured first (``LocalChanges``).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import structlog

from bridge import failpoints, skip
from bridge.batching import (
    CHAIN_GROUPS,
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    Assembler,
    Complete,
)
from bridge.clock import hlc_to_ms
from bridge.errors import BridgeError
from bridge.inbound import Inbound, PeerState, Ready
from bridge.kafka import Record
from bridge.layout import parent
from bridge.model import Conflict, Event, Op
from bridge.resolve import independent_sequential
from bridge.store import Applied, LocalChanges, Outcome, SubtreeStore

if TYPE_CHECKING:
    from bridge.engine import Bridge

log = structlog.get_logger("bridge.applying")

CONFLICTS_KEPT = 1000


class Applier:
    def __init__(self, bridge: Bridge, inbound: Inbound) -> None:
        self.bridge = bridge
        self.inbound = inbound
        # (subtree, parent) whose sequential name collision was logged: once each.
        self._sequences_told: set[tuple[str, str]] = set()

    async def apply_loop(self, name: str) -> None:
        queue = self.inbound.queues[name]
        while True:
            groups = [self._group(queue, await queue.get())]
            # A backlog of the same stream goes as a chain (``bridge.chain``).
            while len(groups) < CHAIN_GROUPS and not queue.empty() and self._same_stream(
                    groups[0][0], queue._queue[0]):  # type: ignore[attr-defined]
                groups.append(self._group(queue, queue.get_nowait()))
            for ready in (r for g in groups for r in g):
                self.inbound.taken(name, ready)
            taken = sum(map(len, groups))
            try:
                if len(groups) > 1:
                    groups = groups[await self.apply_chain(name, groups):]
                for group in groups:
                    await self.apply_group(name, group)
            finally:
                self.inbound.pending[name] -= taken
            self.inbound.check_caught_up()

    @staticmethod
    def _same_stream(a: Ready, b: Ready) -> bool:
        return a.peer is b.peer and a.partition == b.partition and a.generation == b.generation

    def _group(self, queue: asyncio.Queue[Ready], first: Ready) -> list[Ready]:
        """``first`` and the batches after it that commit with it.

        Consecutive batches of the same peer commit together: still a batch
        boundary of that origin, one round trip instead of many. Bounded like
        a sender's batch: ZooKeeper drops the connection of a request above
        jute.maxbuffer, and would for ever.
        """
        group = [first]
        count, size = len(first.batch.events), first.weight
        while not queue.empty():
            nxt: Ready = queue._queue[0]  # type: ignore[attr-defined]
            if (not self._same_stream(first, nxt)
                    or count + len(nxt.batch.events) > MAX_BATCH_EVENTS
                    or size + nxt.weight > MAX_BATCH_BYTES):
                break
            group.append(queue.get_nowait())
            count, size = count + len(nxt.batch.events), size + nxt.weight
        return group

    async def apply_chain(self, name: str, groups: list[list[Ready]]) -> int:
        """Apply a prefix of ``groups`` (one stream's) as a chain; how many groups it took.

        Only plain groups chain: no null records, none held at the clock
        guard; the rest go one by one (``apply_group``).
        """
        b = self.bridge
        store = b.stores[name]
        peer, part = groups[0][0].peer, groups[0][0].partition
        if any(r.batch.null for g in groups for r in g):
            return 0
        for group in groups:
            for r in group:
                if await self.clock_guard(peer, part, r.batch) is not None:
                    return 0  # apply_group asks again and skips it
        failpoints.hit(failpoints.BEFORE_APPLY)
        async with b.locks[name]:
            if groups[0][0].generation != peer.generation:
                return len(groups)  # fetched before a rewind: read again from the topic's start
            await b.outbound.flush(name)
            parts = []
            positions = peer.positions
            for group in groups:
                positions = {**positions, part: group[-1].batch.end_offset}
                parts.append(([e for r in group for e in r.batch.events], positions))
            try:
                done = await store.apply_chain(parts, peer.peer)
            except BridgeError:
                return 0  # read again and retried one by one, as ever
            for applied, (_, positions) in zip(done, parts, strict=False):
                peer.positions = positions
                self._applied(peer, store, applied)
        if done:
            b.stats[f"apply_chains:{name}"] += 1
        return len(done)

    def _applied(self, peer: PeerState, store: SubtreeStore, applied: Applied) -> None:
        """After a group's ``multi`` committed (its positions with it)."""
        failpoints.hit(failpoints.AFTER_APPLY)
        peer.stored_at = time.monotonic()
        peer.last_applied_ms = int(time.time() * 1000)
        self.record(store, applied)

    async def apply_group(self, name: str, group: list[Ready]) -> None:
        b = self.bridge
        store = b.stores[name]
        peer, part = group[0].peer, group[0].partition
        failpoints.hit(failpoints.BEFORE_APPLY)
        skipped = [await self.clock_guard(peer, part, r.batch) for r in group]
        events: list[Event] = []
        nulls: set[int] = set()  # indexes of events carried by null records
        for r, req in zip(group, skipped, strict=True):
            if req is None:
                if r.batch.null:
                    nulls.update(range(len(events), len(events) + len(r.batch.events)))
                events += r.batch.events
        async with b.locks[name]:
            if group[0].generation != peer.generation:
                return  # fetched before a rewind: read again from the topic's start
            positions = {**peer.positions, part: group[-1].batch.end_offset}
            applied = await self.apply_events(store, events, peer=peer.peer, positions=positions,
                                              if_live=frozenset(nulls))
            peer.positions = positions
        self._applied(peer, store, applied)
        for i in sorted(nulls):
            event, outcome = applied.outcomes[i]
            if outcome in (Outcome.APPLIED, Outcome.CONFLICT_REMOTE):
                b.stats[f"nulls_applied:{name}"] += 1
                log.info("null_record_applied", subtree=name, peer=peer.peer, path=event.path,
                         writer=event.writer,
                         action="the collected delete won over a live version held here "
                                "(read from a topic still holding a version it deleted)")
            else:
                b.stats[f"nulls_ignored:{name}"] += 1
        for r, req in zip(group, skipped, strict=True):
            if req is not None:
                await self.skipped(peer, part, r.batch, req)

    async def clock_guard(self, peer: PeerState, part: int, batch: Complete
                          ) -> skip.SkipRequest | None:
        """Hold a batch stamped too far ahead of our clock; the operator's skip, if any.

        Neither applied (it would drag this region's clock, and every later
        write here, into the future) nor skipped silently (that would
        diverge): the stream waits, loudly, until the wall clock catches up
        or an operator skips this batch by naming one of its records.
        """
        b = self.bridge
        bound_ms = 1000 * b.settings.max_clock_skew
        newest = max((hlc_to_ms(e.ts) for e in batch.events), default=0)
        last = batch.end_offset - 1
        first = batch.first_offset if batch.first_offset >= 0 else last
        at = skip.where(peer.topic, part, last)
        while (ahead := newest - b.clock.wall_ms()) > bound_ms:
            if at not in b.waiting:
                b.stats[f"clock_skew_waits:{peer.subtree}:{peer.peer}"] += 1
                log.error("clock_skew_wait", peer=peer.peer, topic=peer.topic, partition=part,
                          offset=last, first_offset=first, ahead_seconds=round(ahead / 1000, 1),
                          max_clock_skew=bound_ms / 1000,
                          hint="the peer's clock (or a record) is ahead of ours; its stream "
                               "waits until our wall clock catches up. If the record is bad, "
                               f"skip it: zkbridge skip -c CONFIG --topic {peer.topic} "
                               f"--partition {part} --offset {last}")
            b.waiting[at] = {"peer": peer.peer, "subtree": peer.subtree, "topic": peer.topic,
                             "partition": part, "offset": last, "first_offset": first,
                             "ahead_seconds": round(ahead / 1000, 1)}
            b.note_error(f"peer {peer.peer}", f"waiting at {at}: events stamped "
                         f"{ahead / 1000:.0f}s ahead")
            req = await b.retry("read skip requests", lambda: skip.find(
                b.zk, b.settings.state_path, peer.topic, part, first, last))
            if req is not None:
                b.waiting.pop(at, None)
                return req
            await asyncio.sleep(1.0)
        if b.waiting.pop(at, None) is not None:
            log.info("clock_skew_cleared", peer=peer.peer, topic=peer.topic, partition=part,
                     offset=last)
        return None

    async def skipped(self, peer: PeerState, part: int, batch: Complete,
                      req: skip.SkipRequest) -> None:
        """Audit a batch left out on an operator's request (now passed over for good)."""
        b = self.bridge
        first = batch.first_offset if batch.first_offset >= 0 else batch.end_offset - 1
        paths = sorted({e.path for e in batch.events})
        b.stats[f"operator_skips:{peer.subtree}:{peer.peer}"] += 1
        log.warning("record_skipped", peer=peer.peer, topic=peer.topic, partition=part,
                    first_offset=first, offset=batch.end_offset - 1, events=len(batch.events),
                    paths=paths[:20], requested_by=req.by, requested_at_ms=req.at_ms,
                    action="left out of this region; the stream goes on after it")
        b.incident("SKIPPED", f"{skip.where(peer.topic, part, req.offset)} skipped on "
                   f"{req.by}'s request: {len(batch.events)} event(s) from {peer.peer} "
                   f"({', '.join(paths[:5])}{', …' if len(paths) > 5 else ''}) not applied")
        await b.retry("remove skip request",
                      lambda: skip.remove(b.zk, b.settings.state_path, req))

    async def apply_events(self, store: SubtreeStore, events: list[Event], *,
                           peer: str | None, positions: dict[int, int] | None,
                           if_live: frozenset[int] = frozenset()) -> Applied:
        """Apply under the subtree's lock (held by the caller), capturing local changes first.

        ``if_live``: indexes of events applied only over a live version (nulls).
        """
        b = self.bridge
        name = store.layout.name
        position = (peer, positions) if peer and positions is not None else None
        await b.outbound.flush(name)
        while True:
            try:
                applied = await b.retry(f"apply {name}",
                                        lambda: store.apply(events, position, if_live=if_live))
            except LocalChanges as exc:
                # Never apply over a local write nobody has seen: announce it first.
                await b.outbound.flush(name, set(exc.rels))
                continue
            return applied

    def record(self, store: SubtreeStore, applied: Applied) -> None:
        b = self.bridge
        name = store.layout.name
        for event, outcome in applied.outcomes:
            b.stats[f"applied:{name}:{outcome.value}"] += 1
            if outcome is Outcome.OVERSIZED:
                log.warning("event_oversized", subtree=name, path=event.path,
                            size=len(event.data or b""))
            if outcome is Outcome.COLLISION:
                self.collision(store, event)
        for c in applied.conflicts:
            b.stats[f"conflicts:{name}"] += 1
            log.info("conflict_resolved", subtree=name, path=c.path, winner=c.winner,
                     remote_writer=c.remote.writer, rule=c.rule)
            if independent_sequential(c.path, c.local, c.remote):
                self.sequence_collision(name, c)
            if b.stats[f"conflicts:{name}"] % 100 == 0:
                b.background(b.retry("trim conflicts",
                                     lambda: store.trim_conflicts(CONFLICTS_KEPT)))

    def sequence_collision(self, subtree: str, c: Conflict) -> None:
        """Two different znodes under one sequential name: one of them is lost.

        The conflict rule keeps one version, as for any concurrent writes, but
        here the other was not an older value of the same thing (a queue's
        item, say): its content is gone everywhere. Logged and made an
        incident once per parent (a busy queue collides often), counted always.
        """
        b = self.bridge
        b.stats[f"sequence_collisions:{subtree}"] += 1
        under = parent(c.path)
        if (subtree, under) in self._sequences_told:
            return
        self._sequences_told.add((subtree, under))
        kept, lost = (c.remote, c.local) if c.winner == "remote" else (c.local, c.remote)
        log.warning("sequential_name_collision", subtree=subtree, path=c.path,
                    kept=kept.writer, lost=lost.writer,
                    hint=f"applications in {kept.writer} and {lost.writer} each created "
                         f"{c.path}, by its ten-digit suffix a sequential znode: each "
                         "ensemble numbers a parent's sequential children from its own "
                         f"counter, so two znodes got one name and only {kept.writer}'s "
                         "content is kept everywhere. Give each region's sequential znodes "
                         f"a prefix of their own, e.g. {under.rstrip('/')}/item-<region>-")
        b.incident("SEQUENCE", f"{subtree}:{c.path} was created as a sequential znode in "
                   f"{kept.writer} and in {lost.writer}; {lost.writer}'s content is lost "
                   "(give each region's sequential znodes a prefix of their own)")

    def collision(self, store: SubtreeStore, event: Event) -> None:
        """Equal clocks, different content: the model's one rule broken, loudly."""
        b = self.bridge
        name = store.layout.name
        b.stats[f"clock_collisions:{name}:{event.origin}"] += 1
        local = store.meta(event.path)
        log.error("clock_collision", subtree=name, origin=event.origin, path=event.path,
                  vc=str(event.vc), writer=event.writer,
                  local_writer=local.writer if local else None,
                  action="not applied; the local version stays",
                  hint=f"two ensembles publish as region {event.origin} (a copied config?): "
                       "equal clocks must mean equal content")
        b.incident("COLLISION",
                   f"event from {event.origin} for {name}:{event.path} has the clock "
                   f"{event.vc} of the local version but different content; not applied "
                   f"(two ensembles configured as region {event.origin}?)")

    async def replay(self, store: SubtreeStore, records: list[Record]) -> None:
        """Apply records of this region's own topic (rebuild after a wipe), batch by batch."""
        asm = Assembler(records[0].offset if records else 0)
        for rec in records:
            if rec.value is None:  # a Kafka tombstone: nothing to apply
                asm.skip(rec.offset)
                continue
            event = self.bridge.streams.decode(rec, store.layout.name, self.bridge.region)
            if event is not None and event.op is Op.HEARTBEAT:
                asm.skip(rec.offset)
                continue
            for done in asm.feed(rec.offset, event):
                if not done.events:
                    continue
                async with self.bridge.locks[store.layout.name]:
                    applied = await self.apply_events(store, list(done.events), peer=None,
                                                      positions=None)
                self.record(store, applied)
