"""Re-announcing a subtree's whole state when this region's own topic lost records.

Peers can only heal what the topic lost if the origin publishes it again:
the whole state, as ``zkbridge resync`` does, queued behind the publisher
one chunk at a time so that live batches keep flowing in between. A marker
znode survives restarts: a term that finds one finishes the job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog

from bridge import codec, failpoints
from bridge.resync import state_events
from bridge.verify import read_meta

if TYPE_CHECKING:
    from bridge.engine import Bridge

log = structlog.get_logger("bridge.reannounce")


class Reannouncer:
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.running: dict[str, asyncio.Task[None]] = {}
        # A step to run once the marker is written, kept across a start over.
        self._before: dict[str, Callable[[], Awaitable[None]]] = {}
        self._cause: dict[str, str] = {}  # why each re-announce runs, for its last log line

    def marker(self, name: str) -> str:
        return f"{self.bridge.settings.state_path}/reannounce/{name}"

    def take_tasks(self) -> list[asyncio.Task[None]]:
        """The running re-announces, forgotten here (the term ends: the caller cancels them)."""
        tasks = list(self.running.values())
        self.running.clear()
        self._before.clear()
        self._cause.clear()
        return tasks

    async def resume(self) -> None:
        """Finish the re-announces an earlier term left unfinished (their markers remain)."""
        b = self.bridge
        for name in b.stores:
            if self.busy(name) or b.stores[name].overflow is not None:
                # Started already this term (an overflow that ended at once), or
                # an overflow's end will: once is enough, and its marker is this one.
                continue
            if await b.retry("read re-announce marker",
                             lambda n=name: b.zk.exists(self.marker(n))) is not None:  # type: ignore[misc]
                self.start(name, cause="left unfinished by an earlier term")

    def lost(self, name: str, topic: str, partition: int, published: int, end: int,
             why: str) -> None:
        """Our own topic lost records we had published: peers can only heal if we re-announce."""
        log.error("own_topic_lost_records", topic=topic, partition=partition,
                  published_position=published, end_offset=end, reason=why,
                  action="re-announcing this region's whole state (as zkbridge resync does)")
        self.bridge.incident("REANNOUNCED",
                             f"own topic {topic}[{partition}] lost records ({why}); "
                             f"re-announcing the whole state of {name}")
        self.start(name)

    async def replaced(self, name: str, topic: str, parts: dict[int, tuple[int, int]],
                       why: str, new_id: str) -> None:
        """Our own topic has a new id: whatever we published there is gone; re-announce.

        The re-announce marker is written before the new id is stored, so a
        crash in between still re-announces at the next start.
        """
        b = self.bridge
        for part, (published, end) in parts.items():
            self.lost(name, topic, part, published, end, why)
        marker = self.marker(name)
        await b.retry("mark re-announce", lambda: b.zk.ensure_path(marker))
        positions = b.stores[name].positions
        await b.retry("store topic id", lambda: positions.write_topic_id(b.region, new_id))
        b.inbound.own_ids[topic] = new_id

    def busy(self, name: str) -> bool:
        running = self.running.get(name)
        return running is not None and not running.done()

    def cause(self, name: str) -> str | None:
        """Why ``name``'s re-announce runs (None: none runs)."""
        return self._cause.get(name) if self.busy(name) else None

    def start(self, name: str, before: Callable[[], Awaitable[None]] | None = None, *,
              cause: str = "own topic lost records") -> None:
        """Re-announce ``name``; ``before`` runs once the marker is written (``bridge.overflow``).

        A re-announce started over keeps the ``before`` (and the cause) of the
        one it replaces if that has not run yet.
        """
        running = self.running.get(name)
        if running is not None and not running.done():
            running.cancel()  # it may have read the state before this loss: start over
            if self._cause.get(name, cause) != cause:
                cause = f"{self._cause[name]}, then {cause}"
        self._cause[name] = cause
        if before is not None:
            self._before[name] = before
        self.running[name] = asyncio.create_task(
            self.bridge.guarded(f"reannounce[{name}]", self._run, name))

    async def _run(self, name: str) -> None:
        """Queue the subtree's whole state behind the publisher; a marker survives restarts."""
        b = self.bridge
        store = b.stores[name]
        marker = self.marker(name)
        await b.retry("mark re-announce", lambda: b.zk.ensure_path(marker))
        before = self._before.get(name)
        if before is not None:
            await before()
            failpoints.hit(failpoints.OVERFLOW_ENDED)
            del self._before[name]
        metas = await b.retry(f"read metadata {name}", lambda: read_meta(b.zk, store.layout))
        counts: dict[str, int] = {}
        sent = 0
        last: asyncio.Event | None = None
        async for events in state_events(b.zk, store.layout, b.region, metas, counts,
                                         inc=b.incarnation):
            if last is not None:
                await last.wait()  # one chunk in flight: live batches keep flowing between
            last = asyncio.Event()
            b.outbound.enqueue(name, None, [(e.key, codec.encode(e)) for e in events],
                               reannounce=True, done=last)
            sent += len(events)
        if last is not None:
            await last.wait()
        await b.retry("clear re-announce marker", lambda: b.zk.delete(marker))
        log.warning("own_topic_reannounced", subtree=name, records=sent,
                    cause=self._cause.pop(name, "?"),
                    uncaptured=counts.get("uncaptured", 0),
                    hint="every region converges as it reads them; nothing for an operator to do")
