"""The inbound pipeline's fetch side: peers' records → complete batches, queued in order.

Ordering invariant: each peer's topic is read in offset order, and a batch
is queued for applying (``bridge.applying``) only once all of it has
arrived, in the order its records were read; applying keeps that order, one
``multi`` per batch with the peer's new position. Fetching runs ahead of
applying by up to ``QUEUE_WEIGHT`` of batches per subtree. Records on this
region's own topic are read only to see who else publishes there.

Never skipping: a peer topic that lost records is reported and that stream
rewound to the start of the current topic (``bridge.topiccheck``). Batches
fetched before the rewind belong to an older *generation* of the stream and
are dropped unapplied. Re-applied events are harmless: equal or dominated
clocks are skipped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING

import structlog

from bridge import codec
from bridge.batching import CHAIN_GROUPS, MAX_BATCH_BYTES, Assembler, Complete
from bridge.clock import hlc_to_ms
from bridge.errors import (
    BridgeError,
    CodecError,
    DuplicateRegionError,
    KafkaError,
    OffsetOutOfRange,
)
from bridge.kafka import Record
from bridge.layout import is_excluded
from bridge.model import Event, Op
from bridge.topiccheck import Answer, TopicCheck

if TYPE_CHECKING:
    from bridge.engine import Bridge

log = structlog.get_logger("bridge.inbound")

FETCH_MAX_RECORDS = 2000
# Complete batches fetched ahead of applying, per subtree, by ``weight``: a
# chain's worth (``bridge.chain``) whatever their sizes. A count of batches
# held a few hundred events when origins write a few znodes at a time, and
# 45 MB when their batches are full.
QUEUE_WEIGHT = CHAIN_GROUPS * MAX_BATCH_BYTES
IDLE_POSITION_SECONDS = 0.2  # heartbeat-only progress is stored at most this often


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
    # partition → (offset, paths): a topic read again for paths no longer excluded
    # (``TopicCheck.read_again``) applies, below the offset it had reached, only
    # the events of those paths; the rest were applied when first read.
    only: dict[int, tuple[int, tuple[str, ...]]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Ready:
    """A complete batch waiting to be applied, with the position after it."""

    peer: PeerState
    partition: int
    batch: Complete
    timestamp_ms: int
    generation: int
    weight: int  # about what it adds to the apply ``multi`` (``weight``)


def weight(events: Iterable[Event]) -> int:
    """About what a batch adds to the apply ``multi``: content, paths, metadata."""
    return sum(len(e.data or b"") + 2 * len(e.path) + 128 for e in events)


class Inbound:
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.peers: dict[str, PeerState] = {}  # by topic
        self.queues: dict[str, asyncio.Queue[Ready]] = {}
        self.pending: dict[str, int] = {}  # batches fetched and not yet applied
        self.queued: dict[str, int] = {}  # the weight of what the queue holds
        self.room: dict[str, asyncio.Event] = {}  # set while below QUEUE_WEIGHT
        self.caught_up = asyncio.Event()
        self.went_round = asyncio.Event()  # set (and made anew) at each round of the fetcher
        self.catch_up_to: dict[tuple[str, int], int] = {}
        # Partitions without a leader as the term began: their ends are unknown until
        # a topic check reads them (``TopicCheck``); caught up waits for those too.
        self.catch_up_unknown: set[tuple[str, int]] = set()
        # Subtrees whose own topic had a partition without a leader as the term began:
        # not surveyed yet (``owntopic.when_led``); caught up waits for those too.
        self.own_unsurveyed: set[str] = set()
        # This region's own topics: read from their end, only to see who else
        # publishes there (a second ensemble as this region) and whether
        # they lost what we published.
        self.own: dict[str, str] = {bridge.topic(n, bridge.region): n for n in bridge.stores}
        # (incarnation, its field as encoded), made again when the incarnation changes.
        self._own_field: tuple[str | None, bytes] = (None, b"")
        self.own_max_end: dict[tuple[str, int], int] = {}
        self.own_ids: dict[str, str] = {}  # own topic → the id this bridge published to
        self.topics = TopicCheck(self)
        # Subtrees whose peers' topics are to be read again from their start, for
        # paths a reload included again (their events were passed over). Kept
        # over a term's end: the next term's fetcher does it.
        self.read_again: dict[str, tuple[str, ...]] = {}
        for name in bridge.stores:
            self._new_queue(name)
            for peer in bridge.settings.peers:
                topic = bridge.topic(name, peer)
                self.peers[topic] = PeerState(name, peer, topic)

    def reset(self) -> None:
        self.caught_up.clear()
        self.catch_up_unknown.clear()
        self.own_unsurveyed.clear()
        self.own_max_end.clear()
        self.own_ids.clear()
        self.topics.reset()
        for name in self.queues:
            self._new_queue(name)

    def _new_queue(self, name: str) -> None:
        self.queues[name] = asyncio.Queue()
        self.pending[name] = self.queued[name] = 0
        self.room[name] = asyncio.Event()
        self.room[name].set()

    def taken(self, name: str, ready: Ready) -> None:
        """The applier took ``ready`` off the queue: room for more."""
        self.queued[name] -= ready.weight
        if self.queued[name] < QUEUE_WEIGHT:
            self.room[name].set()

    async def start(self) -> dict[tuple[str, int], int | None]:
        """Read stored positions; returns where to assign each partition."""
        positions: dict[tuple[str, int], int | None] = {}
        partitions = await self.bridge.retry("partitions of the topics", partial(
            self.bridge.kafka.partitions_of, [*self.peers, *self.own]))
        for topic, parts in partitions.items():
            _one_partition(topic, parts)
        for topic, peer in self.peers.items():
            store = self.bridge.stores[peer.subtree]
            peer.positions = await store.positions.read(peer.peer)
            # The id the positions were taken from: the fetcher's first topic
            # check compares it with the topic's id now, before applying.
            peer.topic_id = await store.positions.read_topic_id(peer.peer)
            # A topic read again for paths no longer excluded that this region had not
            # read past before it stopped; one it passed is forgotten.
            try:
                stored = await store.positions.read_rereads(peer.peer)
            except CodecError:
                stored = {}  # every event applies again: needless, never lost
            peer.only = {p: v for p, v in stored.items() if peer.positions.get(p, 0) < v[0]}
            if peer.only != stored:
                await store.positions.write_rereads(peer.peer, peer.only)
            peer.assemblers = {}
            peer.max_end, peer.suspect = {}, {}
            for part in partitions[topic]:
                positions[(topic, part)] = peer.positions.get(part)
                peer.assemblers[part] = Assembler(peer.positions.get(part, 0))
        for name, store in self.bridge.stores.items():
            # Paths excluded when the topics were last read and not now (a restart
            # with a new exclude list): read again, as a reload would.
            if store.read_under != store.exclude:
                self.read_again[name] = (*self.read_again.get(name, ()), *store.included())
        return positions

    def reread_done(self, name: str) -> bool:
        """Has every peer's topic of ``name`` that is read again for included paths
        been read up to where it was (``TopicCheck.read_again``)?"""
        return name not in self.read_again and all(
            peer.positions.get(part, 0) >= until
            for peer in self.peers.values() if peer.subtree == name
            for part, (until, _) in peer.only.items())

    def own_acked(self, topic: str, partition: int, end: int) -> None:
        """The publisher's acks: the own topic held at least this much."""
        tp = (topic, partition)
        self.own_max_end[tp] = max(self.own_max_end.get(tp, 0), end)

    # -- fetch -----------------------------------------------------------------
    async def fetcher(self) -> None:
        b = self.bridge
        # A topic re-created while this bridge was down may have grown past the
        # stored position: only its id tells, and it must before the first apply.
        await self.topics.check()
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
                    await self.topics.check(forced=exc.offsets)
                    continue
                for rec in records:
                    await self._take(rec)
                for name, paths in list(self.read_again.items()):
                    # Taken off only once stored: until then the re-read is pending
                    # (``reread_done``), and a reload meanwhile may add paths.
                    if not await self.topics.read_again(name, paths):
                        continue  # a partition without a leader: the others flow
                    rest = tuple(p for p in self.read_again.pop(name, ()) if p not in paths)
                    if rest:
                        self.read_again[name] = rest
                await self._idle_positions()
                if asking is not None and asking.done():
                    answer, asking = asking.result(), None
                    await self.topics.settle(answer, {})
                if asking is None and self.topics.due():
                    asking = asyncio.ensure_future(self.topics.ask())
                self.check_caught_up()
                # Once per fetch (100 ms at most): positions may have moved since.
                went, self.went_round = self.went_round, asyncio.Event()
                went.set()
        finally:
            if asking is not None:
                asking.cancel()

    def own_record(self, rec: Record) -> None:
        """A record on this region's own topic: ours, or a second ensemble's."""
        b = self.bridge
        if rec.value is None:
            return
        if self._own_field[0] != b.incarnation:
            self._own_field = (b.incarnation, codec.incarnation_field(b.incarnation))
        # Our own field, byte for byte: the record is ours, unless an
        # application stored those very bytes in a znode (then a second
        # ensemble's other records still tell). Unpacking every record
        # instead was a tenth of the origin's main thread in steady state.
        if self._own_field[1] in rec.value:
            return
        try:
            inc = codec.incarnation_of(rec.value)
        except CodecError:
            return
        if inc is None or inc == b.incarnation:
            return
        raise DuplicateRegionError(duplicate_message(
            b.region, rec.topic, theirs=inc, ours=b.incarnation,
            seen=f"a record at offset {rec.offset}"))

    async def _take(self, rec: Record) -> None:
        if rec.topic in self.own:
            self.own_record(rec)
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
        event = self.bridge.streams.decode(rec, peer.subtree, peer.peer)
        if null and event is not None and event.op is not Op.DELETE:
            self.bridge.stats["rejected:bad_field"] += 1
            log.warning("event_rejected", reason="bad_field", topic=rec.topic,
                        partition=rec.partition, offset=rec.offset,
                        detail="a null record carries an event that is not a delete")
            event = None
        if event is not None and event.op is Op.HEARTBEAT:
            self.bridge.reporter.heartbeat(peer.subtree, peer.peer, peer.last_heartbeat_ms,
                                           rec.timestamp_ms)
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
            done = _only(peer, rec.partition, done)
            peer.last_event_ms = rec.timestamp_ms
            name = peer.subtree
            while self.queued[name] >= QUEUE_WEIGHT:
                self.room[name].clear()
                await self.room[name].wait()
            ready = Ready(peer, rec.partition, done, rec.timestamp_ms, peer.generation,
                          weight(done.events))
            self.pending[name] += 1
            self.queued[name] += ready.weight
            self.queues[name].put_nowait(ready)

    async def _idle_positions(self) -> None:
        """Store positions moved only by heartbeats or skipped records, now and then;
        at once until caught up, so that ready means the stored positions reached the
        ends (what ``zkbridge lag`` reads)."""
        now = time.monotonic()
        every = IDLE_POSITION_SECONDS if self.caught_up.is_set() else 0.0
        for peer in self.peers.values():
            if now - peer.stored_at < every:
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
                                        s.positions.write(p.peer, n))  # type: ignore[misc]
                peer.positions = new
                peer.stored_at = now

    async def wait_caught_up(self) -> None:
        """Until this term applied what its peers had published when its start-up ended.

        The ends read as the term began are as old as its start-up took (a
        large subtree's capture: minutes). Ready at those, the bridge would
        serve with all that was published meanwhile unread, and judge its
        peers by heartbeats as old as that: so, once there, it reads the
        ends again and reaches those too.
        """
        await self.caught_up.wait()
        if not self.catch_up_to:
            return  # no peer to read
        b = self.bridge
        # One that lost its leader since the term began: its end is waited for as
        # at the start (``ends_known``), not asked for in a retry loop that says
        # nothing of the outage and holds every other partition's end back.
        down = self.topics.leaderless & self.catch_up_to.keys()
        known = [tp for tp in self.catch_up_to if tp not in down]
        self.catch_up_to = await b.retry(
            "end offsets", lambda: b.kafka.readable_ends(known)) if known else {}
        self.catch_up_unknown |= down
        self.caught_up.clear()
        self.check_caught_up()
        await self.caught_up.wait()

    def to_catch_up(self) -> int:
        """Records between the stored positions and the ends to catch up to."""
        total = 0
        for (topic, part), end in self.catch_up_to.items():
            peer = self.peers.get(topic)
            if peer is not None:
                # Stored positions only: heartbeats and skipped records past the
                # last batch count once _idle_positions stored them.
                total += max(0, end - peer.positions.get(part, 0))
        return total

    def waits_on_leaders(self) -> bool:
        """Caught up but for partitions without a leader (peers', or this region's own)."""
        return (not self.caught_up.is_set() and bool(self.catch_up_unknown or self.own_unsurveyed)
                and not self.to_catch_up())

    def check_caught_up(self) -> None:
        if not (self.caught_up.is_set() or self.to_catch_up() or self.catch_up_unknown
                or self.own_unsurveyed):
            self.caught_up.set()

    def ends_known(self, ends: Mapping[tuple[str, int], int]) -> None:
        """A topic check's ends: those of partitions that had no leader as the term
        began become what catching up waits for."""
        for tp in self.catch_up_unknown & ends.keys():
            self.catch_up_to[tp] = ends[tp]
            self.catch_up_unknown.discard(tp)
            self.check_caught_up()


def _one_partition(topic: str, parts: list[int]) -> None:
    if len(parts) > 1:
        log.warning("topic_partitions", topic=topic, partitions=len(parts),
                    action="only partition 0 is written and read in order",
                    hint="an origin's order needs one partition: create the bridge's topics "
                         "with one (or let the bridge create them)")


def _only(peer: PeerState, part: int, done: Complete) -> Complete:
    """``done`` as a topic read again for some paths applies it (``PeerState.only``)."""
    if part not in peer.only:
        return done
    until, paths = peer.only[part]
    if done.end_offset > until:
        del peer.only[part]
        return done
    return replace(done, events=tuple(e for e in done.events if is_excluded(e.path, paths)))


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
