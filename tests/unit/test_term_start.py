"""A term's start: its two halves (the ZooKeeper scan, the Kafka checks) run at once, and it
says what it is doing."""

from __future__ import annotations

import asyncio
import socket
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from structlog.testing import capture_logs

from bridge import owntopic, twin
from bridge.errors import BridgeError, DuplicateRegionError, FencedError
from bridge.kafka.topicids import TopicIds
from bridge.owntopic import Replay, replay_progress
from bridge.startup import StartUp
from bridge.termsteps import both, unless_lost


def test_both_run_at_once_and_answer_in_order() -> None:
    order: list[str] = []

    async def step(name: str, delay: float) -> str:
        order.append(f"{name} started")
        await asyncio.sleep(delay)
        order.append(f"{name} done")
        return name

    async def main() -> tuple[str, str]:
        return await both(step("kafka", 0.05), step("scan", 0.01))

    assert asyncio.run(main()) == ("kafka", "scan")
    assert order == ["kafka started", "scan started", "scan done", "kafka done"]


def test_a_failure_cancels_the_other_and_is_raised_unwrapped() -> None:
    # The term's handlers catch FencedError and BridgeError by type: an
    # ExceptionGroup would slip past them.
    cancelled = asyncio.Event()

    async def scan() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def checks() -> None:
        await asyncio.sleep(0.01)
        raise FencedError("another bridge leads")

    async def main() -> None:
        with pytest.raises(FencedError):
            await both(checks(), scan())
        assert cancelled.is_set()

    asyncio.run(main())


def test_cancelling_the_term_cancels_both() -> None:
    stopped: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.append(name)
            raise

    async def main() -> None:
        task = asyncio.ensure_future(both(forever("kafka"), forever("scan")))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sorted(stopped) == ["kafka", "scan"]

    asyncio.run(main())


def test_a_start_that_ends_is_not_affected_by_the_lost_event() -> None:
    async def main() -> None:
        await unless_lost(asyncio.sleep(0.01), asyncio.Event())

    asyncio.run(main())


def test_a_lost_session_cancels_the_start_and_ends_the_term() -> None:
    # A term whose session expired while it started stood on until a fenced
    # write failed (chaos seed 793460): now it ends as soon as the loss is seen.
    cancelled = asyncio.Event()

    async def start() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def main() -> None:
        lost = asyncio.Event()
        asyncio.get_running_loop().call_later(0.01, lost.set)
        with pytest.raises(FencedError, match="session was lost"):
            await unless_lost(start(), lost)
        assert cancelled.is_set()

    asyncio.run(main())


def test_a_start_that_fails_raises_its_own_error() -> None:
    async def start() -> None:
        await asyncio.sleep(0.01)
        raise BridgeError("no route to the broker")

    async def main() -> None:
        with pytest.raises(BridgeError, match="no route"):
            await unless_lost(start(), asyncio.Event())

    asyncio.run(main())


# -- what a start says it is doing (status record, log) ----------------------------------


def test_a_start_says_its_steps_while_they_run_and_nothing_once_done() -> None:
    start = StartUp()
    assert not start.running and start.doing() == ()
    start.begin()
    assert start.running and start.doing() == (
        "taking over: the epoch, the region's state and outbox",)
    counted = [0]

    async def main() -> tuple[str, ...]:
        async def scan() -> tuple[str, ...]:
            counted[0] = 1234
            return start.doing()

        return await start.during("scan", lambda: f"scanning: {counted[0]:,} read", scan())

    assert asyncio.run(main()) == ("scanning: 1,234 read",)  # said when asked, counts now
    with start.step("kafka", lambda: "checking Kafka"), start.step("own", lambda: "own topic"):
        assert start.doing() == ("checking Kafka", "own topic")
    with pytest.raises(BridgeError), start.step("failing", lambda: "failing"):
        raise BridgeError("x")
    assert "failing" not in " ".join(start.doing())  # a step that failed is not shown
    assert 0 <= start.end() < 5  # seconds it took
    assert not start.running and start.doing() == () and start.end() == 0


