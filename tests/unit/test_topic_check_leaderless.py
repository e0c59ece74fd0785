"""A topic check with a partition that has no leader: the other partitions are still
asked and checked, and the one without is named (status, log) while it lasts. A
term that began while it had none is caught up only once its end is known.

No servers: a stand-in Kafka whose offsets for a leaderless partition would never
come (as aiokafka waits out its request timeout for them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import structlog

from bridge.errors import KafkaError
from bridge.inbound import Inbound
from bridge.kafka.topicids import TopicIds
from bridge.topiccheck import Answer, TopicCheck

TP = tuple[str, int]


class Kafka:
    def __init__(self) -> None:
        self.leaderless: frozenset[TP] = frozenset({("p.side.r2", 0)})
        self.asked: list[TP] = []

    async def topic_ids(self, topics: Sequence[str]) -> TopicIds:
        return TopicIds({t: f"id-{t}" for t in topics}, leaderless=self.leaderless)

    async def end_offsets(self, tps: Sequence[TP]) -> dict[TP, int]:
        self.asked += tps
        if any(tp in self.leaderless for tp in tps):
            await asyncio.sleep(3600)
        return dict.fromkeys(tps, 5)

    async def beginning_offsets(self, tps: Sequence[TP]) -> dict[TP, int]:
        return dict.fromkeys(tps, 0)


def check() -> tuple[TopicCheck, Kafka, list[tuple[str, str]]]:
    kafka, errors = Kafka(), []
    bridge = SimpleNamespace(kafka=kafka, note_error=lambda what, e: errors.append((what, e)))
    peer = SimpleNamespace(assemblers={0: None})
    inbound = SimpleNamespace(bridge=bridge, peers={"p.main.r2": peer, "p.side.r2": peer},
                              own={"p.main.r1": "main"}, own_max_end={("p.main.r1", 0): 3})
    return TopicCheck(inbound), kafka, errors  # type: ignore[arg-type]


def test_a_leaderless_partition_is_not_asked_and_the_others_are() -> None:
    tc, kafka, _ = check()

    async def go() -> Any:
        async with asyncio.timeout(2):
            return await tc.ask()

    answer = asyncio.run(go())
    assert isinstance(answer, Answer), answer
    assert sorted(kafka.asked) == [("p.main.r1", 0), ("p.main.r2", 0)]
    assert answer.leaderless == {("p.side.r2", 0)}
    assert answer.peer_tps == [("p.main.r2", 0)]  # only what has an answer is judged


def test_a_leaderless_partition_is_named_while_it_lasts() -> None:
    tc, _, errors = check()
    side = frozenset({("p.side.r2", 0)})
    with structlog.testing.capture_logs() as logs:
        tc._name_leaderless(side)
        tc._name_leaderless(side)  # the same, a second later: neither noted nor logged again
        tc._name_leaderless(frozenset())
    assert errors == [("topic check", "no leader for p.side.r2 partition 0: every node "
                       "holding a replica is down; its records wait until one is back")]
    assert [(e["event"], e["partitions"]) for e in logs] == [
        ("partition_leaderless", "p.side.r2 partition 0"),
        ("partition_leader_back", "p.side.r2 partition 0")]


def test_caught_up_waits_for_the_end_of_a_partition_that_had_no_leader() -> None:
    bridge = SimpleNamespace(region="r1", stores={"main": None, "side": None},
                             settings=SimpleNamespace(peers=["r2"]),
                             topic=lambda subtree, region: f"p.{subtree}.{region}")
    inbound = Inbound(bridge)  # type: ignore[arg-type]
    for peer in inbound.peers.values():
        peer.positions = {0: 7}
    inbound.catch_up_to = {("p.main.r2", 0): 7}  # applied up to its end already
    inbound.catch_up_unknown = {("p.side.r2", 0)}
    inbound.check_caught_up()
    assert not inbound.caught_up.is_set()
    assert inbound.waits_on_leaders()  # the rest applied: systemd hears READY=1
    inbound.ends_known({("p.main.r2", 0): 9})  # a known one's end is not moved
    assert inbound.catch_up_to == {("p.main.r2", 0): 7}
    assert not inbound.caught_up.is_set()
    inbound.ends_known({("p.side.r2", 0): 12})  # its leader is back: 5 to apply
    assert inbound.catch_up_unknown == set()
    assert inbound.to_catch_up() == 5 and not inbound.caught_up.is_set()
    assert not inbound.waits_on_leaders()
    inbound.peers["p.side.r2"].positions = {0: 12}
    inbound.check_caught_up()
    assert inbound.caught_up.is_set()


def test_an_own_topic_not_surveyed_holds_caught_up_and_its_id_is_left_to_the_survey() -> None:
    """Its survey compares the id stored with the topic's now: a check that stored
    the new one first would hide a topic re-created while this region was down."""
    written: list[tuple[str, str]] = []

    async def write_topic_id(region: str, topic_id: str) -> None:
        written.append((region, topic_id))

    async def retry(what: str, fn: Any) -> Any:
        return await fn()

    positions = SimpleNamespace(write_topic_id=write_topic_id)
    bridge = SimpleNamespace(region="r1", settings=SimpleNamespace(peers=[]), retry=retry,
                             stores={n: SimpleNamespace(positions=positions)
                                     for n in ("main", "side")},
                             topic=lambda subtree, region: f"p.{subtree}.{region}")
    inbound = Inbound(bridge)  # type: ignore[arg-type]
    inbound.own_unsurveyed = {"side"}
    inbound.check_caught_up()
    assert not inbound.caught_up.is_set() and inbound.waits_on_leaders()
    asyncio.run(inbound.topics._replaced({"p.main.r1": "id-m", "p.side.r1": "id-s"}))
    assert written == [("r1", "id-m")]
    assert inbound.own_ids == {"p.main.r1": "id-m"}
    inbound.own_unsurveyed.clear()  # owntopic.when_led, once surveyed
    inbound.check_caught_up()
    assert inbound.caught_up.is_set() and not inbound.waits_on_leaders()


def test_a_re_read_waits_while_a_partition_of_its_subtree_has_no_leader() -> None:
    """Asked for that partition's start instead, the fetcher (every subtree's) waited in
    a retry loop for as long as the outage lasted (seen on three Kafka nodes: a restart
    that included paths of a subtree whose peer partition had no leader)."""
    kafka = Kafka()
    begins: list[TP] = []

    async def beginning_offsets(tps: Sequence[TP]) -> dict[TP, int]:
        begins.extend(tps)
        raise AssertionError("asked for the start of a partition without a leader")

    kafka.beginning_offsets = beginning_offsets  # type: ignore[method-assign]
    bridge = SimpleNamespace(kafka=kafka, stores={"side": object()})
    side = SimpleNamespace(subtree="side", topic="p.side.r2", assemblers={0: None})
    main = SimpleNamespace(subtree="main", topic="p.main.r2", assemblers={0: None})
    inbound = SimpleNamespace(bridge=bridge, peers={"p.side.r2": side, "p.main.r2": main})
    tc = TopicCheck(inbound)  # type: ignore[arg-type]

    async def go() -> list[bool]:
        async with asyncio.timeout(2):
            first = await tc.read_again("side", ("/local",))  # the last check saw it led
            tc._leaderless = frozenset({("p.side.r2", 0)})
            return [first, await tc.read_again("side", ("/local",))]

    with structlog.testing.capture_logs() as logs:
        assert asyncio.run(go()) == [False, False]
        # A missing topic (deleted; its origin makes it again) cannot be asked either.
        # Metadata is asked once a second at most, not at every fetch round.
        tc._leaderless = frozenset()
        tc._reread_waits["side"] -= 1.0
        asked: list[Sequence[str]] = []

        async def topic_ids(topics: Sequence[str]) -> TopicIds:
            asked.append(topics)
            return TopicIds({}, missing=frozenset({"p.side.r2"}))

        kafka.topic_ids = topic_ids  # type: ignore[method-assign]
        assert asyncio.run(tc.read_again("side", ("/local",))) is False
        assert asyncio.run(tc.read_again("side", ("/local",))) is False
        assert asked == [["p.side.r2"]]
    assert begins == []
    assert [(e["event"], e["subtree"], e["partitions"]) for e in logs] == [
        ("topic_read_again_waits", "side", "p.side.r2 partition 0")]  # once per wait


def test_a_partition_that_lost_its_leader_during_the_start_is_waited_for_as_at_its_start(
) -> None:
    """The second round of catching up (the ends as the start-up ended) asked for every
    end in a retry loop: one partition without a leader held it up, and the start said
    nothing of the outage, so systemd timed it out."""
    asked: list[list[TP]] = []

    async def readable_ends(tps: Sequence[TP]) -> dict[TP, int]:
        asked.append(list(tps))
        return dict.fromkeys(tps, 9)

    async def retry(what: str, fn: Any) -> Any:
        return await fn()

    bridge = SimpleNamespace(region="r1", stores={"main": None, "side": None}, retry=retry,
                             kafka=SimpleNamespace(readable_ends=readable_ends),
                             settings=SimpleNamespace(peers=["r2"]),
                             topic=lambda subtree, region: f"p.{subtree}.{region}")
    inbound = Inbound(bridge)  # type: ignore[arg-type]
    for peer in inbound.peers.values():
        peer.positions = {0: 7}
    inbound.catch_up_to = {("p.main.r2", 0): 7, ("p.side.r2", 0): 7}
    inbound.check_caught_up()
    inbound.topics._leaderless = frozenset({("p.side.r2", 0)})

    async def go() -> None:
        waiting = asyncio.create_task(inbound.wait_caught_up())
        await asyncio.sleep(0.05)
        assert asked == [[("p.main.r2", 0)]]
        assert inbound.catch_up_to == {("p.main.r2", 0): 9}
        assert inbound.catch_up_unknown == {("p.side.r2", 0)}
        inbound.peers["p.main.r2"].positions = {0: 9}
        inbound.check_caught_up()
        assert inbound.waits_on_leaders() and not waiting.done()
        inbound.ends_known({("p.side.r2", 0): 8})  # its leader is back
        inbound.peers["p.side.r2"].positions = {0: 8}
        inbound.check_caught_up()
        async with asyncio.timeout(1):
            await waiting

    asyncio.run(go())


def test_a_re_read_whose_starts_are_not_answered_waits_rather_than_retrying() -> None:
    """A partition that lost its leader after the last check: the broker does not
    answer for its start (aiokafka times out), and the fetcher goes on."""
    kafka = Kafka()
    kafka.leaderless = frozenset()  # not yet seen by the controller
    calls: list[TP] = []

    async def beginning_offsets(tps: Sequence[TP]) -> dict[TP, int]:
        calls.extend(tps)
        raise KafkaError("beginning offsets: no answer within 5s")

    kafka.beginning_offsets = beginning_offsets  # type: ignore[method-assign]
    side = SimpleNamespace(subtree="side", topic="p.side.r2", assemblers={0: None})
    bridge = SimpleNamespace(kafka=kafka, stores={"side": object()})
    tc = TopicCheck(SimpleNamespace(bridge=bridge, peers={"p.side.r2": side}))  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        assert asyncio.run(tc.read_again("side", ("/local",))) is False
    assert calls == [("p.side.r2", 0)]
    assert [(e["event"], e["why"]) for e in logs] == [
        ("topic_read_again_waits", "beginning offsets: no answer within 5s")]
