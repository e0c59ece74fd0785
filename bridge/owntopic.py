"""This region's own topic at the start of a term: what the topic lost, and what the ensemble lost.

Two steps. ``survey`` runs while the start-up scan reads the tree, and before
this term publishes anything: it compares the stored publish positions with
the topic's id and ends, so nothing published this term can pass for records
the topic kept or lost. Publishing then starts, and the start-up capture is
published while it is still being written. ``replay`` runs after the scan
(which rebuilt the metadata cache and showed the mass-delete breaker the local
deletions first) and re-applies the records up to the ends the survey saw.

A subtree whose own topic has a partition without a leader as the term
begins cannot be surveyed: it is left out of both steps, publishes nothing,
and ``when_led`` does both for it once the partition has a leader. The other
subtrees, and everything the peers publish, go on meanwhile; the bridge is
ready only after.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import structlog

from bridge import failpoints, twin
from bridge.inbound import FETCH_MAX_RECORDS
from bridge.kafka import Kafka, Record, TopicIds

if TYPE_CHECKING:
    from bridge.engine import Bridge

log = structlog.get_logger("bridge.owntopic")

# Seconds between asking whether a held subtree's own partition has a leader again.
LEADER_POLL = 1.0

TopicPartition = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Replay:
    """Records of one subtree's own topic to re-apply: [start, end) per partition."""

    subtree: str
    start: dict[TopicPartition, int]
    end: dict[TopicPartition, int]


@dataclass(frozen=True, slots=True)
class Survey:
    ends: dict[TopicPartition, int]  # every own partition's end offset, before this term
    replays: tuple[Replay, ...]


@asynccontextmanager
async def own_reader(b: Bridge) -> AsyncIterator[Kafka]:
    """A consumer of its own (no group) for reading this region's topics, stopped after."""
    reader = Kafka(b.settings.kafka, client_id=f"zkbridge-{b.region}-own")
    await b.retry("start own-topic reader", lambda: reader.start_consumer(None))
    try:
        yield reader
    finally:
        await reader.stop()


async def survey(bridge: Bridge, fresh: bool, reader: Kafka, names: Collection[str],
                 seen: Mapping[TopicPartition, int] | None = None,
                 ids: TopicIds | None = None) -> Survey:
    """Check these subtrees' own topics against what this region stored; the replays to do.

    ``seen``: every own partition's end, read just before (by the twin
    check; this term published nothing since, but a bridge that led while
    this one's session expired may have); read here when None. ``ids``: the
    topics' ids, read just before (by ``held_back``); read here when None.

    A wiped or restored ensemble lost writes that only its own topic still
    records (peers applied them but never re-publish): they are replayed from
    the stored publish position (0 when the state is new) to the end seen now.
    A stored position above the end, or a topic id that changed, means the
    topic lost what we published: the whole state is re-announced instead.
    """
    b = bridge
    failpoints.hit(failpoints.OWN_TOPIC_SURVEY)
    all_ends: dict[TopicPartition, int] = {}
    replays: list[Replay] = []
    if ids is None:
        ids = await b.retry("topic ids", lambda: reader.topic_ids(
            [b.topic(n, b.region) for n in names]))
    for name in names:
        store = b.stores[name]
        topic = b.topic(name, b.region)
        stored = {} if fresh else await b.retry(
            "read publish position", partial(store.positions.read, b.region))
        if seen is None:
            parts = await b.retry(f"partitions of {topic}", partial(reader.partitions, topic))
            ends = await b.retry("end offsets", partial(
                reader.readable_ends, [(topic, p) for p in parts]))
        else:
            ends = {tp: end for tp, end in seen.items() if tp[0] == topic}
            parts = sorted(p for _, p in ends)
        if any(stored.get(p, 0) > end for (_, p), end in ends.items()):
            # Confirmed on ends read after the positions. Positions are stored
            # only once Kafka acknowledged, so those ends are at or past them
            # unless the topic lost records. The ends read first may be older
            # than a position that a bridge leading meanwhile stored (this
            # term's session expired in between: chaos seed 793460).
            ends = await b.retry("end offsets", partial(reader.readable_ends, list(ends)))
        all_ends.update(ends)
        at_end = {p: e for (_, p), e in ends.items()}  # stored after a loss
        old_id = None if fresh else await b.retry(
            "read topic id", partial(store.positions.read_topic_id, b.region))
        new_id = ids.ids.get(topic)
        if old_id is not None and new_id is not None and old_id != new_id:
            # Re-created while we were down: what we published is gone,
            # whatever the offsets say (the new topic may have grown past them).
            await b.reannounce.replaced(
                name, topic, {p: (stored.get(p, 0), e) for (_, p), e in ends.items()},
                f"topic id changed from {old_id} to {new_id} (deleted and re-created, "
                "or rebuilt)", new_id)
            await b.retry("store publish position",
                          partial(store.positions.write, b.region, at_end))
            continue
        if new_id is not None:
            if new_id != old_id:
                await b.retry("store topic id",
                              partial(store.positions.write_topic_id, b.region, new_id))
            b.inbound.own_ids[topic] = new_id
        lost = {tp: end for tp, end in ends.items() if stored.get(tp[1], 0) > end}
        for (t, p), end in lost.items():
            b.reannounce.lost(name, t, p, stored[p], end,
                             f"stored publish position {stored[p]} is above the "
                             f"end offset {end}")
        if lost:
            await b.retry("store publish position",
                          partial(store.positions.write, b.region, at_end))
            continue
        start = {(topic, p): stored.get(p, 0) for p in parts}
        todo = {tp: end for tp, end in ends.items() if end > start[tp]}
        if todo:
            replays.append(Replay(name, {tp: start[tp] for tp in todo}, todo))
    return Survey(all_ends, tuple(replays))