def test_a_long_start_logs_its_progress_and_tells_systemd_until_it_ends() -> None:
    start = StartUp()
    told: list[str] = []
    start.on_progress = lambda text, moving: told.append(text)
    start.begin()

    async def main() -> None:
        reporting = asyncio.ensure_future(start.report(every=0.05, notify=0.01))
        await asyncio.sleep(0)
        with start.step("scan", lambda: "scanning critical: 5 read"):
            await asyncio.sleep(0.12)
        start.end()
        await asyncio.wait_for(reporting, 1)  # it stops by itself once the start ended

    with capture_logs() as logs:
        asyncio.run(main())
    lines = [e for e in logs if e["event"] == "start_up_progress"]
    assert len(lines) >= 1 and lines[0]["doing"] == ["scanning critical: 5 read"], logs
    # At once (before any step), then more often than the log.
    assert told[0] == "starting: taking over: the epoch, the region's state and outbox", told
    assert told.count("starting: scanning critical: 5 read") > len(lines), (told, lines)


def test_a_start_whose_description_stands_still_is_not_moving() -> None:
    start = StartUp()
    seen: list[tuple[str, bool]] = []
    start.on_progress = lambda text, moving: seen.append((text, moving))
    start.begin()
    count = [0]

    async def main() -> None:
        reporting = asyncio.ensure_future(start.report(every=10, notify=0.01, still=0.05))
        with start.step("capture", lambda: f"capturing: {count[0]}"):
            for _ in range(10):  # moving: the count changes at every tick
                count[0] += 1
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # standing still
        start.end()
        await asyncio.wait_for(reporting, 1)

    asyncio.run(main())
    assert all(moving for text, moving in seen if text.endswith(("capturing: 1",
                                                                 "capturing: 5")))
    assert seen[-1] == ("starting: capturing: 10", False), seen


def test_only_a_catch_up_waiting_on_partitions_without_a_leader_is_an_outage() -> None:
    start = StartUp()
    outage = [True]
    start.outage = lambda: outage[0]
    assert not start.waits_on_outage()  # not starting
    start.begin()
    with start.step("catch-up", lambda: "applying"):
        assert start.waits_on_outage()
        with start.step("scan:side", lambda: "scanning"):
            assert not start.waits_on_outage()  # work a restart would redo, but still work
        outage[0] = False
        assert not start.waits_on_outage()


def test_systemd_hears_ready_from_a_start_that_waits_on_an_outage_alone(
        tmp_path: Path) -> None:
    """Timed out instead, systemd restarted it every TimeoutStartSec for as long as the
    partition had no leader, and each restart dropped what it applied meanwhile."""
    from bridge.daemon import Daemon
    from bridge.notify import Notifier

    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(0.5)
        start = StartUp()
        outage = [False]
        start.outage = lambda: outage[0]
        daemon = Daemon.__new__(Daemon)
        daemon.notifier = Notifier({"NOTIFY_SOCKET": path})
        daemon.bridge = SimpleNamespace(start_up=start)  # type: ignore[assignment]
        daemon._ready_sent = False
        start.begin()
        with start.step("catch-up", lambda: "applying"), capture_logs() as logs:
            daemon._on_start_progress("starting: applying: 3 to go", True)
            assert sock.recv(4096).decode() == (
                "EXTEND_TIMEOUT_USEC=30000000\nSTATUS=starting: applying: 3 to go")
            daemon._on_start_progress("starting: applying: 0 to go, waiting", False)
            assert sock.recv(4096).decode() == "STATUS=starting: applying: 0 to go, waiting"
            outage[0] = True
            daemon._on_start_progress("starting: applying: 0 to go, waiting", False)
            assert sock.recv(4096).decode() == (
                "READY=1\nSTATUS=starting: applying: 0 to go, waiting")
            daemon._on_start_progress("starting: applying: 0 to go, waiting", False)
            assert sock.recv(4096).decode() == "STATUS=starting: applying: 0 to go, waiting"
        assert [e["event"] for e in logs] == ["systemd_ready_before_caught_up"]


def test_a_replay_of_the_own_topic_counts_the_records_read() -> None:
    tp = ("zkb.critical.r1", 0)
    todo = Replay("critical", {tp: 100}, {tp: 2600})
    assert replay_progress(todo, {tp: 100}) == (
        "replaying critical from this region's own topic: 0 of 2,500 records read")
    # Records this term published past the end are read too, not counted.
    assert replay_progress(todo, {tp: 2700}).endswith(": 2,500 of 2,500 records read")


# -- a subtree whose own partition had no leader as the term began ------------------------

TP = ("zkb.side.r1", 0)


