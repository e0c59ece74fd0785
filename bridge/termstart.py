"""The start of a leadership term, from taking the epoch up to the catch-up.

The epoch fences the previous leader's writes; the state is set up; the
start-up scan (ZooKeeper only) and the checks before publishing (Kafka only)
run at once; a wiped or restored ensemble replays its own topic; the
consumer starts at the stored positions; the engine waits for the catch-up.
``startup`` tells how far the start is.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import structlog

from bridge import codec, failpoints, joining, owntopic, startup, twin
from bridge.errors import BridgeError
from bridge.termsteps import both
from bridge.topiccheck import check_configs

if TYPE_CHECKING:
    from bridge.engine import Bridge

log = structlog.get_logger("bridge.termstart")


async def start(b: Bridge, tasks: list[asyncio.Task[None]]) -> None:
    """Take the epoch, set up, scan and check Kafka at once, replay the own topic."""
    s = b.settings
    b.epoch = await b.zk.take_epoch(f"{s.state_path}/epoch", b.identity.encode())
    failpoints.hit(failpoints.EPOCH_TAKEN)
    log.info("epoch_taken", epoch=b.epoch, identity=b.identity,
             session=f"{b.zk.session_id or 0:#x}")
    # A connection lost while starting is retried like any later one (a
    # chaos round crashed a bridge on one: seed 885666).
    fresh = await b.retry("read incarnation", lambda: twin.establish_incarnation(b))
    await b.retry("mark subtrees away", lambda: joining.mark_away(b))
    for store in b.stores.values():
        store.incarnation = b.incarnation
        await b.retry(f"set up {store.layout.name}", store.setup)
    # The status record and the log tell how the start goes from here: a
    # large subtree's, or a new region's, takes minutes.
    await b.retry("read the status record", b.reporter.carry_over)
    tasks += [asyncio.create_task(b.guarded("status", b.reporter.run)),
              asyncio.create_task(b.guarded("start-up", b.start_up.report))]
    for name, store in b.stores.items():
        # Left by an earlier term: published first, whole batches, in order,
        # streamed from the outbox by the feeder (Outbound.feed); this
        # term's captures wait in the outbox behind them.
        newest, pending = await b.retry("read outbox", store.outbox.open_after_pending)
        for payload in newest:
            # New batch ids must sort after the ones still pending.
            with contextlib.suppress(BridgeError):
                event = codec.decode(payload)
                b.clock.observe(max(event.ts, event.batch or 0))
        await b.overflow.start_term(name, pending)
        if pending:
            b.outbound.spill(name, start=True)
        # Else nothing is waiting: this term's captures (the start-up scan's
        # first) are queued directly, not written and read back.
    # The start-up scan needs only ZooKeeper, the checks before publishing
    # only Kafka: each waits on its own round trips, so they run at once.
    # The scan's capture waits for the publisher (Outbound.publishing),
    # which starts once the checks pass: nothing is published before them.
    found, _ = await both(
        b.start_up.during("kafka", startup.kafka_checks, _kafka_side(b, tasks, fresh)),
        _scan_all(b))
    await owntopic.replay(b, found)
    await b.reannounce.resume()
    if b.inbound.own_unsurveyed:
        tasks.append(asyncio.create_task(b.guarded(
            "own-topic survey", owntopic.when_led, b, fresh)))
    b.inbound.check_caught_up()


async def _scan_all(b: Bridge) -> None:
    for name in b.stores:
        await b.start_up.during(f"scan:{name}", startup.scanning(b, name),
                                   b.watching.scan(name))


async def _kafka_side(b: Bridge, tasks: list[asyncio.Task[None]], fresh: bool
                      ) -> owntopic.Survey:
    """Topics, the twin check and the own-topic survey, then publishing and the consumer."""
    s = b.settings
    own = [b.topic(n, b.region) for n in b.stores]
    created = await b.retry("create topics", lambda: b.kafka.ensure_topics(
        own + list(b.peers)))
    if created:
        log.info("topics_created", topics=created)
    b.background(check_configs(b, own + list(b.peers)))  # aside: warnings

    async def checks() -> owntopic.Survey:
        async with owntopic.own_reader(b) as reader:
            # A subtree whose own partition has no leader is surveyed once it has
            # one (owntopic.when_led): it held every subtree's start up before.
            held, ids = await owntopic.held_back(b, reader)
            b.inbound.own_unsurveyed = held
            names = [n for n in b.stores if n not in held]
            if not names:
                return owntopic.Survey({}, ())
            ends = await twin.check(b, reader, names)
            return await owntopic.survey(b, fresh, reader, names, ends, ids)

    async def connect() -> None:
        await b.retry("start producer", b.kafka.start_producer)
        await b.retry("start consumer", lambda: b.kafka.start_consumer(
            f"{s.kafka.topic_prefix}.{b.region}", reset="none"))

    # The producer and the consumer connect while the checks read: neither
    # sends or reads anything before the checks passed (on Apache Kafka,
    # one after the other, they were about a third of a start's checks).
    found, _ = await both(checks(), connect())
    # From here on, what is captured is published as it commits: peers
    # apply the start-up capture while the rest of it is still written.
    tasks.append(asyncio.create_task(b.guarded("publisher", b.outbound.publisher)))
    for name in b.stores:
        if name not in b.inbound.own_unsurveyed:
            b.outbound.surveyed[name].set()
    b.outbound.publishing.set()
    positions = await b.retry("read positions", b.inbound.start)
    # Peers judge this region alive by its heartbeats alone: they go out
    # from here, not once the start-up capture is done (minutes, for a
    # large subtree, and its peers would call this region silent).
    tasks.append(asyncio.create_task(b.guarded(
        "heartbeat", b.outbound.heartbeats, lambda: b.settings.heartbeat_interval)))
    for tp, end in found.ends.items():  # the publisher's acks may be ahead already
        b.inbound.own_max_end[tp] = max(b.inbound.own_max_end.get(tp, 0), end)
    # A peer's partition without a leader does not hold the term's start up: the
    # rest is applied meanwhile, and catching up waits for its end (a topic check
    # reads it once it has a leader again).
    ids = await b.retry("topic ids", lambda: b.kafka.topic_ids(list(b.inbound.peers)))
    await b.kafka.assign({**positions, **found.ends}, ids.leaderless)
    # Caught up, first = applied what the peers had published when this term
    # began; then once more as far as they had when that was reached
    # (Inbound.wait_caught_up). An empty fetch is not a usable signal:
    # heartbeats never stop.
    b.inbound.catch_up_unknown = {tp for tp in positions if tp in ids.leaderless}
    known = [tp for tp in positions if tp not in ids.leaderless]
    b.inbound.catch_up_to = await b.retry(
        "end offsets", lambda: b.kafka.readable_ends(known)) if known else {}
    return found
