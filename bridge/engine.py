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
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

import structlog

from bridge import codec, failpoints
from bridge.clock import HybridClock
from bridge.config import Settings
from bridge.election import Election
from bridge.errors import BridgeError, CodecError, FencedError, VersionConflict
from bridge.kafka import Kafka, Record, topic_name
from bridge.model import Event, Op, VectorClock
from bridge.scan import Scanner
from bridge.status import STATUS_INTERVAL, PeerStatus, Status, health, now_ms
from bridge.store import Captured, Layout, Outcome, SubtreeStore
from bridge.zk import Create, SetData, Watch, ZooKeeper, gather_limited
from bridge.zk import Op as ZkOp

log = structlog.get_logger("bridge.engine")

T = TypeVar("T")

APPLY_CONCURRENCY = 32
CAPTURE_CONCURRENCY = 16
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
        self._lost = asyncio.Event()
        self._caught_up = asyncio.Event()
        self._catch_up_to: dict[tuple[str, int], int] = {}
        self._own_ends: dict[str, dict[int, int]] = {}
        self._own_written = 0.0
        self._stop = asyncio.Event()
        self.role = "starting"
        self.epoch = 0
        self.started_ms = int(time.time() * 1000)
        self.errors: deque[dict[str, object]] = deque(maxlen=20)
        self._tasks: set[asyncio.Future[None]] = set()
        self.election = Election(self.zk, f"{settings.state_path}/election", self.identity,
                                 retry=self._retry, on_standby=self._standing_by)
        self._queued: Counter[str] = Counter()
        self.scan_seconds: dict[str, float] = {}  # outbox entries not yet acked, per subtree
        self.on_role: Callable[[str], None] = lambda role: None
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
        """Run until ``stop()`` or a fatal error (re-raised).

        Standby until elected; then lead until stopped, fenced, or the
        session is lost, and go back to standby.
        """
        try:
            await self._retry("connect to ZooKeeper", self.zk.start)
            self.zk.on_watch(self._on_watch)
            self.zk.on_session(self._on_session)
            await self._register_member()
            self._background(self._connection_watchdog())
            while not self._stop.is_set() and self._fatal is None:
                self.role = "candidate"
                elected = asyncio.create_task(self.election.wait())
                stopping = asyncio.create_task(self._stop.wait())
                await asyncio.wait({elected, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not elected.done():
                    elected.cancel()
                    break
                elected.result()
                await self._lead()
        finally:
            # --- prompt stop (issue 7): the daemon cancels run() when a stop
            # outlasts its grace; the clients must still close in order (kazoo
            # cannot close a client whose stop is still running in a thread).
            closing = asyncio.ensure_future(self._close_clients())
            try:
                await asyncio.shield(closing)
            except asyncio.CancelledError:
                await closing
                raise
            # --- end prompt stop
        if self._fatal is not None:
            raise self._fatal

    async def _close_clients(self) -> None:
        await self.kafka.stop()
        await self.zk.stop()

    def _standing_by(self, leader: str) -> None:
        if self.role != "standby":
            self.role = "standby"
            log.info("standby", identity=self.identity, leader_candidate=leader)
            self.on_role(self.role)

    async def _lead(self) -> None:
        """One leadership term: take the epoch, run both pipelines until it ends."""
        self._lost.clear()
        self.kafka = Kafka(self.settings.kafka, client_id=f"zkbridge-{self.region}")
        tasks: list[asyncio.Task[None]] = []
        try:
            await self._start()
            # Publishing runs while the startup scan captures, so peers see
            # changes as they are found rather than after the whole scan.
            tasks = [
                asyncio.create_task(self._guarded("publisher", self._publisher)),
                asyncio.create_task(self._guarded("heartbeat", self._heartbeats)),
                asyncio.create_task(self._guarded("status", self._status_writer)),
            ]
            # Several workers per subtree: captures of different paths overlap
            # their ZooKeeper round trips; the per-path lock keeps each path serial.
            tasks += [
                asyncio.create_task(self._guarded(f"capture[{n}]", self._capture_worker, n))
                for n in self.stores
                for _ in range(CAPTURE_CONCURRENCY)
            ]
            # Applying starts after the scan, so the mass-delete breaker sees
            # local deletions before any remote event could announce them.
            for name in self.stores:
                await self._scan(name)
            tasks += [
                asyncio.create_task(self._guarded("consumer", self._consumer)),
                asyncio.create_task(self._guarded("rescan", self._rescanner)),
            ]
            self.role = "leader"
            # Ready means caught up: serving the latest state, not replaying a backlog.
            waits = {asyncio.ensure_future(self._caught_up.wait()),
                     asyncio.ensure_future(self._stop.wait()),
                     asyncio.ensure_future(self._lost.wait())}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            self.ready.set()
            log.info("bridge_ready", region=self.region, subtrees=list(self.stores),
                     peers=list(self.settings.peers), epoch=self.epoch)
            self.on_role(self.role)
            ended = {asyncio.ensure_future(self._stop.wait()),
                     asyncio.ensure_future(self._lost.wait())}
            await asyncio.wait(ended, return_when=asyncio.FIRST_COMPLETED)
            for end in ended:
                end.cancel()
        except FencedError as exc:
            self._lost.set()
            log.warning("leadership_lost", reason=str(exc))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._lost.is_set():
                log.warning("leadership_lost", epoch=self.epoch,
                            action="stopped publishing and applying; standing by")
                self.zk.fence = None
            elif self._fatal is None:
                await self._drain_outbox()
                # Leave a fresh record behind: `lag` and `status` read it while we are down.
                with contextlib.suppress(BridgeError):
                    await self._write_status()
            await self.kafka.stop()
            self._reset_term()

    def _reset_term(self) -> None:
        """Forget in-memory work of a term: the next leader reads it back from ZooKeeper."""
        self._outgoing = asyncio.Queue()
        self._queued.clear()
        self._caught_up.clear()
        for name in self.stores:
            self._work[name] = asyncio.Queue()
            self._pending[name] = set()
            self.scanners[name].reset()
        self.ready.clear()

    async def _guarded(self, name: str, fn: Callable[..., Awaitable[None]], *args: str) -> None:
        try:
            await fn(*args)
        except asyncio.CancelledError:
            raise
        except FencedError as exc:
            # Another bridge leads now: step down, never write again this term.
            log.warning("fenced", task=name, error=str(exc))
            self._lost.set()
        except BaseException as exc:
            log.error("task_failed", task=name, error=str(exc), error_type=type(exc).__name__,
                      exc_info=not isinstance(exc, BridgeError))
            self._fatal = exc
            self._stop.set()

    async def _start(self) -> None:
        s = self.settings
        self.epoch = await self.zk.take_epoch(f"{s.state_path}/epoch", self.identity.encode())
        log.info("epoch_taken", epoch=self.epoch, identity=self.identity,
                 session=f"{self.zk.session_id or 0:#x}")
        fresh = await self._incarnation()
        for store in self.stores.values():
            await store.setup()
        own = [self.topic(n, self.region) for n in self.stores]
        created = await self._retry("create topics", lambda: self.kafka.ensure_topics(
            own + list(self.peers)))
        if created:
            log.info("topics_created", topics=created)
        await self._retry("start producer", self.kafka.start_producer)
        await self._replay_own_topics(fresh)
        for store in self.stores.values():
            for path, payload in await store.pending_outbox():
                # Left by an earlier run: only the stored payload knows its key.
                try:
                    key = codec.decode(payload).key
                except CodecError:
                    key = b"/"
                self._enqueue_outbox(store.layout.name, path, payload, key)
        await self._retry("start consumer", lambda: self.kafka.start_consumer(
            f"{s.kafka.topic_prefix}.{self.region}"))
        positions: dict[tuple[str, int], int | None] = {}
        for topic, peer in self.peers.items():
            peer.positions = await self.stores[peer.subtree].read_positions(peer.peer)
            for part in await self.kafka.partitions(topic):
                positions[(topic, part)] = peer.positions.get(part)
        await self.kafka.assign(positions)
        # Caught up = applied what the peers had published when this term began
        # (an empty fetch is not a usable signal: heartbeats never stop).
        self._catch_up_to = await self._retry(
            "end offsets", lambda: self.kafka.end_offsets(list(positions)))
        self._check_caught_up()

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
                self.note_error(what, str(exc))
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
        if state == "LOST" and self.role == "leader":
            # The session held our candidate znode: someone else may lead now.
            self._lost.set()
        if state == "CONNECTED" and new_session:
            # The ephemeral member znode died with the old session.
            self._background(self._retry("register member", self._register_member))
        if state == "CONNECTED" and self.ready.is_set():
            # Watches may have been lost and nothing was delivered while away.
            self._rescan.set()

    def reload(self, new: Settings) -> tuple[list[str], list[str]]:
        """Apply what can change without a restart; return (applied, needs restart) keys."""
        old = self.settings
        restart = [k for k in ("region", "zookeeper", "kafka", "peers", "state_path",
                               "max_data_bytes", "metrics_listen")
                   if getattr(old, k) != getattr(new, k)]
        if [(s.name, s.path) for s in old.subtrees] != [(s.name, s.path) for s in new.subtrees]:
            restart.append("subtrees")
        applied = [k for k in ("heartbeat_interval", "conflict_policy", "mass_delete",
                               "log_format", "log_level") if getattr(old, k) != getattr(new, k)]
        subtrees = old.subtrees
        if "subtrees" not in restart:
            subtrees = new.subtrees
            for st_old, st_new in zip(old.subtrees, new.subtrees, strict=True):
                if st_old.exclude != st_new.exclude:
                    applied.append(f"subtrees[{st_new.name}].exclude")
                    self.stores[st_new.name].exclude = tuple(st_new.exclude)
                    # Newly included paths were never watched: look at everything again.
                    self._rescan.set()
        for scanner in self.scanners.values():
            scanner.mass_delete = new.mass_delete
        self.settings = replace(
            old, heartbeat_interval=new.heartbeat_interval, conflict_policy=new.conflict_policy,
            mass_delete=new.mass_delete, log_format=new.log_format, log_level=new.log_level,
            subtrees=subtrees,
        )
        return applied, restart

    async def _connection_watchdog(self) -> None:
        """Restart the ZooKeeper client after a disconnection that does not heal.

        kazoo reconnects by itself through ordinary outages; what it cannot get
        past is an ensemble that lost its data (wiped, restored from an old
        backup), which refuses a client that has seen later transactions.
        """
        limit = max(15.0, 3 * self.settings.zookeeper.session_timeout)
        down_since: float | None = None
        while not self._stop.is_set():
            await asyncio.sleep(1.0)
            if self.zk.connected:
                down_since = None
                continue
            now = time.monotonic()
            down_since = down_since or now
            if now - down_since < limit:
                continue
            log.warning("zookeeper_client_restart", disconnected_for=round(now - down_since, 1),
                        hint="the ensemble may have been wiped or restored; reconnecting afresh")
            self.note_error("zookeeper", f"disconnected for {now - down_since:.0f}s; restarted")
            if self.role == "leader":
                self._lost.set()
            try:
                await self.zk.restart()
            except Exception as exc:  # the next round tries again
                log.warning("zookeeper_client_restart_failed", error=str(exc))
            down_since = None

    def _background(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # keep a reference until done, or it may be collected
        task.add_done_callback(self._tasks.discard)

    def note_error(self, what: str, error: str) -> None:
        """Remember a recent problem for ``zkbridge status``."""
        self.errors.append({"at_ms": int(time.time() * 1000), "what": what, "error": error})

    async def _rescanner(self) -> None:
        while True:
            await self._rescan.wait()
            self._rescan.clear()
            for name in self.stores:
                await self._retry(f"rescan {name}", lambda n=name: self._scan(n))  # type: ignore[misc]

    async def _scan(self, name: str) -> None:
        scanner = self.scanners[name]
        result = await self._retry(
            f"scan {name}", lambda: scanner.scan(allow_mass_delete=self.allow_mass_delete)
        )
        self.stats[f"scans:{name}"] += 1
        self.scan_seconds[name] = result.seconds
        log.info("scan_done", subtree=name, znodes=result.znodes, changes=len(result.changed),
                 seconds=round(result.seconds, 3))
        await gather_limited([self._capture(name, rel) for rel in result.changed],
                             CAPTURE_CONCURRENCY)

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
        if self.scanners[name].watched(rel):
            return
        present = await self._retry(f"exists {rel}", lambda: store.zk.exists(
            store.layout.znode(rel)))
        if present is not None and not present.ephemeral:
            for child in await self._retry(
                f"watch {rel}", lambda: self.scanners[name].ensure_watched(rel)
            ):
                self._schedule(name, Watch.DATA, child)

    def _published_locally(self, name: str, captured: list[Captured]) -> None:
        for c in captured:
            self.stats[f"captured:{name}"] += 1
            failpoints.hit(failpoints.AFTER_OUTBOX_WRITE)
            self._enqueue_outbox(name, c.outbox_path, c.payload, c.event.key)

    def _enqueue_outbox(self, subtree: str, path: str, payload: bytes, key: bytes) -> None:
        self._outgoing.put_nowait(
            Outgoing(self.topic(subtree, self.region), key, payload, path, subtree)
        )
        self._queued[subtree] += 1

    def backlog(self, subtree: str) -> int:
        """Captured changes of ``subtree`` not yet acknowledged by Kafka."""
        return self._queued[subtree]

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
        for o in batch:
            self._queued[o.subtree] -= 1
            self.stats[f"published:{o.subtree}"] += 1
        failpoints.hit(failpoints.AFTER_PUBLISH)
        await self._retry("outbox delete", lambda: gather_limited(
            [self.zk.delete(o.outbox_path) for o in batch], 64))
        for (topic, part), end in ends.items():
            subtree = next(o.subtree for o in batch if o.topic == topic)
            self._own_ends.setdefault(subtree, {})[part] = end
        # The own-topic position only bounds a replay after a wipe: once a
        # second is plenty, and saves a ZooKeeper write per small batch.
        if time.monotonic() - self._own_written >= 1.0 or self._outgoing.empty():
            await self._write_own_positions()

    async def _write_own_positions(self) -> None:
        self._own_written = time.monotonic()
        for subtree, parts in list(self._own_ends.items()):
            store = self.stores[subtree]
            await self._retry("store publish position", lambda s=store, p=dict(parts):
                              s.write_positions(self.region, p))  # type: ignore[misc]
        self._own_ends.clear()

    async def _drain_outbox(self, deadline: float = 10.0) -> None:
        """On shutdown, publish what is queued; what is left stays in the outbox."""
        batch: list[Outgoing] = []
        while not self._outgoing.empty():
            batch.append(self._outgoing.get_nowait())
        if batch:
            try:
                async with asyncio.timeout(deadline):
                    await self._publish(batch)
            except (TimeoutError, BridgeError) as exc:
                log.warning("drain_incomplete", left=len(batch), error=str(exc),
                            hint="kept in the outbox; published at next start")

    # -- status --------------------------------------------------------------
    def status(self) -> Status:
        peers = tuple(
            PeerStatus(
                subtree=p.subtree, peer=p.peer, topic=p.topic, positions=dict(p.positions),
                highwater=self.kafka.highwater(p.topic, p.positions),
                last_heartbeat_ms=p.last_heartbeat_ms, last_event_ms=p.last_event_ms,
            )
            for p in self.peers.values()
        )
        errors = tuple(self.errors)
        return Status(
            region=self.region, identity=self.identity, epoch=self.epoch, role=self.role,
            health=health(errors, peers, self.settings.heartbeat_interval),
            started_ms=self.started_ms, updated_ms=now_ms(), counters=dict(self.stats),
            outbox={n: self.backlog(n) for n in self.stores},
            oversized={n: sorted(st.oversized) for n, st in self.stores.items()},
            peers=peers, errors=errors,
        )

    @property
    def status_path(self) -> str:
        return f"{self.settings.state_path}/status"

    async def _write_status(self) -> None:
        record = self.status().encode()
        stat = await self.zk.exists(self.status_path)
        op: ZkOp = (SetData(self.status_path, record, stat.version) if stat
                    else Create(self.status_path, record))
        with contextlib.suppress(VersionConflict):  # a racing write of our own
            await self.zk.multi([op])

    async def _status_writer(self) -> None:
        while True:
            try:
                await self._write_status()
            except BridgeError as exc:
                if not exc.retriable:
                    raise
            await asyncio.sleep(STATUS_INTERVAL)

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
            self._check_caught_up()

    def _check_caught_up(self) -> None:
        if self._caught_up.is_set():
            return
        for (topic, part), end in self._catch_up_to.items():
            if self.peers[topic].positions.get(part, 0) < end:
                return
        self._caught_up.set()

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
            self.stats[f"rejected:{reason}"] += 1
            self.note_error(f"event rejected ({reason})", f"{rec.topic}@{rec.offset}")
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
        self.stats[f"applied:{name}:{outcome.value}"] += 1
        if outcome in (Outcome.CONFLICT_LOCAL, Outcome.CONFLICT_REMOTE):
            self.stats[f"conflicts:{name}"] += 1
            log.info("conflict_resolved", subtree=name, path=event.path,
                     winner="remote" if outcome is Outcome.CONFLICT_REMOTE else "local",
                     remote_writer=event.writer)
            if self.stats[f"conflicts:{name}"] % 100 == 0:
                await self._retry("trim conflicts", lambda: store.trim_conflicts(CONFLICTS_KEPT))
        elif outcome is Outcome.OVERSIZED:
            log.warning("event_oversized", subtree=name, path=event.path,
                        size=len(event.data or b""))