class Held:
    """Stand-ins around ``owntopic.when_led``: the partition gets a leader at the
    third ask; the own reader then returns ``records`` once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, records: list[str]) -> None:
        self.steps: list[str] = []
        self.asks = 0
        self.records = records
        self.surveyed = {"main": asyncio.Event(), "side": asyncio.Event()}
        self.caught: list[bool] = []
        self.read = asyncio.Event()
        self.inbound = SimpleNamespace(own_unsurveyed={"side"}, own_max_end={},
                                       check_caught_up=lambda: self.caught.append(True),
                                       own_record=self.own_record)
        kafka = SimpleNamespace(topic_ids=self.topic_ids)
        self.bridge = SimpleNamespace(region="r1", kafka=kafka, retry=self.retry,
                                      inbound=self.inbound,
                                      outbound=SimpleNamespace(surveyed=self.surveyed),
                                      topic=lambda n, r: f"zkb.{n}.{r}")
        monkeypatch.setattr(owntopic, "LEADER_POLL", 0.01)
        monkeypatch.setattr(owntopic, "own_reader", self.reader)
        monkeypatch.setattr(twin, "check", self.check)
        monkeypatch.setattr(owntopic, "survey", self.survey)
        monkeypatch.setattr(owntopic, "replay", self.replay)

    async def topic_ids(self, topics: list[str]) -> TopicIds:
        self.asks += 1
        return TopicIds(leaderless=frozenset({TP} if self.asks < 3 else set()))

    @asynccontextmanager
    async def reader(self, b: object):  # type: ignore[no-untyped-def]
        async def assign(positions: dict[tuple[str, int], int]) -> None:
            self.steps.append(f"read on from {positions}")

        async def fetch(timeout_ms: int, most: int) -> list[str]:
            await asyncio.sleep(0.01)
            out, self.records = self.records, []
            return out

        yield SimpleNamespace(assign=assign, fetch=fetch)

    async def check(self, b: object, r: object, names: list[str]) -> dict[tuple[str, int], int]:
        self.steps.append(f"twin check {names}")
        return {TP: 7}

    async def survey(self, b: object, fresh: bool, r: object, names: list[str],
                     ends: dict[tuple[str, int], int], ids: TopicIds) -> owntopic.Survey:
        # The ids the poll read (the one that found a leader) serve the survey.
        assert not ids.leaderless and self.asks == 3
        self.steps.append(f"survey {names} {ends}")
        return owntopic.Survey(ends, (owntopic.Replay("side", {TP: 5}, {TP: 7}),))

    async def replay(self, b: object, found: owntopic.Survey) -> None:
        self.steps.append(f"replay {len(found.replays)}")
        assert not self.surveyed["side"].is_set()  # publishing waits for the replay

    async def retry(self, what: str, fn):  # type: ignore[no-untyped-def]
        return await fn()

    def own_record(self, rec: str) -> None:
        self.steps.append(f"own record {rec}")
        self.read.set()
        if rec == "twin":
            raise DuplicateRegionError("a second ensemble publishes as r1")


def test_a_held_subtree_is_surveyed_once_its_partition_has_a_leader_then_publishes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing of it is checked or published before; the others are not waited for.
    Its topic is then read on for a second ensemble's records."""
    held = Held(monkeypatch, ["ours"])

    async def main() -> None:
        task = asyncio.ensure_future(owntopic.when_led(held.bridge, False))  # type: ignore[arg-type]
        async with asyncio.timeout(2):
            await held.surveyed["side"].wait()
            await held.read.wait()
        assert not task.done()  # it reads on for the rest of the term
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with capture_logs() as logs:
        asyncio.run(main())
    assert held.asks == 3  # asked until the partition had a leader
    assert held.steps == ["twin check ['side']", "survey ['side'] {('zkb.side.r1', 0): 7}",
                          "replay 1", "read on from {('zkb.side.r1', 0): 7}",
                          "own record ours"]
    assert held.surveyed["side"].is_set() and not held.surveyed["main"].is_set()
    assert held.inbound.own_unsurveyed == set() and held.inbound.own_max_end == {TP: 7}
    assert held.caught
    [line] = [e for e in logs if e["event"] == "own_topic_surveyed"]
    assert line["subtrees"] == ["side"] and line["replayed"] == 2, line


def test_a_second_ensemble_seen_later_on_a_held_subtree_s_topic_ends_the_term(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Raised as itself (the bridge exits 4), not inside an exception group."""
    held = Held(monkeypatch, ["twin"])
    with pytest.raises(DuplicateRegionError, match="second ensemble"):
        asyncio.run(asyncio.wait_for(owntopic.when_led(held.bridge, False), 2))  # type: ignore[arg-type]