async def replay(bridge: Bridge, found: Survey) -> None:
    """Re-apply the records ``survey`` found, each subtree up to the ends it saw.

    Everything the ensemble still holds is skipped as equal. This term's own
    records lie past those ends: they were captured from this ensemble.
    """
    if not found.replays:
        return
    b = bridge
    async with own_reader(b) as reader:
        for todo in found.replays:
            store = b.stores[todo.subtree]
            topic = next(iter(todo.end))[0]
            log.info("replaying_own_topic", topic=topic,
                     events=sum(e - todo.start[tp] for tp, e in todo.end.items()))
            await reader.assign(dict(todo.start))
            done = dict(todo.start)
            records: list[Record] = []
            with b.start_up.step(f"replay:{todo.subtree}", partial(replay_progress, todo, done)):
                while any(done[tp] < end for tp, end in todo.end.items()):
                    for rec in await reader.fetch(500, FETCH_MAX_RECORDS):
                        tp = (rec.topic, rec.partition)
                        done[tp] = max(done[tp], rec.offset + 1)
                        if rec.offset < todo.end[tp]:  # not one published this term
                            records.append(rec)
                    if len(records) >= FETCH_MAX_RECORDS:
                        await b.applier.replay(store, records)
                        records = []
                await b.applier.replay(store, records)
            await b.outbound.store_own_position(todo.subtree, {
                p: min(o, todo.end[(t, p)]) for (t, p), o in done.items()})


def replay_progress(todo: Replay, done: dict[tuple[str, int], int]) -> str:
    """A start's progress through one replay (``status``, systemd)."""
    total = sum(end - todo.start[tp] for tp, end in todo.end.items())
    read = sum(min(done[tp], end) - todo.start[tp] for tp, end in todo.end.items())
    return (f"replaying {todo.subtree} from this region's own topic: "
            f"{read:,} of {total:,} records read")


async def held_back(b: Bridge, reader: Kafka) -> tuple[set[str], TopicIds]:
    """Subtrees whose own topic has a partition without a leader, surveyed later;
    and every own topic's id, for the survey of the others."""
    own = {b.topic(n, b.region): n for n in b.stores}
    ids = await b.retry("topic ids", lambda: reader.topic_ids(list(own)))
    held = {own[t] for t, _ in ids.leaderless if t in own}
    for name in sorted(held):
        parts = sorted(p for t, p in ids.leaderless if t == b.topic(name, b.region))
        log.warning("own_topic_leaderless", subtree=name, topic=b.topic(name, b.region),
                    partitions=parts,
                    hint="every node holding a replica is down: this subtree publishes "
                         "nothing until one is back; the others go on")
    return held, ids


async def when_led(b: Bridge, fresh: bool) -> None:
    """Survey and replay each held subtree (``held_back``) once its partition has a leader.

    Only then may it publish (``Publishing.surveyed``). The twin check of its
    topic runs first, as at a start: the other subtrees' checks did not read it;
    then its topic is watched for a second ensemble for the rest of the term.
    """
    held = b.inbound.own_unsurveyed
    try:
        async with asyncio.TaskGroup() as watching:
            while held:
                own = {b.topic(n, b.region): n for n in held}
                ids = await b.retry("topic ids", partial(b.kafka.topic_ids, list(own)))
                led = sorted(held - {own[t] for t, _ in ids.leaderless if t in own})
                if not led:
                    await asyncio.sleep(LEADER_POLL)
                    continue
                async with own_reader(b) as reader:
                    ends = await twin.check(b, reader, led)
                    found = await survey(b, fresh, reader, led, ends, ids)
                await replay(b, found)
                for tp, end in found.ends.items():
                    b.inbound.own_max_end[tp] = max(b.inbound.own_max_end.get(tp, 0), end)
                watching.create_task(_watch(b, found.ends))
                for name in led:
                    held.discard(name)
                    b.outbound.surveyed[name].set()
                log.info("own_topic_surveyed", subtrees=led, replayed=sum(
                    e - r.start[tp] for r in found.replays for tp, e in r.end.items()),
                         action="publishing what these subtrees captured meanwhile")
                b.inbound.check_caught_up()
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None  # a second ensemble: its own exit status


async def _watch(b: Bridge, ends: Mapping[TopicPartition, int]) -> None:
    """Read own partitions on from ``ends`` for a second ensemble's records, as the
    term's consumer does the others' (``Inbound.own_record``).

    A reader of its own: the term's consumer cannot take partitions on. aiokafka
    only replaces a whole assignment, and its group coordinator failed an
    assertion, ending its routine, when that happened while it looked for the
    coordinator (seen on Apache Kafka in a test written for it).
    """
    async with own_reader(b) as reader:
        await reader.assign(dict(ends))
        while True:
            for rec in await b.retry("read own topic",
                                     partial(reader.fetch, 1000, FETCH_MAX_RECORDS)):
                b.inbound.own_record(rec)
