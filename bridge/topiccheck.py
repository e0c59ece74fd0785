"""Topic checks: every second, each topic's id and offsets against what this bridge
read and published.

A peer's topic that lost records (a new topic id, a position above its end,
an end that went back, a log start past the position) is reported and that
stream rewound to the start of the current topic; this region's own topic
that lost what it published is re-announced (``bridge.reannounce``); a topic
that vanished is created again. A loss seen by offsets alone must be seen
twice in a row; the fetcher never waits for a check's answers, only the
decisions are taken between fetches. At a start, topics made beforehand with
a config the bridge cannot work well with are named (``check_configs``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from bridge import failpoints
from bridge.batching import Assembler
from bridge.errors import BridgeError, KafkaError, VersionConflict
from bridge.kafka import publish_limit

if TYPE_CHECKING:
    from bridge.engine import Bridge
    from bridge.inbound import Inbound, PeerState

log = structlog.get_logger("bridge.topiccheck")

TOPIC_CHECK_SECONDS = 1.0  # how often offsets are compared with the topics' ends
TOPIC_CHECK_TIMEOUT = 5.0  # longest a topic check waits for each of its answers


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
    leaderless: frozenset[tuple[str, int]] = frozenset()  # not asked: no leader to answer


class TopicCheck:
    def __init__(self, inbound: Inbound) -> None:
        self.inbound = inbound
        # An own partition whose end was seen below what we had published:
        # the end acknowledged before that check, confirmed at the next one.
        self._own_suspect: dict[tuple[str, int], int] = {}
        self._checked = 0.0
        self._checked_ms = 0  # wall clock of the last topic check's start
        self._check_failures = 0  # consecutive topic checks that failed
        self._leaderless: frozenset[tuple[str, int]] = frozenset()  # at the last check
        self._leaderless_noted = 0.0
        # Subtrees whose re-read waits for a leader or a topic: when last asked.
        self._reread_waits: dict[str, float] = {}

    def reset(self) -> None:
        self._own_suspect.clear()
        self._reread_waits.clear()  # a new term asks at once, and says it waits again

    def due(self) -> bool:
        return time.monotonic() - self._checked >= TOPIC_CHECK_SECONDS

    async def check(self, forced: dict[tuple[str, int], int] | None = None) -> None:
        """Compare every position with its topic's id and offsets; rewind or re-announce on a loss.

        A loss seen by offsets alone must be seen twice in a row (a new
        partition leader may briefly report a lower end); one the broker
        reported (out of range) or a changed topic id is acted on at once.
        A topic the broker does not know is created again at once.
        """
        await self.settle(await self.ask(), forced or {})

    async def ask(self) -> Answer | TimeoutError | KafkaError | None:
        """The broker's side of a topic check: topic ids, then offsets (None: nothing to ask).

        Only asks: what it decides is for ``settle``, in the fetcher.
        """
        b = self.inbound.bridge
        self._checked = time.monotonic()
        since, started_ms = self._checked_ms, int(time.time() * 1000)
        peer_tps = [(t, p) for t, peer in self.inbound.peers.items() for p in peer.assemblers]
        # What was acknowledged *before* asking: an ack that lands while the
        # request is in flight is for a record the answer may not count yet.
        acked = dict(self.inbound.own_max_end)
        tps = peer_tps + list(acked)
        if not tps:
            return None
        try:
            async with asyncio.timeout(TOPIC_CHECK_TIMEOUT):
                ids = await b.kafka.topic_ids([*self.inbound.peers, *self.inbound.own])
            missing = sorted(ids.missing & (self.inbound.peers.keys() | self.inbound.own.keys()))
            if missing:
                # Asking for its offsets would only wait out a request timeout.
                raise KafkaError(f"topics missing: {', '.join(missing)}")
            # The others are checked meanwhile: one partition down (its only
            # replica's node stopped) timed every check out, for every topic.
            leaderless = ids.leaderless & set(tps)
            tps = [tp for tp in tps if tp not in leaderless]
            ends: dict[tuple[str, int], int] = {}
            begins: dict[tuple[str, int], int] = {}
            if tps:
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
        return Answer(ids.ids, ends, begins, acked, [tp for tp in peer_tps if tp in ends],
                      since, started_ms, leaderless)

    async def _diagnose(self) -> None:
        b = self.inbound.bridge
        why = await b.kafka.diagnose()  # raises if no retry can cure it: the bridge stops
        if why is not None:
            log.warning("kafka_unreachable", error=why)
            b.note_error("kafka", why)

    async def settle(self, answer: Answer | TimeoutError | KafkaError | None,
                      forced: dict[tuple[str, int], int]) -> None:
        """Act on a topic check's answer: rewind, re-announce, or recreate topics."""
        b = self.inbound.bridge
        if answer is None:
            return
        if isinstance(answer, TimeoutError | KafkaError):
            # The producer waits out a broker that refuses this bridge's identity
            # (an expired or no longer trusted certificate) without an error:
            # this check, every second, is where it shows; the bridge stops if
            # so. Aside: a connection into a network cut may take a while.
            b.background(b.guarded("diagnose kafka", self._diagnose))
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
            await b.recreate_topics(again=self._check_failures > 1)
            return
        if self._check_failures:
            log.info("topic_check_recovered", failed_checks=self._check_failures)
            self._check_failures = 0
        self._name_leaderless(answer.leaderless)
        replaced = await self._replaced(answer.ids)
        ends, begins, acked = dict(answer.ends), answer.begins, answer.acked
        self._checked_ms = answer.started_ms
        for tp, hw in b.kafka.highwaters_since(list(ends), answer.since).items():
            # Some brokers answer ListOffsets with less than the fetch high
            # watermark (tansu does, for good). The high watermark of a fetch
            # answered since the last check is what reading really finds; a
            # fetch refused after a loss leaves it older than that, unused.
            ends[tp] = max(ends[tp], hw)
        self.inbound.ends_known(ends)
        for topic, (old, new) in replaced.items():
            why = f"topic id changed from {old} to {new} (deleted and re-created, or rebuilt)"
            if topic in self.inbound.own:
                parts = {p: (acked.get((topic, p), 0), ends.get((topic, p), 0))
                         for p in {p for t, p in acked if t == topic} or {0}}
                for p, (_, now) in parts.items():
                    self.inbound.own_max_end[(topic, p)] = now
                    self._own_suspect.pop((topic, p), None)
                await b.reannounce.replaced(self.inbound.own[topic], topic, parts, why, new)
                continue
            peer = self.inbound.peers[topic]
            for part in list(peer.assemblers):
                pos = max(peer.positions.get(part, 0), peer.assemblers[part].resume_offset)
                await self.rewind(peer, part, pos=pos, begin=begins.get((topic, part), 0),
                                  end=ends.get((topic, part), 0), why=why)
            store = b.stores[peer.subtree]
            # Stored after the rewound positions: a crash in between only rewinds again.
            await b.retry("store topic id", lambda s=store, p=peer, i=new:  # type: ignore[misc]
                          s.positions.write_topic_id(p.peer, i))
            peer.topic_id = new
            failpoints.hit(failpoints.TOPIC_REWOUND)
        for tp, seen in acked.items():
            end = ends.get(tp)
            if end is None or tp[0] in replaced:
                continue
            # Confirmed against what was acknowledged before the *previous*
            # check: where no fetch answered since (its high watermark is the
            # end then), tansu lists one past the base offset of the last
            # batch, below the acks it sent until a later batch moves it.
            before = self._own_suspect.pop(tp, None)
            if before is not None and end < before:
                why = f"end offset {end} is below the {before} this bridge published"
                self.inbound.own_max_end[tp] = end
                b.reannounce.lost(self.inbound.own[tp[0]], tp[0], tp[1], before, end, why)
            elif end < seen:
                self._own_suspect[tp] = seen
        for tp in answer.peer_tps:
            topic, part = tp
            peer = self.inbound.peers[topic]
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
            failpoints.hit(failpoints.TOPIC_REWOUND)

    @property
    def leaderless(self) -> frozenset[tuple[str, int]]:
        """The partitions without a leader at the last check that answered."""
        return self._leaderless

    def _name_leaderless(self, now: frozenset[tuple[str, int]]) -> None:
        """Partitions without a leader: in ``status`` while it lasts, logged as it
        starts and ends. Their records wait in Kafka or in the outbox; nothing is lost."""
        b = self.inbound.bridge
        before, self._leaderless = self._leaderless, now
        named = ", ".join(f"{t} partition {p}" for t, p in sorted(now))
        # Noted now and then, not at every check: status keeps the last 20 errors.
        if now and (now != before or time.monotonic() - self._leaderless_noted >= 10):
            self._leaderless_noted = time.monotonic()
            b.note_error("topic check", f"no leader for {named}: every node holding a "
                         "replica is down; its records wait until one is back")
        if now - before:
            log.warning("partition_leaderless", partitions=named,
                        hint="start a Kafka node that holds a replica of it; its subtree's "
                             "records wait meanwhile (nothing is lost), the others flow")
        if before - now:
            log.info("partition_leader_back", partitions=", ".join(
                f"{t} partition {p}" for t, p in sorted(before - now)))

    async def _replaced(self, ids: Mapping[str, str]) -> dict[str, tuple[str, str]]:
        """Topics whose id changed: topic → (old id, new id). First sightings are stored."""
        b = self.inbound.bridge
        out: dict[str, tuple[str, str]] = {}
        for topic, new in ids.items():
            if topic in self.inbound.own:
                if self.inbound.own[topic] in self.inbound.own_unsurveyed:
                    continue  # its survey compares the id stored with this one first
                old = self.inbound.own_ids.get(topic)
                if old is None:
                    name = self.inbound.own[topic]
                    await b.retry("store topic id", lambda n=name, i=new:  # type: ignore[misc]
                                  b.stores[n].positions.write_topic_id(b.region, i))
                    self.inbound.own_ids[topic] = new
            elif topic in self.inbound.peers:
                peer = self.inbound.peers[topic]
                old = peer.topic_id
                if old is None:
                    await b.retry("store topic id", lambda p=peer, i=new:  # type: ignore[misc]
                                  b.stores[p.subtree].positions.write_topic_id(p.peer, i))
                    peer.topic_id = new
            else:
                continue
            if old is not None and old != new:
                out[topic] = (old, new)
        return out

    def _seek_back(self, peer: PeerState, part: int, begin: int) -> None:
        """Read ``peer``'s partition again from ``begin`` (in the fetcher, between fetches:
        what was fetched before belongs to an older generation and is dropped); the
        caller stores the position."""
        peer.generation += 1
        peer.positions = {**peer.positions, part: begin}
        peer.assemblers[part] = Assembler(begin)
        peer.suspect.pop(part, None)
        self.inbound.bridge.kafka.seek(peer.topic, part, begin)

    async def read_again(self, subtree: str, paths: tuple[str, ...]) -> bool:
        """Read every peer's topic of ``subtree`` again from its start, for ``paths``
        (no longer excluded here: their events were passed over); none: only store
        the exclude list the topics are read under from now on. False: not now, one
        of those partitions has no leader or its topic is missing (asked again at a
        later call).

        Up to where each partition was, only those paths' events are applied:
        the others were applied when first read, and a put whose tombstone this
        region has since collected would come back until its origin's null.
        Every peer's rewound position and filter and the new exclude list commit
        in one ``multi``: a restart finds all of it or none, and then compares
        the stored exclude list with its configuration again.
        """
        b = self.inbound.bridge
        store = b.stores[subtree]
        peers = [p for p in self.inbound.peers.values() if p.subtree == subtree] if paths else []
        tps = [(peer.topic, part) for peer in peers for part in peer.assemblers]
        begins = await self._starts(subtree, tps) if tps else {}
        if begins is None:
            return False
        async with b.locks[subtree]:
            plans = []
            for peer in peers:
                only, rewound = dict(peer.only), dict(peer.positions)
                for part in peer.assemblers:
                    until, before = only.get(part, (0, ()))
                    only[part] = (max(peer.positions.get(part, 0), until), (*before, *paths))
                    rewound[part] = begins.get((peer.topic, part), 0)
                plans.append((peer, only, rewound))

            async def commit() -> None:
                ops = [store.positions.op(peer.peer, rewound) for peer, _, rewound in plans]
                for peer, only, _ in plans:
                    op = await store.positions.rereads_op(peer.peer, only)
                    ops += [op] if op is not None else []
                ops.append(await store.positions.excluded_op(store.exclude))
                try:
                    await b.zk.multi(ops)
                except VersionConflict:
                    for peer, _, _ in plans:
                        await store.positions.read(peer.peer)
                    raise
                for peer, _, _ in plans:
                    store.positions.written(peer.peer)

            await b.retry("store the re-read", commit)
            for peer, only, rewound in plans:
                peer.only = only
                for part, begin in rewound.items():
                    if part in only:
                        self._seek_back(peer, part, begin)
                        log.info("topic_read_again", topic=peer.topic, partition=part,
                                 from_offset=begin, up_to=only[part][0],
                                 paths=list(only[part][1]), reason="no longer excluded")
                b.stats[f"topic_rereads:{subtree}:{peer.peer}"] += 1
        if plans:
            failpoints.hit(failpoints.REREAD_STORED)
        return True

    async def _starts(self, subtree: str, tps: list[tuple[str, int]]
                      ) -> dict[tuple[str, int], int] | None:
        """The log start of each partition of ``tps``; None: not now, one has no leader,
        its topic is missing (until its origin makes it again) or the broker did not
        answer. Asked once, not in a retry loop: that held the fetcher, every
        subtree's, for as long as the outage lasted. Asked again a second later."""
        down = self._leaderless & set(tps)
        asked = self._reread_waits.get(subtree)
        why = ""
        if down:
            why = "no leader"
        elif asked is not None and time.monotonic() - asked < TOPIC_CHECK_SECONDS:
            return None  # the fetcher calls every round: once a second will do
        else:
            b = self.inbound.bridge
            try:
                # The last check may be a second old: Metadata alone answers.
                ids = await b.kafka.topic_ids(sorted({t for t, _ in tps}))
                down = (ids.leaderless & set(tps)) | {tp for tp in tps if tp[0] in ids.missing}
                if not down:
                    starts = await b.kafka.beginning_offsets(tps)
                    self._reread_waits.pop(subtree, None)
                    return starts
                why = "no leader, or the topic is missing"
            except KafkaError as exc:
                why = str(exc)
        if asked is None:
            log.info("topic_read_again_waits", subtree=subtree, why=why,
                     partitions=", ".join(f"{t} partition {p}" for t, p in sorted(down)),
                     action="read again for the paths no longer excluded once their "
                            "starts can be asked for; the other topics are read meanwhile")
        self._reread_waits[subtree] = time.monotonic()
        return None

    async def rewind(self, peer: PeerState, part: int, *, pos: int, begin: int, end: int,
                     why: str) -> None:
        """Read ``peer``'s partition again from the start of the current topic, stored so."""
        b = self.inbound.bridge
        store = b.stores[peer.subtree]
        async with b.locks[peer.subtree]:
            # Read again from the new topic's start, every event applies: a filter
            # was of the old topic's offsets. Gone before the position is, also one
            # passed (kept stored until the next start), or a restart would apply it.
            rest = {p: v for p, v in peer.only.items() if p != part}
            await b.retry("store the re-read", lambda: store.positions.write_rereads(
                peer.peer, rest))
            peer.only = rest
            self._seek_back(peer, part, begin)
            new = dict(peer.positions)
            await b.retry("store positions", lambda: store.positions.write(peer.peer, new))
            peer.max_end[part] = end
            tp = (peer.topic, part)
            if tp in self.inbound.catch_up_to:
                self.inbound.catch_up_to[tp] = min(self.inbound.catch_up_to[tp], end)
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

async def check_configs(b: Bridge, topics: list[str]) -> None:
    """Warn of a topic made beforehand that is not compacted, or whose record limit is
    below what the bridge may publish. Best effort, once per start: a broker that does
    not answer is not asked again."""
    try:
        async with asyncio.timeout(10):
            configs = await b.kafka.topic_configs(topics)
    except (BridgeError, TimeoutError):
        return
    needed = publish_limit(b.settings.max_data_bytes)
    for topic, config in sorted(configs.items()):
        policy = config.get("cleanup.policy", "compact")
        if "compact" not in policy.split(","):
            log.warning("topic_not_compacted", topic=topic, cleanup_policy=policy,
                        hint="set cleanup.policy=compact on it (kafka-configs --alter): "
                             "deleted by retention, records of znodes no one changed "
                             "lately never reach a region that bootstraps")
        limit = int(config.get("max.message.bytes", needed))
        if limit < needed:
            log.warning("topic_message_limit", topic=topic, max_message_bytes=limit,
                        needed=needed,
                        hint=f"set max.message.bytes={needed} or more on it: a larger "
                             "znode or batch is refused, and publishing waits (nothing "
                             "is lost) until the limit is raised")
