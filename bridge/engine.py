"""The two replication pipelines of one region's bridge, and their supervision.

Outbound: watches and scans → capture (metadata + outbox, one multi) →
publisher (Kafka, acks=all) → outbox entry removed.
Inbound: peer topics → decode and contain → apply (content + metadata, one
multi) → positions stored in ZooKeeper → mirrored to the consumer group.

Work on one path is serialised by a per-path lock; retriable errors back off
and retry, everything else stops the bridge (systemd restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from bridge import codec, failpoints
from bridge.clock import HybridClock
from bridge.config import Settings
from bridge.errors import BridgeError, CodecError, VersionConflict
from bridge.kafka import Kafka, Record, topic_name
from bridge.model import Event, Op, VectorClock
from bridge.scan import Scanner
from bridge.store import Captured, Layout, Outcome, SubtreeStore
from bridge.zk import Watch, ZooKeeper, gather_limited

log = structlog.get_logger("bridge.engine")

T = TypeVar("T")

APPLY_CONCURRENCY = 32
FETCH_MAX_RECORDS = 1000
CONFLICTS_KEPT = 1000


class PathLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: tuple[str, str]) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


@dataclass
class PeerState:
    """What the inbound pipeline knows about one (subtree, peer) stream."""

    subtree: str
    peer: str
    topic: str
    positions: dict[int, int] = field(default_factory=dict)
    last_heartbeat_ms: int = 0
    last_event_ms: int = 0


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    key: bytes
    payload: bytes
    outbox_path: str
    subtree: str


class Bridge:
    def __init__(self, settings: Settings, *, allow_mass_delete: bool = False) -> None:
        self.settings = settings
        self.region = settings.region
        self.allow_mass_delete = allow_mass_delete
        self.zk = ZooKeeper(settings.zookeeper)
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self.kafka = Kafka(settings.kafka, client_id=f"zkbridge-{self.region}")
        self.clock = HybridClock()
        self.stats: Counter[str] = Counter()
        self.locks = PathLocks()
        self.stores: dict[str, SubtreeStore] = {}
        self.scanners: dict[str, Scanner] = {}
        self.peers: dict[str, PeerState] = {}  # by topic
        self._outgoing: asyncio.Queue[Outgoing] = asyncio.Queue()
        self._work: dict[str, asyncio.Queue[tuple[Watch, str]]] = {}
        self._pending: dict[str, set[tuple[Watch, str]]] = {}
        self._rescan = asyncio.Event()
        self._stop = asyncio.Event()
        self._fatal: BaseException | None = None
        self.ready = asyncio.Event()
        for st in settings.subtrees:
            layout = Layout(settings.state_path, st.name, st.path)
            store = SubtreeStore(
                self.zk,
                layout,
                region=self.region,
                clock=self.clock,
                max_data_bytes=settings.max_data_bytes,
                exclude=st.exclude,
            )
            self.stores[st.name] = store
            self.scanners[st.name] = Scanner(store, settings.mass_delete)
            self._work[st.name] = asyncio.Queue()
            self._pending[st.name] = set()
            for peer in settings.peers:
                topic = self.topic(st.name, peer)
                self.peers[topic] = PeerState(st.name, peer, topic)

    def topic(self, subtree: str, region: str) -> str:
        return topic_name(self.settings.kafka.topic_prefix, subtree, region)

    # -- lifecycle -----------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Run until ``stop()`` or a fatal error (re-raised)."""
        try:
            await self._start()
            tasks = [
                asyncio.create_task(self._guarded("publisher", self._publisher)),
                asyncio.create_task(self._guarded("consumer", self._consumer)),
                asyncio.create_task(self._guarded("heartbeat", self._heartbeats)),
                asyncio.create_task(self._guarded("rescan", self._rescanner)),
            ]
            tasks += [
                asyncio.create_task(self._guarded(f"capture[{n}]", self._capture_worker, n))
                for n in self.stores
            ]
            self.ready.set()
            log.info("bridge_ready", region=self.region, subtrees=list(self.stores),
                     peers=list(self.settings.peers))
            await self._stop.wait()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._fatal is None:
                await self._drain_outbox()
        finally:
            await self.kafka.stop()
            await self.zk.stop()
        if self._fatal is not None:
            raise self._fatal

    async def _guarded(self, name: str, fn: Callable[..., Awaitable[None]], *args: str) -> None:
        try:
            await fn(*args)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.error("task_failed", task=name, error=str(exc), error_type=type(exc).__name__,
                      exc_info=not isinstance(exc, BridgeError))
            self._fatal = exc
            self._stop.set()

    async def _start(self) -> None:
        s = self.settings
        await self._retry("connect to ZooKeeper", self.zk.start)
        epoch = await self.zk.take_epoch(f"{s.state_path}/epoch", self.identity.encode())
        log.info("epoch_taken", epoch=epoch, identity=self.identity,
                 session=f"{self.zk.session_id or 0:#x}")
        await self._register_member()
        fresh = await self._incarnation()
        for store in self.stores.values():
            await store.setup()
        self.zk.on_watch(self._on_watch)
        self.zk.on_session(self._on_session)
        own = [self.topic(n, self.region) for n in self.stores]
        created = await self._retry("create topics", lambda: self.kafka.ensure_topics(
            own + list(self.peers)))
        if created:
            log.info("topics_created", topics=created)
        await self._retry("start producer", self.kafka.start_producer)
        await self._replay_own_topics(fresh)
        for store in self.stores.values():
            for path, payload in await store.pending_outbox():
                self._enqueue_outbox(store.layout.name, path, payload)
        for name in self.stores:
            await self._scan(name)
        await self._retry("start consumer", lambda: self.kafka.start_consumer(
            f"{s.kafka.topic_prefix}.{self.region}"))
        positions: dict[tuple[str, int], int | None] = {}
        for topic, peer in self.peers.items():
            peer.positions = await self.stores[peer.subtree].read_positions(peer.peer)
            for part in await self.kafka.partitions(topic):
                positions[(topic, part)] = peer.positions.get(part)
        await self.kafka.assign(positions)

    @property
    def member_path(self) -> str:
        return f"{self.settings.state_path}/members/{self.identity}"

    async def _register_member(self) -> None:
        """An ephemeral znode per running bridge: who is alive, seen by status and tests."""
        await self.zk.ensure_path(f"{self.settings.state_path}/members")
        member = {"identity": self.identity, "region": self.region,
                  "session": f"{self.zk.session_id or 0:#x}"}
        # Already there when this same session registered it before a reconnect.
        with contextlib.suppress(VersionConflict):
            await self.zk.create(self.member_path, json.dumps(member).encode(), ephemeral=True)

    async def _incarnation(self) -> bool:
        """Mark this ensemble's state; True when it was missing (new or wiped ensemble)."""
        path = f"{self.settings.state_path}/incarnation"
        if await self.zk.get(path) is not None:
            return False
        await self.zk.ensure_path(self.settings.state_path)
        try:
            await self.zk.create(path, uuid.uuid4().hex.encode())
        except BridgeError:
            return False
        log.warning("state_initialised", state_path=self.settings.state_path,
                    hint="new or wiped ensemble: rebuilding from the topics")
        return True

    async def _retry(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Retry retriable failures with capped exponential backoff until stopped."""
        delay = 0.1
        while True:
            try:
                return await fn()
            except BridgeError as exc:
                if not exc.retriable or self._stop.is_set():
                    raise
                self.stats["retries"] += 1
                log.warning("retrying", what=what, error=str(exc), delay=round(delay, 2))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- own topics: restore what this region published before a wipe ------
    async def _replay_own_topics(self, fresh: bool) -> None:
        """Re-apply this region's own published events it may no longer hold.

        A wiped or restored ensemble lost writes that only its own topic still
        records (peers applied them but never re-publish). The replay starts
        at the stored publish position (0 when the state is new) and stops at
        the end offset seen now; everything already held is skipped as equal.
        """
        reader = Kafka(self.settings.kafka, client_id=f"zkbridge-{self.region}-replay")
        await self._retry("start replay consumer", lambda: reader.start_consumer(None))
        try:
            for name, store in self.stores.items():
                topic = self.topic(name, self.region)
                parts = await reader.partitions(topic)
                stored = {} if fresh else await store.read_positions(self.region)
                ends = await reader.end_offsets([(topic, p) for p in parts])
                start = {(topic, p): stored.get(p, 0) for p in parts}
                todo = {tp: end for tp, end in ends.items() if end > start[tp]}
                if not todo:
                    continue
                log.info("replaying_own_topic", topic=topic,
                         events=sum(e - start[tp] for tp, e in todo.items()))
                await reader.assign({tp: start[tp] for tp in todo})
                done: dict[tuple[str, int], int] = {}
                while any(done.get(tp, start[tp]) < end for tp, end in todo.items()):
                    for rec in await reader.fetch(500, FETCH_MAX_RECORDS):
                        done[(rec.topic, rec.partition)] = rec.offset + 1
                        event = self._decode(rec, name, self.region)
                        if event is not None and event.op is not Op.HEARTBEAT:
                            await self._apply(store, event)
                await store.write_positions(self.region, {p: o for (_, p), o in done.items()})
        finally:
            await reader.stop()

    # -- outbound --------------------------------------------------------
    def _on_watch(self, kind: Watch, path: str, deleted: bool) -> None:
        for name, store in self.stores.items():
            rel = store.layout.rel_of(path)
            if rel is None:
                continue
            if deleted:
                self.scanners[name].forget(rel)
            self._schedule(name, kind, rel)
            return

    def _schedule(self, subtree: str, kind: Watch, rel: str) -> None:
        item = (kind, rel)
        if item in self._pending[subtree]:
            return  # already queued: one capture sees the latest state anyway
        self._pending[subtree].add(item)
        self._work[subtree].put_nowait(item)

    def _on_session(self, state: str, new_session: bool) -> None:
        log.info("zookeeper_session", state=state, new_session=new_session)
        if state == "CONNECTED" and self.ready.is_set():
            # Watches may have been lost and nothing was delivered while away.
            self._rescan.set()

    async def _rescanner(self) -> None:
        while True:
            await self._rescan.wait()
            self._rescan.clear()
            await self._retry("register member", self._register_member)
            for name in self.stores:
                await self._retry(f"rescan {name}", lambda n=name: self._scan(n))  # type: ignore[misc]

    async def _scan(self, name: str) -> None:
        scanner = self.scanners[name]
        result = await self._retry(
            f"scan {name}", lambda: scanner.scan(allow_mass_delete=self.allow_mass_delete)
        )
        self.stats["scans"] += 1
        log.info("scan_done", subtree=name, znodes=result.znodes, changes=len(result.changed),
                 seconds=round(result.seconds, 3))
        for rel in result.changed:
            await self._capture(name, rel)

    async def _capture_worker(self, name: str) -> None:
        queue, pending = self._work[name], self._pending[name]
        while True:
            kind, rel = await queue.get()
            pending.discard((kind, rel))
            if kind is Watch.CHILDREN:
                changed = await self._retry(
                    f"list {rel}", lambda r=rel: self.scanners[name].children_changed(r)  # type: ignore[misc]
                )
                for child in changed:
                    self._schedule(name, Watch.DATA, child)
            else:
                await self._capture(name, rel)

    async def _capture(self, name: str, rel: str) -> None:
        store = self.stores[name]
        async with self.locks.hold((name, rel)):
            captured = await self._retry(f"capture {rel}", lambda: store.capture(rel))
        self._published_locally(name, captured)
        present = await self._retry(f"exists {rel}", lambda: store.zk.exists(
            store.layout.znode(rel)))
        if present is not None and not present.ephemeral:
            for child in await self._retry(
                f"watch {rel}", lambda: self.scanners[name].ensure_watched(rel)
            ):
                self._schedule(name, Watch.DATA, child)

    def _published_locally(self, name: str, captured: list[Captured]) -> None:
        for c in captured:
            self.stats["captured"] += 1
            failpoints.hit(failpoints.AFTER_OUTBOX_WRITE)
            self._enqueue_outbox(name, c.outbox_path, c.payload)

    def _enqueue_outbox(self, subtree: str, path: str, payload: bytes) -> None:
        try:
            key = codec.decode(payload).key
        except CodecError:
            key = b"/"
        self._outgoing.put_nowait(
            Outgoing(self.topic(subtree, self.region), key, payload, path, subtree)
        )

    async def _publisher(self) -> None:
        while True:
            batch = [await self._outgoing.get()]
            while not self._outgoing.empty() and len(batch) < 500:
                batch.append(self._outgoing.get_nowait())
            await self._publish(batch)

    async def _publish(self, batch: list[Outgoing]) -> None:
        ends = await self._retry(
            "publish", lambda: self.kafka.send_all([(o.topic, o.key, o.payload) for o in batch])
        )
        self.stats["published"] += len(batch)
        failpoints.hit(failpoints.AFTER_PUBLISH)
        await self._retry("outbox delete", lambda: gather_limited(
            [self.zk.delete(o.outbox_path) for o in batch], 64))
        for (topic, part), end in ends.items():
            subtree = next(o.subtree for o in batch if o.topic == topic)
            store = self.stores[subtree]
            await self._retry("store publish position", lambda s=store, p=part, e=end:
                              s.write_positions(self.region, {p: e}))  # type: ignore[misc]

    async def _drain_outbox(self, deadline: float = 10.0) -> None:
        """On shutdown, publish what is queued; what is left stays in the outbox."""
        batch: list[Outgoing] = []
        while not self._outgoing.empty():
            batch.append(self._outgoing.get_nowait())
        if batch:
            try:
                await asyncio.wait_for(self._publish(batch), deadline)
            except (TimeoutError, BridgeError) as exc:
                log.warning("drain_incomplete", left=len(batch), error=str(exc),
                            hint="kept in the outbox; published at next start")

    # -- heartbeats --------------------------------------------------------
    async def _heartbeats(self) -> None:
        interval = self.settings.heartbeat_interval
        while True:
            records = []
            for name in self.stores:
                hb = Event(
                    origin=self.region,
                    subtree=name,
                    path="/",
                    op=Op.HEARTBEAT,
                    vc=VectorClock(),
                    ts=self.clock.now(),
                    writer=self.region,
                )
                records.append((self.topic(name, self.region), hb.key, codec.encode(hb)))
            try:
                await self.kafka.send_all(records)
                self.stats["heartbeats_sent"] += len(records)
            except BridgeError as exc:
                if not exc.retriable:
                    raise
                log.warning("heartbeat_failed", error=str(exc))
            await asyncio.sleep(interval)

    # -- inbound -----------------------------------------------------------
    async def _consumer(self) -> None:
        sem = asyncio.Semaphore(APPLY_CONCURRENCY)
        while True:
            records = await self._retry(
                "fetch", lambda: self.kafka.fetch(500, FETCH_MAX_RECORDS)
            )
            if not records:
                continue
            touched: dict[str, dict[int, int]] = {}

            async def one(rec: Record) -> None:
                peer = self.peers[rec.topic]
                event = self._decode(rec, peer.subtree, peer.peer)
                if event is None:
                    return
                if event.op is Op.HEARTBEAT:
                    peer.last_heartbeat_ms = max(peer.last_heartbeat_ms, rec.timestamp_ms)
                    return
                peer.last_event_ms = rec.timestamp_ms
                async with sem:
                    await self._apply(self.stores[peer.subtree], event)

            await asyncio.gather(*(one(r) for r in records))
            failpoints.hit(failpoints.AFTER_APPLY)
            for rec in records:
                parts = touched.setdefault(rec.topic, {})
                parts[rec.partition] = max(parts.get(rec.partition, 0), rec.offset + 1)
            await self._store_positions(touched)

    async def _store_positions(self, touched: dict[str, dict[int, int]]) -> None:
        commit: dict[tuple[str, int], int] = {}
        for topic, parts in touched.items():
            peer = self.peers[topic]
            peer.positions.update(parts)
            store = self.stores[peer.subtree]
            await self._retry("store positions", lambda s=store, p=peer:
                              s.write_positions(p.peer, dict(p.positions)))  # type: ignore[misc]
            commit.update({(topic, p): o for p, o in parts.items()})
        try:
            await self.kafka.commit(commit)
        except BridgeError as exc:
            # Only a mirror for external tools: the positions in ZooKeeper rule.
            self.stats["group_commit_failed"] += 1
            log.debug("group_commit_failed", error=str(exc))

    def _decode(self, rec: Record, subtree: str, origin: str) -> Event | None:
        """Decode and contain one record: anything off is counted, logged and skipped."""
        reason = ""
        event = None
        try:
            if rec.value is None:
                raise CodecError("malformed", "null value (tombstone)")
            event = codec.decode(rec.value)
            if event.origin != origin:
                reason = "unknown_origin"
            elif event.subtree != subtree:
                reason = "wrong_subtree"
        except CodecError as exc:
            reason = exc.reason
            detail = str(exc)
        else:
            detail = f"origin={event.origin} subtree={event.subtree}"
        if reason:
            self.stats[f"rejected.{reason}"] += 1
            log.warning("event_rejected", reason=reason, topic=rec.topic,
                        partition=rec.partition, offset=rec.offset, detail=detail)
            return None
        return event

    async def _apply(self, store: SubtreeStore, event: Event) -> None:
        failpoints.hit(failpoints.BEFORE_APPLY)
        name = store.layout.name
        async with self.locks.hold((name, event.path)):
            outcome, captured = await self._retry(
                f"apply {event.path}", lambda: store.apply(event)
            )
        self._published_locally(name, captured)
        self.stats[f"apply.{outcome.value}"] += 1
        if outcome in (Outcome.CONFLICT_LOCAL, Outcome.CONFLICT_REMOTE):
            self.stats["conflicts"] += 1
            log.info("conflict_resolved", subtree=name, path=event.path,
                     winner="remote" if outcome is Outcome.CONFLICT_REMOTE else "local",
                     remote_writer=event.writer)
            if self.stats["conflicts"] % 100 == 0:
                await self._retry("trim conflicts", lambda: store.trim_conflicts(CONFLICTS_KEPT))
        elif outcome is Outcome.OVERSIZED:
            log.warning("event_oversized", subtree=name, path=event.path,
                        size=len(event.data or b""))

