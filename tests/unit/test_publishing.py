"""Publishing: each subtree's queue goes to Kafka on its own, so a topic Kafka cannot
take holds back that subtree only (its changes and heartbeats), also at shutdown.

No servers: a stand-in bridge, and a Kafka whose sends to one topic wait until a
test lets them through (a partition without a leader).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import structlog

from bridge.errors import FatalKafkaError
from bridge.publishing import Outgoing, Publishing


class Kafka:
    def __init__(self, stuck: str) -> None:
        self.stuck = stuck
        self.release = asyncio.Event()
        self.sent: list[str] = []
        self.refuse = ""  # a topic whose sends fail for good

    async def send_all(self, records: Sequence[tuple[str, bytes, bytes | None]],
                       headers: Any = None) -> dict[tuple[str, int], int]:
        topics = {t for t, _, _ in records}
        if self.refuse in topics:
            raise FatalKafkaError(f"publish: not authorized to write {self.refuse}")
        if self.stuck in topics:
            await self.release.wait()
        self.sent += [k.decode() for _, k, _ in records]
        return {(t, 0): len(self.sent) for t in topics}


class Bridge:
    region = "r1"

    def __init__(self) -> None:
        outbox = SimpleNamespace(drop_empty_buckets=self.nothing)
        positions = SimpleNamespace(write=self.nothing)
        self.stores = {n: SimpleNamespace(outbox=outbox, positions=positions)
                       for n in ("a", "b")}
        self.kafka = Kafka(self.topic("b", "r1"))
        self.stats: Counter[str] = Counter()
        self.overflow = SimpleNamespace(acked=lambda subtree, size: None)
        self.inbound = SimpleNamespace(own_acked=lambda topic, part, end: None)
        self.zk = SimpleNamespace(delete_many=self.nothing)

    async def nothing(self, *args: Any) -> None:
        return None

    def topic(self, subtree: str, region: str) -> str:
        return f"p.{subtree}.{region}"

    async def retry(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        return await fn()


def publishing(b: Bridge, held: tuple[str, ...] = ()) -> Publishing:
    """A term's publishing, every subtree surveyed but ``held`` (``bridge.owntopic``)."""
    pub = Publishing(b)  # type: ignore[arg-type]
    for name, ready in pub.surveyed.items():
        if name not in held:
            ready.set()
    return pub


@asynccontextmanager
async def running(pub: Publishing) -> AsyncIterator[None]:
    task = asyncio.ensure_future(pub.publisher())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def acked(*units: Outgoing) -> None:
    async with asyncio.timeout(2):
        for u in units:
            assert u.done is not None
            await u.done.wait()


def put(pub: Publishing, subtree: str, key: str, outbox: bool = True) -> Outgoing:
    unit = Outgoing(subtree, ((key.encode(), b"v"),),
                    f"/outbox/{key}" if outbox else None, done=asyncio.Event())
    pub.queues[subtree].put_nowait(unit)
    if outbox:
        pub.queued[subtree] += 1
    return unit


def test_a_subtree_whose_topic_waits_holds_back_no_other() -> None:
    async def go() -> None:
        b = Bridge()
        pub = publishing(b)
        async with running(pub):
            stuck = put(pub, "b", "/b1")
            await asyncio.sleep(0.01)
            await acked(put(pub, "a", "/a1"), put(pub, "a", "/hb", outbox=False),
                        put(pub, "a", "/a2"))
            assert b.kafka.sent == ["/a1", "/hb", "/a2"]
            assert stuck.done is not None and not stuck.done.is_set()
            assert (pub.queued["a"], pub.queued["b"]) == (0, 1)
            b.kafka.release.set()
            await acked(stuck)
            assert pub.queued["b"] == 0 and b.stats["published:b"] == 1

    asyncio.run(go())


def test_a_drain_publishes_each_subtree_it_can_and_names_the_one_it_cannot() -> None:
    async def go() -> None:
        b = Bridge()
        pub = publishing(b)
        put(pub, "a", "/a1")
        put(pub, "b", "/b1")
        put(pub, "b", "/b2")
        with structlog.testing.capture_logs() as logs:
            await pub.drain(deadline=0.3)
        assert b.kafka.sent == ["/a1"]
        assert (b.stats["published:a"], b.stats["published:b"]) == (1, 0)
        [line] = [e for e in logs if e["event"] == "drain_incomplete"]
        assert (line["left"], line["subtrees"]) == (2, ["b"]), line

    asyncio.run(go())


@pytest.mark.parametrize("stuck", [False, True])
def test_a_drain_with_nothing_left_says_nothing(stuck: bool) -> None:
    async def go() -> None:
        b = Bridge()
        pub = publishing(b)
        put(pub, "a", "/a1")
        if stuck:
            put(pub, "b", "/hb", outbox=False)  # a heartbeat is not drained
        with structlog.testing.capture_logs() as logs:
            await pub.drain(deadline=0.3)
        assert b.kafka.sent == ["/a1"]
        assert not [e for e in logs if e["event"] == "drain_incomplete"], logs

    asyncio.run(go())


def test_a_publisher_that_fails_for_good_ends_the_others_with_its_own_error() -> None:
    async def go() -> None:
        b = Bridge()
        pub = publishing(b)
        b.kafka.refuse = b.topic("a", "r1")
        put(pub, "b", "/b1")  # waits on its topic meanwhile
        put(pub, "a", "/a1")
        with pytest.raises(FatalKafkaError, match=r"not authorized to write p\.a\.r1"):
            async with asyncio.timeout(2):
                await pub.publisher()
        assert b.kafka.sent == []

    asyncio.run(go())


def test_a_subtree_not_surveyed_publishes_nothing_until_it_is() -> None:
    async def go() -> None:
        b = Bridge()
        b.kafka.stuck = ""
        pub = publishing(b, held=("b",))
        async with running(pub):
            held = [put(pub, "b", "/b1"), put(pub, "b", "/hb", outbox=False)]
            await acked(put(pub, "a", "/a1"))
            await asyncio.sleep(0.05)
            assert b.kafka.sent == ["/a1"]
            pub.surveyed["b"].set()
            await acked(*held)
            assert b.kafka.sent == ["/a1", "/b1", "/hb"]

    asyncio.run(go())


def test_a_drain_leaves_a_subtree_not_surveyed_in_the_outbox() -> None:
    async def go() -> None:
        b = Bridge()
        b.kafka.stuck = ""
        pub = publishing(b, held=("b",))
        put(pub, "a", "/a1")
        put(pub, "b", "/b1")
        with structlog.testing.capture_logs() as logs:
            await pub.drain(deadline=0.3)
        assert b.kafka.sent == ["/a1"]
        [line] = [e for e in logs if e["event"] == "drain_incomplete"]
        assert (line["left"], line["subtrees"]) == (1, ["b"]), line
        assert "not surveyed" in line["error"], line

    asyncio.run(go())
