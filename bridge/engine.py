"""Leadership and supervision of one region's bridge.

The replication work itself lives in ``outbound`` (watch → closed batch →
outbox → publish) and ``inbound`` (fetch → complete batch → one ``multi``
with the position). This module wins a term, starts both pipelines for it,
ends the term on session loss or a fenced write, and retries what may pass.
Retriable errors back off and retry; everything else stops the bridge
(systemd restarts it).

What each part does lives in its own module: ``termstart`` (a term's start,
up to the catch-up), ``watching`` (watches and scans), ``twin`` (this
ensemble's incarnation, no second ensemble as this region), ``reannounce``
(the own topic lost records), ``reporter`` (the status record), ``clients``
(the ZooKeeper session, membership, closing the clients), ``streams``
(records decoded, applied and stable positions, backlog).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from bridge import collector, failpoints, joining, startup, stateaccess, termstart
from bridge.acl import AclPolicy
from bridge.applying import Applier
from bridge.certexpiry import Expiry
from bridge.clients import Clients
from bridge.clock import HybridClock
from bridge.config import Settings
from bridge.configreload import reloaded
from bridge.election import Election
from bridge.errors import BridgeError, FencedError
from bridge.inbound import Inbound
from bridge.kafka import Kafka, topic_name
from bridge.outbound import Outbound
from bridge.overflow import Overflow
from bridge.reannounce import Reannouncer
from bridge.reporter import Reporter
from bridge.scan import Scanner
from bridge.stability import Stability
from bridge.status import now_ms
from bridge.store import Layout, SubtreeStore, is_excluded
from bridge.streams import Streams
from bridge.termsteps import unless_lost
from bridge.watching import Watching
from bridge.zk import ZooKeeper, own_acl

log = structlog.get_logger("bridge.engine")

T = TypeVar("T")

TERM_RESTART_DELAY = 1.0  # seconds before standing again after a term failed to start


class Bridge:
    def __init__(self, settings: Settings, *, allow_mass_delete: bool = False) -> None:
        self.settings = settings
        self.region = settings.region
        self.allow_mass_delete = allow_mass_delete
        self.zk = ZooKeeper(settings.zookeeper, private_root=settings.state_path)
        # Large captures' ACL reads (Capturing._pieces, bridge.capture): connected in the
        # background, never waited for; the main session serves until then.
        self.acl_zk = ZooKeeper(settings.zookeeper)
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self.kafka = Kafka(settings.kafka, client_id=f"zkbridge-{self.region}")
        self.clock = HybridClock(failpoints.wall_ms)
        self.stats: Counter[str] = Counter()
        self.stores: dict[str, SubtreeStore] = {}
        self.scanners: dict[str, Scanner] = {}
        # One lock per subtree: its captures and applies never overlap.
        self.locks: dict[str, asyncio.Lock] = {}
        self._lost = asyncio.Event()
        self._stop = asyncio.Event()
        # Records whose peer stream waits (clock skew), by skip.where(): what
        # status shows and what `zkbridge skip` checks before it asks.
        self.waiting: dict[str, dict[str, object]] = {}
        self.role = "starting"
        # From taking the epoch to the term's end: a lost session ends the term
        # then, also while it is still starting (role is "leader" only once it runs).
        self.in_term = False
        # A term's joins (``bridge.joining``) and reloads that include paths again.
        self.joins: dict[str, asyncio.Task[None]] = {}
        self.includes: list[asyncio.Task[None]] = []
        self.epoch = 0
        self.started_ms = int(time.time() * 1000)
        self.errors: deque[dict[str, object]] = deque(maxlen=20)
        self.incidents: deque[dict[str, object]] = deque(maxlen=50)
        # The client certificates' expiries, read once at start (the clients load
        # the files once): /metrics and the status record show them.
        self.certificates: tuple[Expiry, ...] = ()
        self.incarnation = ""  # this ensemble's marker, read at each term's start
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
        self.stability = {n: Stability(self.region, tuple(settings.peers)) for n in self.stores}
        self.outbound = Outbound(self)
        self.inbound = Inbound(self)
        self.applier = Applier(self, self.inbound)
        self.watching = Watching(self)
        self.reannounce = Reannouncer(self)
        self.overflow = Overflow(self)
        self.reporter = Reporter(self)
        self.start_up = startup.StartUp()
        # A join waiting on it too: its marker outlives a restart, which would wait the same.
        self.start_up.outage = self.inbound.waits_on_leaders
        self.clients = Clients(self, self._lost, self._stop)
        self.streams = Streams(self)
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
            await self.retry("check the state's ACL",
                             lambda: stateaccess.ensure(self.zk, self.settings, tighten=True))
            self.zk.on_watch(self.watching.on_watch)
            self.zk.on_tree(self.watching.on_tree)
            self.zk.on_session(self.clients.on_session)
            self.clients.acl_zk_starting = asyncio.ensure_future(self.clients.start_acl_reader())
            await self.clients.register_member()
            self.background(self.guarded("zookeeper watchdog", self.clients.watchdog))
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
            closing = asyncio.ensure_future(self.clients.close())
            try:
                await asyncio.shield(closing)
            except asyncio.CancelledError:
                await closing
                raise
        if self._fatal is not None:
            raise self._fatal

    def _standing_by(self, leader: str) -> None:
        if self.role != "standby":
            self.role = "standby"
            log.info("standby", identity=self.identity, leader_candidate=leader)
            self.on_role(self.role)

    async def _lead(self) -> None:
        """One leadership term: take the epoch, run both pipelines until it ends."""
        self._lost.clear()
        self.in_term = True
        self.start_up.begin()
        self.kafka = Kafka(self.settings.kafka, client_id=f"zkbridge-{self.region}")
        tasks: list[asyncio.Task[None]] = []
        restart_after = 0.0
        try:
            # Starts the publisher once the own-topic checks pass.
            await unless_lost(termstart.start(self, tasks), self._lost)
            # Applying starts after the start-up scan (in termstart.start), so the
            # mass-delete breaker sees local deletions before any remote event.
            tasks += [asyncio.create_task(self.guarded(f"capture[{n}]",
                                                        self.outbound.capture_loop, n))
                      for n in self.stores]
            tasks += [asyncio.create_task(self.guarded(f"outbox[{n}]", self.outbound.feeder, n))
                      for n in self.stores]
            tasks += [asyncio.create_task(self.guarded(f"apply[{n}]",
                                                        self.applier.apply_loop, n))
                      for n in self.stores]
            joins = [joining.start(self, n) for n, st in self.stores.items()
                     if st.joining is not None]
            tasks += [
                asyncio.create_task(self.guarded("fetcher", self.inbound.fetcher)),
                asyncio.create_task(self.guarded("rescan", self.watching.rescanner)),
                asyncio.create_task(self.guarded("held", self.watching.held_retrier)),
                asyncio.create_task(self.guarded("tombstones", collector.run, self)),
            ]
            self.role = "leader"
            # Ready means caught up: serving the latest state, not replaying a backlog.
            waits = {asyncio.ensure_future(self.start_up.during(
                         "catch-up", startup.catching_up(self), self._caught_up(joins))),
                     asyncio.ensure_future(self._stop.wait()),
                     asyncio.ensure_future(self._lost.wait())}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            took = self.start_up.end()
            self.ready.set()
            # The status record before the log and systemd say ready: `status`
            # and `lag` read it (the heartbeats and positions of the catch-up).
            if not (self._lost.is_set() or self._stop.is_set()):
                with contextlib.suppress(BridgeError):  # the reporter's loop writes it again
                    await self.reporter.write()
            log.info("bridge_ready", region=self.region, subtrees=list(self.stores),
                     peers=list(self.settings.peers), epoch=self.epoch, start_seconds=took)
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
            tasks += [*self.reannounce.take_tasks(), *self.joins.values(), *self.includes]
            self.joins.clear()
            self.includes.clear()
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
                    await self.reporter.write()
            await self.kafka.stop()
            for store in self.stores.values():
                await store.acl.stop_reading_ahead()
            self._reset_term()
            self.start_up.end()
            self.in_term = False
        if restart_after:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), restart_after)

    async def _caught_up(self, joins: list[asyncio.Task[None]]) -> None:
        """Caught up with the peers, and what only this region held of a joining subtree
        published (``bridge.joining``). A join that fails stops the bridge (guarded)."""
        await self.inbound.wait_caught_up()
        await asyncio.gather(*joins)

    def _reset_term(self) -> None:
        """Forget in-memory work of a term: the next leader reads it back from ZooKeeper."""
        self.outbound.reset()
        self.overflow.reset()
        self.inbound.reset()
        self.watching.reset()
        for name in self.stores:
            self.stores[name].metas.clear()
            self.stability[name].forget_pending()
        self.ready.clear()

    async def guarded(self, name: str, fn: Callable[..., Awaitable[None]], *args: object) -> None:
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

    def incident(self, kind: str, text: str) -> None:
        """Something happened to the replicated data: status shows it for a while."""
        self.incidents.append({"at_ms": now_ms(), "kind": kind, "text": text})
        self.reporter.due.set()

    async def recreate_topics(self, *, again: bool = False) -> None:
        """Create this bridge's topics again if they vanished (the broker was rebuilt).

        ``again``: not the first try of this outage, whose failure is logged only
        at debug level (the topic check tries every second).
        """
        topics = [self.topic(n, self.region) for n in self.stores] + list(self.peers)
        try:
            created = await self.kafka.ensure_topics(topics)
        except BridgeError as exc:
            (log.debug if again else log.warning)("topics_recreate_failed", error=str(exc))
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

    def reload(self, new: Settings) -> tuple[list[str], list[str]]:
        """Apply what can change without a restart; return (applied, needs restart) keys."""
        self.settings, applied, restart = reloaded(self.settings, new)
        for st in self.settings.subtrees:
            store = self.stores[st.name]
            if store.exclude != tuple(st.exclude):
                included = tuple(x for x in store.exclude if not is_excluded(x, st.exclude))
                if included and self.in_term:
                    # What the region holds there joins (``bridge.joining``): marked first.
                    self.includes.append(asyncio.create_task(self.guarded(
                        f"include[{st.name}]", joining.include, self, st.name,
                        tuple(st.exclude), included)))
                else:
                    self.exclude(st.name, tuple(st.exclude), included)
        for scanner in self.scanners.values():
            scanner.mass_delete = self.settings.mass_delete
        # Paths held back for want of permission are tried again (an ACL may have changed).
        if any(st.held_back for st in self.stores.values()):
            self.watching.request()
        self.watching.retime()
        return applied, restart

    def exclude(self, name: str, exclude: tuple[str, ...], included: tuple[str, ...], *,
                rescan: bool = True) -> None:
        """Take a reloaded exclude list in (``included``: paths it no longer holds;
        ``rescan``: whether the rescanner is to look at everything again)."""
        self.stores[name].exclude = exclude
        if rescan:  # newly included paths were never watched
            self.watching.request()
        # The peers' events for them were passed over: read those again (and
        # store the exclude list the topics are read under).
        before = self.inbound.read_again.get(name, ())
        self.inbound.read_again[name] = (*before, *included)

    def background(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # keep a reference until done, or it may be collected
        task.add_done_callback(self._tasks.discard)

    def note_error(self, what: str, error: str) -> None:
        """Remember a recent problem for ``zkbridge status``."""
        self.errors.append({"at_ms": int(time.time() * 1000), "what": what, "error": error})
