"""Leadership and supervision of one region's bridge.

The replication work itself lives in ``outbound`` (watch → closed batch →
outbox → publish) and ``inbound`` (fetch → complete batch → one ``multi``
with the position). This module wins a term, starts both pipelines for it,
ends the term on session loss or a fenced write, and retries what may pass.
Retriable errors back off and retry; everything else stops the bridge
(systemd restarts it).

Two identities are checked here. The *incarnation* marker under the state
path names this ensemble's lifetime: a wiped ensemble gets a new one and is
rebuilt from the topics (a legitimate restore), and every record it publishes
carries it. Records of another incarnation that are still being *published*
on this region's own topic mean a second ensemble runs as this region: the
bridge refuses to start, or stops, with exit status 4. A restore is told
apart by time: the old incarnation's records stop when its ensemble (and its
bridge) is gone, while a twin keeps heartbeating.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import structlog

from bridge import codec, collector, failpoints, owntopic
from bridge.acl import AclPolicy
from bridge.clock import HybridClock, hlc_to_ms
from bridge.config import Settings, reloaded
from bridge.election import Election
from bridge.errors import BridgeError, DuplicateRegionError, FencedError, VersionConflict
from bridge.inbound import FETCH_MAX_RECORDS, Inbound, decode_record, duplicate_message
from bridge.kafka import Kafka, Record, topic_name
from bridge.model import Event
from bridge.outbound import Outbound
from bridge.resync import state_events
from bridge.scan import Scanner
from bridge.stability import Stability
from bridge.status import STATUS_INTERVAL, PeerStatus, Status, health, now_ms
from bridge.store import Layout, SubtreeStore
from bridge.verify import read_meta
from bridge.zk import Create, SetData, Watch, ZooKeeper, own_acl
from bridge.zk import Op as ZkOp

log = structlog.get_logger("bridge.engine")

T = TypeVar("T")

_INC = re.compile(r"[0-9a-f]{1,64}")
# Start-up twin check: how many of the own topic's last records to look at.
TWIN_LOOKBACK = 50
TERM_RESTART_DELAY = 1.0  # seconds before standing again after a term failed to start



class Bridge:
    def __init__(self, settings: Settings, *, allow_mass_delete: bool = False) -> None:
        self.settings = settings
        self.region = settings.region
        self.allow_mass_delete = allow_mass_delete
        self.zk = ZooKeeper(settings.zookeeper, private_root=settings.state_path)
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self.kafka = Kafka(settings.kafka, client_id=f"zkbridge-{self.region}")
        self.clock = HybridClock(failpoints.wall_ms)
        self.stats: Counter[str] = Counter()
        self.stores: dict[str, SubtreeStore] = {}
        self.scanners: dict[str, Scanner] = {}
        # One lock per subtree: its captures and applies never overlap.
        self.locks: dict[str, asyncio.Lock] = {}
        self._rescan = asyncio.Event()
        # Bumped when the ZooKeeper connection drops; subtrees not rescanned since.
        self.session_gen = 0
        self.unseen: set[str] = set()
        self._lost = asyncio.Event()
        self._stop = asyncio.Event()
        self.tree_watch = True  # False: the server lacks addWatch, per-node watches instead
        self._watched: dict[str, dict[str, set[str]]] = {}  # fallback: rel → children seen
        # Records whose peer stream waits (clock skew), by skip.where(): what
        # status shows and what `zkbridge skip` checks before it asks.
        self.waiting: dict[str, dict[str, object]] = {}
        # Our wall clock minus each peer's heartbeat stamps, recent ones:
        # the smallest is the least delayed, the best guess of the offset.
        self.clock_offsets: dict[str, deque[int]] = {}
        self._clock_said = ""
        self.role = "starting"
        self.epoch = 0
        self.started_ms = int(time.time() * 1000)
        self.errors: deque[dict[str, object]] = deque(maxlen=20)
        self.incidents: deque[dict[str, object]] = deque(maxlen=50)
        # Set by an incident: the status record shows it now, not at the next tick.
        self._status_due = asyncio.Event()
        self.incarnation = ""  # this ensemble's marker, read at each term's start
        self._reannouncing: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self.election = Election(self.zk, f"{settings.state_path}/election", self.identity,
                                 retry=self.retry, on_standby=self._standing_by)
        self.scan_seconds: dict[str, float] = {}
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
                acl=AclPolicy(st.acl, own_acl(settings.zookeeper)),
            )
            self.stores[st.name] = store
            self.scanners[st.name] = Scanner(store, settings.mass_delete)
            self.locks[st.name] = asyncio.Lock()
            self._watched[st.name] = {}
        self.stability = {n: Stability(self.region, tuple(settings.peers)) for n in self.stores}
        self.outbound = Outbound(self)
        self.inbound = Inbound(self)
        self.peers = self.inbound.peers

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
            await self.retry("connect to ZooKeeper", self.zk.start)
            self.zk.on_watch(self._on_watch)
            self.zk.on_tree(self._on_tree)
            self.zk.on_session(self._on_session)
            await self._register_member()
            self.background(self._connection_watchdog())
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
            # The daemon cancels run() when a stop outlasts its grace; the
            # clients must still close in order (kazoo cannot close a client
            # whose stop is still running in a thread).
            closing = asyncio.ensure_future(self._close_clients())
            try:
                await asyncio.shield(closing)
            except asyncio.CancelledError:
                await closing
                raise
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
        restart_after = 0.0
        try:
            await self._start(tasks)  # starts the publisher before the start-up scan
            tasks += [
                asyncio.create_task(self._guarded(
                    "heartbeat", self.outbound.heartbeats,
                    lambda: self.settings.heartbeat_interval)),
                asyncio.create_task(self._guarded("status", self._status_writer)),
            ]
            # Applying starts after the start-up scan (in _start), so the
            # mass-delete breaker sees local deletions before any remote event.
            tasks += [asyncio.create_task(self._guarded(f"capture[{n}]",
                                                        self.outbound.capture_loop, n))
                      for n in self.stores]
            tasks += [asyncio.create_task(self._guarded(f"outbox[{n}]", self.outbound.feeder, n))
                      for n in self.stores]
            tasks += [asyncio.create_task(self._guarded(f"apply[{n}]",
                                                        self.inbound.apply_loop, n))
                      for n in self.stores]
            tasks += [
                asyncio.create_task(self._guarded("fetcher", self.inbound.fetcher)),
                asyncio.create_task(self._guarded("rescan", self._rescanner)),
                asyncio.create_task(self._guarded("tombstones", collector.run, self)),
            ]
            self.role = "leader"
            # Ready means caught up: serving the latest state, not replaying a backlog.
            waits = {asyncio.ensure_future(self.inbound.caught_up.wait()),
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
        except BridgeError as exc:
            if not exc.retriable:
                raise
            # A step of the term's start that is not retried by itself (taking
            # the epoch: a retry after the session moved on could fence out
            # the next leader; the start-up scan) met a lost connection. The
            # term ends with nothing published past its outbox; the election
            # decides again, and this bridge stands again after a pause.
            self._lost.set()
            log.warning("term_start_failed", error=str(exc),
                        action="standing again for leadership", delay_s=TERM_RESTART_DELAY)
            restart_after = TERM_RESTART_DELAY
        finally:
            tasks += list(self._reannouncing.values())
            self._reannouncing.clear()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._lost.is_set():
                log.warning("leadership_lost", epoch=self.epoch,
                            action="stopped publishing and applying; standing by")
                self.zk.fence = None
            elif self._fatal is None:
                await self.outbound.drain()
                # Leave a fresh record behind: `lag` and `status` read it while we are down.
                with contextlib.suppress(BridgeError):
                    await self._write_status()
            await self.kafka.stop()
            self._reset_term()
        if restart_after:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), restart_after)

    def _reset_term(self) -> None:
        """Forget in-memory work of a term: the next leader reads it back from ZooKeeper."""
        self.outbound.reset()
        self.inbound.reset()
        for name in self.stores:
            self._watched[name].clear()
            self.stores[name].metas.clear()
            self.stability[name].forget_pending()
        self.ready.clear()

    async def _guarded(self, name: str, fn: Callable[..., Awaitable[None]], *args: object) -> None:
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

    async def _start(self, tasks: list[asyncio.Task[None]]) -> None:
        s = self.settings
        self.epoch = await self.zk.take_epoch(f"{s.state_path}/epoch", self.identity.encode())
        failpoints.hit(failpoints.EPOCH_TAKEN)
        log.info("epoch_taken", epoch=self.epoch, identity=self.identity,
                 session=f"{self.zk.session_id or 0:#x}")
        # A connection lost while starting is retried like any later one (a
        # chaos round crashed a bridge on one: seed 885666).
        fresh = await self.retry("read incarnation", self._incarnation)
        for store in self.stores.values():
            store.incarnation = self.incarnation
            await self.retry(f"set up {store.layout.name}", store.setup)
        own = [self.topic(n, self.region) for n in self.stores]
        created = await self.retry("create topics", lambda: self.kafka.ensure_topics(
            own + list(self.peers)))
        if created:
            log.info("topics_created", topics=created)
        await self._check_twin()
        await self.retry("start producer", self.kafka.start_producer)
        for name, store in self.stores.items():
            # Left by an earlier term: published first, whole batches, in order,
            # streamed from the outbox by the feeder (Outbound.feed); this
            # term's captures wait in the outbox behind them.
            newest, pending = await self.retry("read outbox", store.open_after_pending)
            for payload in newest:
                # New batch ids must sort after the ones still pending.
                with contextlib.suppress(BridgeError):
                    event = codec.decode(payload)
                    self.clock.observe(max(event.ts, event.batch or 0))
            if pending:
                self.outbound.spill(name, start=True)
            # Else nothing is waiting: this term's captures (the start-up scan's
            # first) are queued directly, not written and read back.
        found = await owntopic.survey(self, fresh)
        # From here on, what is captured is published as it commits: peers
        # apply the start-up capture while the rest of it is still written.
        tasks.append(asyncio.create_task(self._guarded("publisher", self.outbound.publisher)))
        for name in self.stores:
            await self._scan(name)
        await owntopic.replay(self, found)
        own_ends = found.ends
        for name in self.stores:
            if await self.retry("read re-announce marker", partial(
                    self.zk.exists, self._reannounce_path(name))) is not None:
                # Left unfinished by an earlier term: the whole state again.
                self.start_reannounce(name)
        await self.retry("start consumer", lambda: self.kafka.start_consumer(
            f"{s.kafka.topic_prefix}.{self.region}", reset="none"))
        positions = await self.retry("read positions", self.inbound.start)
        for tp, end in own_ends.items():  # the publisher's acks may be ahead already
            self.inbound.own_max_end[tp] = max(self.inbound.own_max_end.get(tp, 0), end)
        await self.kafka.assign({**positions, **own_ends})
        # Caught up = applied what the peers had published when this term began
        # (an empty fetch is not a usable signal: heartbeats never stop).
        self.inbound.catch_up_to = await self.retry(
            "end offsets", lambda: self.kafka.end_offsets(list(positions)))
        self.inbound.check_caught_up()

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
        node = await self.zk.get(path)
        if node is not None:
            self.incarnation = self._marker(node.data)
            return False
        await self.zk.ensure_path(self.settings.state_path)
        marker = uuid.uuid4().hex
        try:
            await self.zk.create(path, marker.encode())
        except BridgeError:
            node = await self.zk.get(path)  # a racing bridge of this region made it
            self.incarnation = self._marker(node.data if node else b"")
            return False
        self.incarnation = marker
        log.warning("state_initialised", state_path=self.settings.state_path,
                    incarnation=marker, hint="new or wiped ensemble: rebuilding from the topics")
        return True

    @staticmethod
    def _marker(raw: bytes) -> str:
        text = raw.decode("ascii", "replace")
        # A marker of an unexpected shape still names this ensemble: its digest does.
        return text if _INC.fullmatch(text) else uuid.uuid5(uuid.NAMESPACE_OID, text).hex

    async def _check_twin(self) -> None:
        """Refuse to start while another ensemble is publishing as this region.

        Records of another incarnation on the own topic are history after a
        restore (the wiped ensemble's bridge published them) and live only
        when a second ensemble runs with this region's name. So: if any of
        the topic's last records is another incarnation's and recent (within
        three heartbeats), watch the topic for three heartbeat intervals
        before publishing anything; a new record of that incarnation means a
        twin. Once running, the inbound pipeline watches the topic's tail.
        """
        beat = self.settings.heartbeat_interval
        window = 3 * beat + 1.0
        reader = Kafka(self.settings.kafka, client_id=f"zkbridge-{self.region}-twin")
        await self.retry("start twin check", lambda: reader.start_consumer(None))
        try:
            tps = []
            for name in self.stores:
                topic = self.topic(name, self.region)
                tps += [(topic, p) for p in await self.retry(
                    f"partitions of {topic}", partial(reader.partitions, topic))]
            ends = await self.retry("end offsets", lambda: reader.end_offsets(tps))
            begins = await self.retry("beginning offsets", lambda: reader.beginning_offsets(tps))
            tail = {tp: max(begins.get(tp, 0), end - TWIN_LOOKBACK)
                    for tp, end in ends.items() if end > begins.get(tp, 0)}
            if not tail:
                return
            recent = now_ms() - int(1000 * window)
            others = {inc: ts for inc, ts, _ in await self._own_records(reader, tail, ends, 10.0)
                      if inc != self.incarnation and ts >= recent}
            if not others:
                return
            log.warning("twin_check", incarnations=sorted(others), window_s=window,
                        hint="another incarnation of this region published moments ago: a "
                             "restore, or a second ensemble with this region's name; watching")
            fresh = await self._own_records(reader, dict(ends), None, window)
            for inc, _ts, where in fresh:
                if inc != self.incarnation:
                    raise DuplicateRegionError(duplicate_message(
                        self.region, where[0], theirs=inc, ours=self.incarnation,
                        seen=f"a record at offset {where[1]} while starting"))
        finally:
            await reader.stop()

    async def _own_records(self, reader: Kafka, start: dict[tuple[str, int], int],
                           until: dict[tuple[str, int], int] | None, seconds: float
                           ) -> list[tuple[str, int, tuple[str, int]]]:
        """(incarnation, timestamp ms, (topic, offset)) of stamped records from ``start``.

        Reads up to ``until`` (end offsets) or, when None, for ``seconds``.
        """
        await reader.assign(dict(start))
        out: list[tuple[str, int, tuple[str, int]]] = []
        done = dict(start)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if until is not None and all(done.get(tp, 0) >= e for tp, e in until.items()):
                break
            for rec in await reader.fetch(200, FETCH_MAX_RECORDS):
                done[(rec.topic, rec.partition)] = rec.offset + 1
                event, reason, _ = decode_record(rec, self.inbound.own.get(rec.topic, ""),
                                                 self.region)
                if event is not None and not reason and event.inc is not None:
                    out.append((event.inc, rec.timestamp_ms, (rec.topic, rec.offset)))
        return out

    # -- the own topic lost records: re-announce everything -------------------
    def incident(self, kind: str, text: str) -> None:
        """Something happened to the replicated data: status shows it for a while."""
        self.incidents.append({"at_ms": now_ms(), "kind": kind, "text": text})
        self._status_due.set()

    def _reannounce_path(self, name: str) -> str:
        return f"{self.settings.state_path}/reannounce/{name}"

    def own_topic_lost(self, name: str, topic: str, partition: int, published: int, end: int,
                       why: str) -> None:
        """Our own topic lost records we had published: peers can only heal if we re-announce."""
        log.error("own_topic_lost_records", topic=topic, partition=partition,
                  published_position=published, end_offset=end, reason=why,
                  action="re-announcing this region's whole state (as zkbridge resync does)")
        self.incident("REANNOUNCED",
                      f"own topic {topic}[{partition}] lost records ({why}); re-announcing "
                      f"the whole state of {name}")
        self.start_reannounce(name)

    async def own_topic_replaced(self, name: str, topic: str,
                                 parts: dict[int, tuple[int, int]], why: str,
                                 new_id: str) -> None:
        """Our own topic has a new id: whatever we published there is gone; re-announce.

        The re-announce marker is written before the new id is stored, so a
        crash in between still re-announces at the next start.
        """
        for part, (published, end) in parts.items():
            self.own_topic_lost(name, topic, part, published, end, why)
        marker = self._reannounce_path(name)
        await self.retry("mark re-announce", lambda: self.zk.ensure_path(marker))
        await self.retry("store topic id",
                         lambda: self.stores[name].write_topic_id(self.region, new_id))
        self.inbound.own_ids[topic] = new_id

    def start_reannounce(self, name: str) -> None:
        running = self._reannouncing.get(name)
        if running is not None and not running.done():
            running.cancel()  # it may have read the state before this loss: start over
        self._reannouncing[name] = asyncio.create_task(
            self._guarded(f"reannounce[{name}]", self._reannounce, name))

    async def _reannounce(self, name: str) -> None:
        """Queue the subtree's whole state behind the publisher; a marker survives restarts."""
        store = self.stores[name]
        marker = self._reannounce_path(name)
        if await self.zk.exists(marker) is None:
            await self.zk.ensure_path(marker)
        metas = await self.retry(f"read metadata {name}", lambda: read_meta(self.zk,
                                                                            store.layout))
        counts: dict[str, int] = {}
        sent = 0
        last: asyncio.Event | None = None
        async for events in state_events(self.zk, store.layout, self.region, metas, counts,
                                         inc=self.incarnation):
            if last is not None:
                await last.wait()  # one chunk in flight: live batches keep flowing between
            last = asyncio.Event()
            self.outbound.enqueue(name, None, [(e.key, codec.encode(e)) for e in events],
                                  reannounce=True, done=last)
            sent += len(events)
        if last is not None:
            await last.wait()
        await self.retry("clear re-announce marker", lambda: self.zk.delete(marker))
        log.warning("own_topic_reannounced", subtree=name, records=sent,
                    uncaptured=counts.get("uncaptured", 0),
                    hint="every region converges as it reads them; nothing for an operator to do")

    async def recreate_topics(self) -> None:
        """Create this bridge's topics again if they vanished (the broker was rebuilt)."""
        topics = [self.topic(n, self.region) for n in self.stores] + list(self.peers)
        try:
            created = await self.kafka.ensure_topics(topics)
        except BridgeError as exc:
            log.warning("topics_recreate_failed", error=str(exc))
            return
        if created:
            log.warning("topics_recreated", topics=created,
                        hint="they had vanished; peers rewind and origins re-announce")

    async def retry(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
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
    def _on_session(self, state: str, new_session: bool) -> None:
        log.info("zookeeper_session", state=state, new_session=new_session)
        if state == "LOST" and self.role == "leader":
            # The session held our candidate znode: someone else may lead now.
            self._lost.set()
        if state != "CONNECTED":
            # Changes made from now until the rescan after the reconnect are
            # never notified: no capture may close a batch over them
            # (``Outbound.flush``; chaos seed 705621 saw a retried capture
            # publish a pointer whose record was written during the gap).
            self.session_gen += 1
            self.unseen = set(self.stores)
        if state == "CONNECTED" and new_session:
            # The ephemeral member znode died with the old session.
            self.background(self.retry("register member", self._register_member))
        if state == "CONNECTED":
            # Nothing was delivered while away, and the persistent watch is
            # gone (kazoo does not restore it): re-add it and rescan. Also
            # during a term's start-up, before ready: the rescanner runs as
            # soon as the term's tasks do (a reconnect mid-start-up scan
            # otherwise left the term without a watch).
            self._rescan.set()

    def reload(self, new: Settings) -> tuple[list[str], list[str]]:
        """Apply what can change without a restart; return (applied, needs restart) keys."""
        self.settings, applied, restart = reloaded(self.settings, new)
        for st in self.settings.subtrees:
            store = self.stores[st.name]
            if store.exclude != tuple(st.exclude):
                store.exclude = tuple(st.exclude)
                # Newly included paths were never watched: look at everything again.
                self._rescan.set()
        for scanner in self.scanners.values():
            scanner.mass_delete = self.settings.mass_delete
        # Paths held back for want of permission are tried again (an ACL may have changed).
        if any(st.held_back for st in self.stores.values()):
            self._rescan.set()
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

    def background(self, coro: Awaitable[None]) -> None:
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
                await self.retry(f"rescan {name}", lambda n=name: self._scan(n))  # type: ignore[misc]

    async def _scan(self, name: str) -> None:
        """Watch the mount, read everything, capture what changed unseen (one batch or more)."""
        store = self.stores[name]
        async with self.locks[name]:
            await self._rescan_locked(name)
            if store.held_events:
                # Held back for want of permission: tried again at every scan
                # (their records go once they apply, in the same multi).
                events = list(store.held_events.values())
                for e in events:
                    store.held_back.pop(e.path, None)
                applied = await self.inbound.apply_events(store, events, peer=None,
                                                          positions=None)
                self.inbound.record(store, applied)

    async def ensure_seen(self, name: str) -> None:
        """Before a capture (the subtree's lock held): rescan if the connection dropped since
        the last scan, until one scan ran without a drop (``Outbound.flush``)."""
        while name in self.unseen:
            await self._rescan_locked(name)

    async def _rescan_locked(self, name: str) -> None:
        """The scan proper, the subtree's lock held (it keeps applies out while the
        metadata cache is rebuilt).

        The watch goes first, so a change during the scan is either read by
        it or notified after.
        """
        store, scanner = self.stores[name], self.scanners[name]
        gen = self.session_gen
        if self.tree_watch:
            self.tree_watch = await self.retry(
                f"watch {name}", lambda: self.zk.add_recursive_watch(store.layout.mount))
            if not self.tree_watch:
                log.warning("persistent_watch_unsupported", subtree=name,
                            hint="ZooKeeper < 3.6: falling back to a watch per znode")
        result = await self.retry(
            f"scan {name}", lambda: scanner.scan(allow_mass_delete=self.allow_mass_delete))
        self.stats[f"scans:{name}"] += 1
        self.scan_seconds[name] = result.seconds
        log.info("scan_done", subtree=name, znodes=result.znodes,
                 changes=len(result.changed), seconds=round(result.seconds, 3))
        if not self.tree_watch:
            self._watched[name].clear()
            await self._arm(name, ["/", *result.present])
        await self.outbound.flush(name, set(result.changed), since=gen)
        if self.session_gen == gen:
            self.unseen.discard(name)

    # -- change notification -------------------------------------------------
    def _subtree_of(self, path: str) -> tuple[str, str] | None:
        for name, store in self.stores.items():
            rel = store.layout.rel_of(path)
            if rel is not None:
                return name, rel
        return None

    def _on_tree(self, path: str, frame: int) -> None:
        found = self._subtree_of(path)
        if found is not None and found[1] != "/" and not self.stores[found[0]].excluded(found[1]):
            self.outbound.mark(*found, frame)

    def _on_watch(self, kind: Watch, path: str, deleted: bool) -> None:
        """Fallback one-shot watches (no addWatch): where to look, then re-armed."""
        if self.tree_watch:
            return
        found = self._subtree_of(path)
        if found is None:
            return
        name, rel = found
        if kind is Watch.CHILDREN:
            self.background(self._relist(name, rel))
        elif rel != "/":
            self.outbound.mark(name, rel)

    async def _relist(self, name: str, rel: str) -> None:
        with contextlib.suppress(BridgeError):
            async with self.locks[name]:
                self._watched[name].pop(rel, None)
                await self._arm(name, [rel])

    async def after_capture(self, name: str, rels: set[str]) -> None:
        if not self.tree_watch:
            await self._arm(name, sorted(rels))

    async def _arm(self, name: str, rels: list[str]) -> None:
        """Per-node watches: data on each, children on each present one (new children marked)."""
        store, seen = self.stores[name], self._watched[name]
        for rel in rels:
            path = store.layout.znode(rel)
            stat = await self.zk.exists(path, watch=True)
            if stat is None or stat.ephemeral:
                seen.pop(rel, None)
                continue
            if rel in seen:
                continue
            names = await self.zk.children(path, watch=True) or []
            seen[rel] = set(names)
            for child in names:
                child_rel = f"/{child}" if rel == "/" else f"{rel}/{child}"
                if child_rel not in seen and not store.excluded(child_rel):
                    self.outbound.mark(name, child_rel)

    # -- inbound helpers -----------------------------------------------------
    def decode(self, rec: Record, subtree: str, origin: str) -> Event | None:
        """Decode and contain one record: anything off is counted, logged and skipped."""
        event, reason, detail = decode_record(rec, subtree, origin)
        if reason:
            self.stats[f"rejected:{reason}"] += 1
            self.note_error(f"event rejected ({reason})", f"{rec.topic}@{rec.offset}")
            log.warning("event_rejected", reason=reason, topic=rec.topic,
                        partition=rec.partition, offset=rec.offset, detail=detail)
        return event

    def clock_sample(self, peer: str, stamp_ms: int) -> None:
        """A peer's fresh heartbeat, stamped by its clock (HLC physical part)."""
        self.clock_offsets.setdefault(peer, deque(maxlen=10)).append(
            self.clock.wall_ms() - stamp_ms)

    def clock_check(self) -> str:
        """Why this region's own clock looks wrong, or "".

        The clock is judged against a majority of the peers heard from: one
        peer that disagrees with everyone else is that peer's problem (its
        own bridge reports it); with a single peer both sides report it.
        """
        bound = 1000 * self.settings.max_clock_skew
        offsets = {p: min(d) for p, d in self.clock_offsets.items() if d}
        off = {p: v for p, v in offsets.items() if abs(v) > bound}
        said = ""
        if off and 2 * len(off) > len(offsets):
            mean = sum(off.values()) / len(off) / 1000
            way = "ahead of" if mean > 0 else "behind"
            said = (f"this region's clock is about {abs(mean):.0f}s {way} the heartbeats of "
                    f"{', '.join(sorted(off))} (more than max_clock_skew "
                    f"{bound / 1000:g}s): check NTP on this host")
        if said and not self._clock_said:
            log.error("clock_disagrees", offsets_s={p: round(v / 1000, 1) for p, v in
                                                    offsets.items()}, detail=said)
        elif self._clock_said and not said:
            log.info("clock_agrees")
        self._clock_said = said
        return said

    def applied_report(self, subtree: str) -> tuple[tuple[str, int], ...]:
        """How far this region applied each peer's stream of ``subtree`` (for heartbeats)."""
        stab = self.stability[subtree]
        for p in self.peers.values():
            if p.subtree == subtree:
                for part, pos in p.positions.items():
                    stab.passed(p.peer, part, pos)
        return stab.report()

    def stable_prefixes(self, subtree: str) -> dict[str, int | None]:
        """Per origin, the wall-clock ms of its stream's stable prefix (None: not known)."""
        self.applied_report(subtree)
        stab = self.stability[subtree]
        out: dict[str, int | None] = {}
        for origin in (self.region, *self.settings.peers):
            prefix = stab.stable(origin)
            out[origin] = None if prefix is None else min(hlc_to_ms(prefix), now_ms())
        return out

    def backlog(self, subtree: str) -> int:
        """Captured changes of ``subtree`` not yet acknowledged by Kafka."""
        return self.outbound.queued[subtree]

    # -- status --------------------------------------------------------------
    def status(self) -> Status:
        peers = tuple(
            PeerStatus(
                subtree=p.subtree, peer=p.peer, topic=p.topic, positions=dict(p.positions),
                highwater=self.kafka.highwater(p.topic, p.positions),
                last_heartbeat_ms=p.last_heartbeat_ms, last_event_ms=p.last_event_ms,
                last_applied_ms=p.last_applied_ms,
            )
            for p in self.peers.values()
        )
        errors = tuple(self.errors)
        incidents = tuple(self.incidents)
        clock = self.clock_check()
        return Status(
            region=self.region, identity=self.identity, epoch=self.epoch, role=self.role,
            health=health(errors, peers, self.settings.heartbeat_interval,
                          incidents=incidents, clock=clock),
            started_ms=self.started_ms, updated_ms=now_ms(), counters=dict(self.stats),
            outbox={n: self.backlog(n) for n in self.stores},
            oversized={n: sorted(st.oversized) for n, st in self.stores.items()},
            held_back={n: [f"{rel} ({what})" for rel, what in sorted(st.held_back.items())]
                       for n, st in self.stores.items()},
            peers=peers, errors=errors, incidents=incidents, waiting=dict(self.waiting),
            clock=clock,
            state={n: self.state_of(n) for n in self.stores},
        )

    def state_of(self, subtree: str) -> dict[str, object]:
        """Bounded state of ``subtree`` for the status record."""
        store, now = self.stores[subtree], now_ms()
        return {
            "tombstones": store.tombstones_held(),
            "tombstones_collected": store.gc_collected,
            "nulls_published": self.stats[f"nulls_published:{subtree}"],
            "nulls_applied": self.stats[f"nulls_applied:{subtree}"],
            "outbox_age_seconds": round(self.outbound.oldest_age(subtree), 1),
            "stable_prefix_age_seconds": {
                origin: None if at is None else round(max(0, now - at) / 1000, 1)
                for origin, at in self.stable_prefixes(subtree).items()},
        }

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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_due.wait(), STATUS_INTERVAL)
            self._status_due.clear()

