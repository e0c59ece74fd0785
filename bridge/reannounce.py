"""Re-announcing a subtree's state when this region's own topic lost records, or when
an overflow (``bridge.overflow``) kept changes out of the outbox.

Peers can only heal what the topic lost if the origin publishes it again:
the whole state, as ``zkbridge resync`` does, queued behind the publisher
one chunk at a time so that live batches keep flowing in between. A marker
znode survives restarts: a term that finds one finishes the job. Its data
says how much: empty, the whole state; ``since Z``, only the paths whose
metadata changed after zxid Z (an overflow's changes are all there: each
updated its path's metadata after the overflow's marker, created at Z,
and nothing else is missing from the topic).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog

from bridge import codec, failpoints
from bridge.resync import state_events
from bridge.verify import read_meta
from bridge.zk import Create, Op, SetData

if TYPE_CHECKING:
    from bridge.engine import Bridge

log = structlog.get_logger("bridge.reannounce")

LOST = "own topic lost records"
RESUMED = "left unfinished by an earlier term"


def since_of(data: bytes) -> int:
    """The zxid a marker's data names (0: the whole state, as markers before it was kept)."""
    text = data.decode("ascii", "replace")
    head, _, zxid = text.partition(" ")
    return int(zxid) if head == "since" and zxid.isdigit() else 0


def since_data(since: int) -> bytes:
    return b"since %d" % since if since else b""


class Reannouncer:
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.running: dict[str, asyncio.Task[None]] = {}
        # A step to run once the marker is written, kept across a start over.
        self._before: dict[str, Callable[[], Awaitable[int | None]]] = {}
        self._cause: dict[str, str] = {}  # why each re-announce runs, for its last log line
        # Subtrees whose re-announce must be whole (the topic lost records), even
        # if it began as an overflow's.
        self._full: set[str] = set()

    def marker(self, name: str) -> str:
        return f"{self.bridge.settings.state_path}/reannounce/{name}"

    def take_tasks(self) -> list[asyncio.Task[None]]:
        """The running re-announces, forgotten here (the term ends: the caller cancels them)."""
        tasks = list(self.running.values())
        self.running.clear()
        self._before.clear()
        self._cause.clear()
        self._full.clear()
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
                self.start(name, cause=RESUMED)

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
        await b.retry("mark re-announce", lambda: self._mark_whole(name))
        positions = b.stores[name].positions
        await b.retry("store topic id", lambda: positions.write_topic_id(b.region, new_id))
        b.inbound.own_ids[topic] = new_id

    def busy(self, name: str) -> bool:
        running = self.running.get(name)
        return running is not None and not running.done()

    def cause(self, name: str) -> str | None:
        """Why ``name``'s re-announce runs (None: none runs)."""
        return self._cause.get(name) if self.busy(name) else None

    async def read_since(self, name: str) -> int | None:
        """What ``name``'s marker asks for: None, no marker; 0, the whole state; else the
        zxid after which changed metadata is re-announced."""
        node = await self.bridge.retry("read re-announce marker",
                                       lambda: self.bridge.zk.get(self.marker(name)))
        return None if node is None else since_of(node.data)

    def marker_op(self, name: str, prior: int | None, since: int) -> Op:
        """The write that makes ``name``'s marker ask for ``since`` (``prior``: its ask now)."""
        data = since_data(since)
        marker = self.marker(name)
        return Create(marker, data) if prior is None else SetData(marker, data)

    async def _mark_whole(self, name: str) -> None:
        marker = self.marker(name)
        await self.bridge.zk.ensure_path(marker)
        await self.bridge.zk.set_data(marker, b"")  # an overflow's marker asks for less

    def start(self, name: str, before: Callable[[], Awaitable[int | None]] | None = None, *,
              cause: str = LOST) -> None:
        """Re-announce ``name``.

        ``before`` (an overflow's end, ``bridge.overflow``) writes the marker
        itself and returns what it asks for (None: nothing was kept out, no
        marker). Any other start but a resumed one re-announces the whole
        state. A re-announce started over keeps the ``before`` (and the cause)
        of the one it replaces if that has not run yet.
        """
        running = self.running.get(name)
        if running is not None and not running.done():
            running.cancel()  # it may have read the state before this loss: start over
            if self._cause.get(name, cause) != cause:
                cause = f"{self._cause[name]}, then {cause}"
        self._cause[name] = cause
        if before is not None:
            self._before[name] = before
        elif cause != RESUMED:
            self._full.add(name)
        self.running[name] = asyncio.create_task(
            self.bridge.guarded(f"reannounce[{name}]", self._run, name))

    async def _run(self, name: str) -> None:
        """Queue the subtree's state behind the publisher; a marker survives restarts."""
        b = self.bridge
        store = b.stores[name]
        marker = self.marker(name)
        whole = name in self._full
        if whole:
            # First, so that a crash in what follows still leaves a whole one to do.
            await b.retry("mark re-announce", lambda: self._mark_whole(name))
        before = self._before.get(name)
        since: int | None = None
        if before is not None:
            since = await before()
            failpoints.hit(failpoints.OVERFLOW_ENDED)
            del self._before[name]
        if whole:
            since = 0
        elif before is None:
            since = await self.read_since(name)
        if since is None:
            # An overflow that ended before any capture was kept from the outbox.
            log.info("own_topic_reannounce_skipped", subtree=name,
                     cause=self._cause.pop(name, "?"), reason="nothing was kept out")
            return
        metas = await b.retry(f"read metadata {name}",
                              lambda: read_meta(b.zk, store.layout, since=since))
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
        self._full.discard(name)
        log.warning("own_topic_reannounced", subtree=name, records=sent,
                    cause=self._cause.pop(name, "?"), since_zxid=since,
                    uncaptured=counts.get("uncaptured", 0),
                    hint="every region converges as it reads them; nothing for an operator to do")
