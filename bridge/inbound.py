"""The inbound pipeline: fetch → complete batch → resolve → one ``multi`` with the position.

Ordering invariant: each peer's topic is read in offset order and its
batches are applied in that order, one complete batch (or several
consecutive ones of the same peer) per ``multi``, and that ``multi`` also
stores the peer's new position. So a reader here sees only states the origin
had at batch boundaries, a restart resumes exactly after the last batch
applied (never inside one, never twice), and nothing of a batch is applied
before all of it has arrived. Fetching runs ahead of applying; applies of one
subtree never overlap each other or a capture (the subtree's lock).

Never skipping: a peer topic that lost records (a new topic id, a position
above its end, an end that went back, a log start past the position) is
reported and that stream rewound to the start of the current topic. Batches fetched before the
rewind belong to an older *generation* of the stream and are dropped unapplied.
Re-applied events are harmless: equal or dominated clocks are skipped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING

import structlog

from bridge import codec, failpoints, skip
from bridge.batching import MAX_BATCH_BYTES, MAX_BATCH_EVENTS, Assembler, Complete
from bridge.clock import hlc_to_ms
from bridge.errors import (
    BridgeError,
    CodecError,
    DuplicateRegionError,
    KafkaError,
    OffsetOutOfRange,
)
from bridge.kafka import Record
from bridge.model import Event, Op
from bridge.store import Applied, LocalChanges, Outcome, SubtreeStore

if TYPE_CHECKING:
    from bridge.engine import Bridge

log = structlog.get_logger("bridge.inbound")

FETCH_MAX_RECORDS = 2000
CONFLICTS_KEPT = 1000
QUEUE_BATCHES = 64  # complete batches fetched ahead of applying, per subtree
IDLE_POSITION_SECONDS = 0.2  # heartbeat-only progress is stored at most this often
TOPIC_CHECK_SECONDS = 1.0  # how often offsets are compared with the topics' ends
TOPIC_CHECK_TIMEOUT = 5.0  # longest a topic check waits for each of its answers


@dataclass
class PeerState:
    """What the inbound pipeline knows about one (subtree, peer) stream."""

    subtree: str
    peer: str
    topic: str
    positions: dict[int, int] = field(default_factory=dict)
    assemblers: dict[int, Assembler] = field(default_factory=dict)
    last_heartbeat_ms: int = 0
    last_event_ms: int = 0
    last_applied_ms: int = 0
    stored_at: float = 0.0
    generation: int = 0  # bumped by each rewind; older fetched batches are dropped
    max_end: dict[int, int] = field(default_factory=dict)  # highest end offset seen
    suspect: dict[int, str] = field(default_factory=dict)  # a loss seen once, to confirm
    topic_id: str | None = None  # Kafka's id of the topic the positions belong to


@dataclass(frozen=True, slots=True)
class Answer:
    """What the broker answered to one topic check, with what was known when asking."""

    ids: Mapping[str, str]  # topic → id
    ends: Mapping[tuple[str, int], int]
    begins: Mapping[tuple[str, int], int]
    acked: Mapping[tuple[str, int], int]  # own partitions' ends acknowledged before asking
    peer_tps: list[tuple[str, int]]
    since: int  # wall-clock ms the check before this one started
    started_ms: int


@dataclass(frozen=True, slots=True)
class Ready:
    """A complete batch waiting to be applied, with the position after it."""

    peer: PeerState
    partition: int
    batch: Complete
    timestamp_ms: int
    generation: int = 0


def weight(ready: Ready) -> int:
    """About what a batch adds to the apply ``multi``: content, paths, metadata."""
    return sum(len(e.data or b"") + 2 * len(e.path) + 128 for e in ready.batch.events)


class Inbound:
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.peers: dict[str, PeerState] = {}  # by topic
        self.queues: dict[str, asyncio.Queue[Ready]] = {}
        self.pending: dict[str, int] = {}  # batches fetched and not yet applied
        self.caught_up = asyncio.Event()
        self.catch_up_to: dict[tuple[str, int], int] = {}
        # This region's own topics: read from their end, only to see who else
        # publishes there (a second ensemble as this region) and whether
        # they lost what we published.
        self.own: dict[str, str] = {bridge.topic(n, bridge.region): n for n in bridge.stores}
        self.own_max_end: dict[tuple[str, int], int] = {}
        self.own_ids: dict[str, str] = {}  # own topic → the id this bridge published to
        # An own partition whose end was seen below what we had published:
        # the end acknowledged before that check, confirmed at the next one.
        self._own_suspect: dict[tuple[str, int], int] = {}
        self._checked = 0.0
        self._checked_ms = 0  # wall clock of the last topic check's start
        self._check_failures = 0  # consecutive topic checks that failed
        for name in bridge.stores:
            self.queues[name] = asyncio.Queue(QUEUE_BATCHES)
            self.pending[name] = 0
            for peer in bridge.settings.peers:
                topic = bridge.topic(name, peer)
                self.peers[topic] = PeerState(name, peer, topic)

    def reset(self) -> None:
        self.caught_up.clear()
        self.own_max_end.clear()
        self.own_ids.clear()
        self._own_suspect.clear()
        for name in self.queues:
            self.queues[name] = asyncio.Queue(QUEUE_BATCHES)
            self.pending[name] = 0

    async def start(self) -> dict[tuple[str, int], int | None]:
        """Read stored positions; returns where to assign each partition."""
        positions: dict[tuple[str, int], int | None] = {}
        for topic, peer in self.peers.items():
            store = self.bridge.stores[peer.subtree]
            peer.positions = await store.read_positions(peer.peer)
            # The id the positions were taken from: the fetcher's first topic
            # check compares it with the topic's id now, before applying.
            peer.topic_id = await store.read_topic_id(peer.peer)
            peer.assemblers = {}
            peer.max_end, peer.suspect = {}, {}
            for part in await self.bridge.retry(
                    f"partitions of {topic}", partial(self.bridge.kafka.partitions, topic)):
                positions[(topic, part)] = peer.positions.get(part)
                peer.assemblers[part] = Assembler(peer.positions.get(part, 0))
        return positions

    def own_acked(self, topic: str, partition: int, end: int) -> None:
        """The publisher's acks: the own topic held at least this much."""
        tp = (topic, partition)
        self.own_max_end[tp] = max(self.own_max_end.get(tp, 0), end)

    # -- fetch -----------------------------------------------------------------
    async def fetcher(self) -> None:
        b = self.bridge
        # A topic re-created while this bridge was down may have grown past the
        # stored position: only its id tells, and it must before the first apply.
        await self.check_topics()
        # Later checks ask aside and are settled here: fetching never waits
        # for an answer (one sent into a network cut waits up to
        # TOPIC_CHECK_TIMEOUT, and each heartbeat fetched meanwhile aged as much).
        asking: asyncio.Future[Answer | TimeoutError | KafkaError | None] | None = None
        try:
            while True:
                try:
                    records = await b.retry("fetch",
                                            lambda: b.kafka.fetch(100, FETCH_MAX_RECORDS))
                except OffsetOutOfRange as exc:
                    if asking is not None:
                        asking.cancel()
                        asking = None
                    # The broker says a position is outside the topic: no need to confirm.
                    await self.check_topics(forced=exc.offsets)
                    continue
                for rec in records:
                    await self._take(rec)
                await self._idle_positions()
                if asking is not None and asking.done():
                    answer, asking = asking.result(), None
                    await self._settle(answer, {})
                if asking is None and time.monotonic() - self._checked >= TOPIC_CHECK_SECONDS:
                    asking = asyncio.ensure_future(self._ask())
                self.check_caught_up()
        finally:
            if asking is not None:
                asking.cancel()

    # -- topics that lost records ------------------------------------------------
    async def check_topics(self, forced: dict[tuple[str, int], int] | None = None) -> None:
        """Compare every position with its topic's id and offsets; rewind or re-announce on a loss.

        A loss seen by offsets alone must be seen twice in a row (a new
        partition leader may briefly report a lower end); one the broker
        reported (out of range) or a changed topic id is acted on at once.
        A topic the broker does not know is created again at once.
        """
        await self._settle(await self._ask(), forced or {})

    async def _ask(self) -> Answer | TimeoutError | KafkaError | None:
        """The broker's side of a topic check: topic ids, then offsets (None: nothing to ask).

        Only asks: what it decides is for ``_settle``, in the fetcher.
        """
        b = self.bridge
        self._checked = time.monotonic()
        since, started_ms = self._checked_ms, int(time.time() * 1000)
        peer_tps = [(t, p) for t, peer in self.peers.items() for p in peer.assemblers]
        # What was acknowledged *before* asking: an ack that lands while the
        # request is in flight is for a record the answer may not count yet.
        acked = dict(self.own_max_end)
        tps = peer_tps + list(acked)
        if not tps:
            return None
        try:
            async with asyncio.timeout(TOPIC_CHECK_TIMEOUT):
                ids = await b.kafka.topic_ids([*self.peers, *self.own])
            missing = sorted(ids.missing & (self.peers.keys() | self.own.keys()))
            if missing:
                # Asking for its offsets would only wait out a request timeout.
                raise KafkaError(f"topics missing: {', '.join(missing)}")
            async with asyncio.timeout(TOPIC_CHECK_TIMEOUT):
                ends, begins = await asyncio.gather(b.kafka.end_offsets(tps),
                                                    b.kafka.beginning_offsets(tps))
        except TimeoutError as exc:
            # A connection that had requests in flight through a network cut
            # may wait out TCP's retransmission backoff (seconds, growing
            # with the cut) after the heal: the next check asks on a new one.
            await b.kafka.reset_queries()
            return exc
        except KafkaError as exc:
            return exc
        return Answer(ids.ids, ends, begins, acked, peer_tps, since, started_ms)

    async def _settle(self, answer: Answer | TimeoutError | KafkaError | None,
                      forced: dict[tuple[str, int], int]) -> None:
        """Act on a topic check's answer: rewind, re-announce, or recreate topics."""
        b = self.bridge
        if answer is None:
            return
        if isinstance(answer, TimeoutError):
            b.note_error("topic check", f"no answer within {TOPIC_CHECK_TIMEOUT:g}s")
            return  # looked at again next round; nothing is decided on no answer
        if isinstance(answer, KafkaError):
            # A topic that vanished (deleted, broker rebuilt empty): recreate
            # what this bridge may create, and look again next round.
            # The check runs every second: one warning per outage, not one a second.
            self._check_failures += 1
            emit = log.warning if self._check_failures == 1 else log.debug
            emit("topic_check_failed", error=str(answer),
                 hint="a topic may be missing, or the broker unreachable; the bridge "
                      "recreates its topics and looks again every second")
            b.note_error("topic check", str(answer))
            await b.recreate_topics()
            return
        if self._check_failures:
            log.info("topic_check_recovered", failed_checks=self._check_failures)
            self._check_failures = 0
        replaced = await self._replaced(answer.ids)
        ends, begins, acked = dict(answer.ends), answer.begins, answer.acked
        self._checked_ms = answer.started_ms
        for tp, hw in b.kafka.highwaters_since(list(ends), answer.since).items():
            # Some brokers answer ListOffsets with less than the fetch high
            # watermark (tansu does, for good). The high watermark of a fetch
            # answered since the last check is what reading really finds; a
            # fetch refused after a loss leaves it older than that, unused.
            ends[tp] = max(ends[tp], hw)
        for topic, (old, new) in replaced.items():
            why = f"topic id changed from {old} to {new} (deleted and re-created, or rebuilt)"
            if topic in self.own:
                parts = {p: (acked.get((topic, p), 0), ends.get((topic, p), 0))
                         for p in {p for t, p in acked if t == topic} or {0}}
                for p, (_, now) in parts.items():
                    self.own_max_end[(topic, p)] = now
                    self._own_suspect.pop((topic, p), None)
                await b.reannounce.replaced(self.own[topic], topic, parts, why, new)
                continue
            peer = self.peers[topic]
            for part in list(peer.assemblers):
                pos = max(peer.positions.get(part, 0), peer.assemblers[part].resume_offset)
                await self.rewind(peer, part, pos=pos, begin=begins.get((topic, part), 0),
                                  end=ends.get((topic, part), 0), why=why)
            store = b.stores[peer.subtree]
            # Stored after the rewound positions: a crash in between only rewinds again.
            await b.retry("store topic id", lambda s=store, p=peer, i=new:  # type: ignore[misc]
                          s.write_topic_id(p.peer, i))
            peer.topic_id = new
        for tp, seen in acked.items():
            end = ends.get(tp)
            if end is None or tp[0] in replaced:
                continue
            # Confirmed against what was acknowledged before the *previous*
            # check: a broker may answer ListOffsets a little behind the acks
            # it sent (tansu does, under load), never a whole second behind.
            before = self._own_suspect.pop(tp, None)
            if before is not None and end < before:
                why = f"end offset {end} is below the {before} this bridge published"
                self.own_max_end[tp] = end
                b.reannounce.lost(self.own[tp[0]], tp[0], tp[1], before, end, why)
            elif end < seen:
                self._own_suspect[tp] = seen
        for tp in answer.peer_tps:
            topic, part = tp
            peer = self.peers[topic]
            end, begin = ends.get(tp), begins.get(tp, 0)
            if end is None or topic in replaced:
                continue
            pos = max(peer.positions.get(part, 0), peer.assemblers[part].resume_offset)
            seen = peer.max_end.get(part, 0)
            why = ""
            if tp in forced:
                why = f"the broker refused offset {forced[tp]} as out of range"
            elif pos > end:
                why = f"position {pos} is above the end offset {end}"
            elif end < seen:
                why = f"end offset {end} went back from {seen}"
            elif begin > pos:
                why = f"log start offset {begin} is past position {pos}"
            if not why:
                peer.suspect.pop(part, None)
                peer.max_end[part] = max(seen, end)
                continue
            if tp not in forced and peer.suspect.pop(part, None) is None:
                peer.suspect[part] = why
                continue
            await self.rewind(peer, part, pos=pos, begin=begin, end=end, why=why)

    async def _replaced(self, ids: Mapping[str, str]) -> dict[str, tuple[str, str]]:
        """Topics whose id changed: topic → (old id, new id). First sightings are stored."""
        b = self.bridge
        out: dict[str, tuple[str, str]] = {}
        for topic, new in ids.items():
            if topic in self.own:
                old = self.own_ids.get(topic)
                if old is None:
                    name = self.own[topic]
                    await b.retry("store topic id", lambda n=name, i=new:  # type: ignore[misc]
                                  b.stores[n].write_topic_id(b.region, i))
                    self.own_ids[topic] = new
            elif topic in self.peers:
                peer = self.peers[topic]
                old = peer.topic_id
                if old is None:
                    await b.retry("store topic id", lambda p=peer, i=new:  # type: ignore[misc]
                                  b.stores[p.subtree].write_topic_id(p.peer, i))
                    peer.topic_id = new
            else:
                continue
            if old is not None and old != new:
                out[topic] = (old, new)
        return out

    async def rewind(self, peer: PeerState, part: int, *, pos: int, begin: int, end: int,
                     why: str) -> None:
        """Read ``peer``'s partition again from the start of the current topic, stored so."""
        b = self.bridge
        store = b.stores[peer.subtree]
        async with b.locks[peer.subtree]:
            peer.generation += 1
            peer.positions = {**peer.positions, part: begin}
            peer.assemblers[part] = Assembler(begin)
            peer.max_end[part] = end
            peer.suspect.pop(part, None)
            b.kafka.seek(peer.topic, part, begin)
            new = dict(peer.positions)
            await b.retry("store positions", lambda: store.write_positions(peer.peer, new))
            tp = (peer.topic, part)
            if tp in self.catch_up_to:
                self.catch_up_to[tp] = min(self.catch_up_to[tp], end)
        b.stats[f"topic_resets:{peer.subtree}:{peer.peer}"] += 1
        log.error("topic_lost_records", topic=peer.topic, partition=part, stored_position=pos,
                  end_offset=end, log_start=begin, reason=why,
                  action="rewound to the start of the current topic; events already held "
                         "are skipped as equal or dominated, nothing is passed over",
                  hint=f"the topic was re-created, truncated or rebuilt empty; {peer.peer} "
                       "re-announces its state by itself once it notices")
        b.incident("TOPIC_RESET",
                   f"{peer.topic}[{part}] lost records ({why}); rewound to offset {begin}, "
                   f"nothing skipped; {peer.peer} re-announces its state by itself")

    def _own_record(self, rec: Record) -> None:
        """A record on this region's own topic: ours, or a second ensemble's."""
        b = self.bridge
        try:
            inc = codec.incarnation_of(rec.value) if rec.value is not None else None
        except CodecError:
            return
        if inc is None or inc == b.incarnation:
            return
        raise DuplicateRegionError(duplicate_message(
            b.region, rec.topic, theirs=inc, ours=b.incarnation,
            seen=f"a record at offset {rec.offset}"))

    async def _take(self, rec: Record) -> None:
        if rec.topic in self.own:
            self._own_record(rec)
            return
        peer = self.peers[rec.topic]
        asm = peer.assemblers.setdefault(rec.partition, Assembler(rec.offset))
        null = rec.value is None
        if null:
            carried = dict(rec.headers).get(codec.NULL_HEADER)
            if carried is None:
                # A null without the collected delete (not a bridge's): nothing to apply.
                self.bridge.stats["null_records"] += 1
                asm.skip(rec.offset)
                return
            # A collected tombstone (never inside a batch): applied in stream
            # order, through the apply queue, only where it wins over a live
            # version (``bridge.tombstones``).
            rec = replace(rec, value=carried)
        event = self.bridge.decode(rec, peer.subtree, peer.peer)
        if null and event is not None and event.op is not Op.DELETE:
            self.bridge.stats["rejected:bad_field"] += 1
            log.warning("event_rejected", reason="bad_field", topic=rec.topic,
                        partition=rec.partition, offset=rec.offset,
                        detail="a null record carries an event that is not a delete")
            event = None
        if event is not None and event.op is Op.HEARTBEAT:
            peer.last_heartbeat_ms = max(peer.last_heartbeat_ms, rec.timestamp_ms)
            if event.applied is not None:  # one sent with no capture in flight
                self.bridge.stability[peer.subtree].heard(peer.peer, rec.partition,
                                                          rec.offset, event.ts, event.applied)
            asm.skip(rec.offset)
            end = self.bridge.kafka.highwater(rec.topic, {rec.partition: 0})[rec.partition]
            if rec.offset + 3 >= end:  # fresh, not a backlog read late
                self.bridge.reporter.clock_sample(peer.peer, hlc_to_ms(event.ts))
            return
        dropped = asm.dropped
        completed = asm.feed(rec.offset, event, null=null)
        if asm.dropped > dropped:
            self.bridge.stats["incomplete_batch_records"] += asm.dropped - dropped
            log.warning("incomplete_batch_dropped", topic=rec.topic, offset=rec.offset,
                        records=asm.dropped - dropped,
                        hint="the origin republishes the whole batch from its outbox")
            asm.dropped = dropped = 0
        for done in completed:
            peer.last_event_ms = rec.timestamp_ms
            self.pending[peer.subtree] += 1
            await self.queues[peer.subtree].put(
                Ready(peer, rec.partition, done, rec.timestamp_ms, peer.generation))

    async def _idle_positions(self) -> None:
        """Store positions moved only by heartbeats or skipped records, now and then."""
        now = time.monotonic()
        for peer in self.peers.values():
            if now - peer.stored_at < IDLE_POSITION_SECONDS:
                continue
            resume = {p: a.resume_offset for p, a in peer.assemblers.items()}
            # Only when nothing fetched waits to be applied: the stored
            # position must never jump over a batch not yet applied.
            if self.pending[peer.subtree] or all(
                    resume[p] <= peer.positions.get(p, 0) for p in resume):
                continue
            store = self.bridge.stores[peer.subtree]
            async with self.bridge.locks[peer.subtree]:
                if self.pending[peer.subtree]:
                    continue
                new = {**peer.positions, **resume}
                await self.bridge.retry("store positions", lambda s=store, p=peer, n=new:
                                        s.write_positions(p.peer, n))  # type: ignore[misc]
                peer.positions = new
                peer.stored_at = now

    def check_caught_up(self) -> None:
        if self.caught_up.is_set():
            return
        for (topic, part), end in self.catch_up_to.items():
            peer = self.peers.get(topic)
            if peer is None:
                continue
            done = peer.positions.get(part, 0)
            asm = peer.assemblers.get(part)
            if asm is not None and not self.pending[peer.subtree]:
                done = max(done, asm.resume_offset)  # the rest were heartbeats
            if done < end:
                return
        self.caught_up.set()

    # -- apply -----------------------------------------------------------------
    async def apply_loop(self, name: str) -> None:
        queue = self.queues[name]
        while True:
            first = await queue.get()
            group = [first]
            # Consecutive batches of the same peer commit together: still a
            # batch boundary of that origin, one round trip instead of many.
            # Bounded like a sender's batch: ZooKeeper drops the connection of
            # a request above jute.maxbuffer, and would for ever.
            count, size = len(first.batch.events), weight(first)
            while not queue.empty():
                nxt: Ready = queue._queue[0]  # type: ignore[attr-defined]
                if (nxt.peer is not first.peer or nxt.partition != first.partition
                        or nxt.generation != first.generation
                        or count + len(nxt.batch.events) > MAX_BATCH_EVENTS
                        or size + weight(nxt) > MAX_BATCH_BYTES):
                    break
                group.append(queue.get_nowait())
                count, size = count + len(nxt.batch.events), size + weight(nxt)
            try:
                await self.apply_group(name, group)
            finally:
                self.pending[name] -= len(group)
            self.check_caught_up()

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
        failpoints.hit(failpoints.AFTER_APPLY)
        peer.stored_at = time.monotonic()
        peer.last_applied_ms = int(time.time() * 1000)
        self.record(store, applied)
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
            if b.stats[f"conflicts:{name}"] % 100 == 0:
                b.background(b.retry("trim conflicts",
                                     lambda: store.trim_conflicts(CONFLICTS_KEPT)))

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
            event = self.bridge.decode(rec, store.layout.name, self.bridge.region)
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


def decode_record(rec: Record, subtree: str, origin: str) -> tuple[Event | None, str, str]:
    """Decode and contain one record: (event, rejection reason or "", detail)."""
    try:
        if rec.value is None:
            raise CodecError("malformed", "null value (tombstone)")
        event = codec.decode(rec.value)
    except CodecError as exc:
        return None, exc.reason, str(exc)
    if event.origin != origin:
        return None, "unknown_origin", f"origin={event.origin}"
    if event.subtree != subtree:
        return None, "wrong_subtree", f"subtree={event.subtree}"
    return event, "", ""


def duplicate_message(region: str, topic: str, *, theirs: str, ours: str, seen: str) -> str:
    """The one line a bridge exits with when another ensemble publishes as its region."""
    return (f"another ZooKeeper ensemble publishes as region {region!r} on {topic} "
            f"({seen}, incarnation {theirs}; this ensemble is {ours}): two ensembles are "
            "configured as the same region, probably a copied config; give one of them its "
            "own `region:` (not restarted: exit status 4)")


__all__ = ["BridgeError", "Inbound", "PeerState", "decode_record", "duplicate_message"]
