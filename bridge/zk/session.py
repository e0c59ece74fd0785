"""One ZooKeeper session over kazoo's threads: its lifecycle, callbacks and call plumbing.

Every call is issued with kazoo's ``*_async`` variant (or queued in bulk,
``bridge.zk.wire``) and its result handed to the event loop with
``call_soon_threadsafe``, so the loop never blocks on ZooKeeper. Watch and
session callbacks are handed over the same way. kazoo's exceptions are
translated into ``bridge.errors`` by ``bridge.zk.errors``. The operations
over the session are ``bridge.zk.zookeeper``'s.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from kazoo.client import KazooState
from kazoo.protocol.states import EventType, WatchedEvent
from kazoo.retry import KazooRetry

from bridge.config import ZooKeeperSettings, ZooKeeperTls
from bridge.errors import UnsupportedServerError, ZooKeeperError, ZooKeeperTlsError
from bridge.zk.diagnosis import (
    UNREACHED,
    connect_failure,
    server_versions,
    supports_multi_read,
)
from bridge.zk.errors import translate
from bridge.zk.values import (
    Check,
    SessionCallback,
    TreeCallback,
    Watch,
    WatchCallback,
    acl_entries,
    own_acl,
)
from bridge.zk.wire import Client, Many

log = structlog.get_logger("bridge.zk")

EventType_CHILD = 4  # ZooKeeper's NodeChildrenChanged


def _tls_options(tls: ZooKeeperTls | None) -> dict[str, Any]:
    if tls is None:
        return {}
    return {"use_ssl": True, "verify_certs": True, "check_hostname": tls.check_hostname,
            "ca": tls.cafile, "certfile": tls.certfile, "keyfile": tls.keyfile}


class Session:
    """One kazoo session: connect and stop, hand its events to the loop, await its calls.

    ``ZooKeeper`` (``bridge.zk.zookeeper``) adds the reads and writes.
    """

    def __init__(self, settings: ZooKeeperSettings, *, read_only: bool = False,
                 private_root: str | None = None) -> None:
        auth = [(settings.auth.scheme, settings.auth.credential)] if settings.auth else None
        self._client = Client(
            hosts=settings.hosts,
            timeout=settings.session_timeout,
            # Reconnect forever: the daemon decides when an outage is fatal.
            connection_retry=KazooRetry(max_tries=-1, max_delay=5.0),
            auth_data=auth,
            read_only=read_only,
            **_tls_options(settings.tls),
        )
        self._settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session_cbs: list[SessionCallback] = []
        self._session_id: int | None = None
        self._watch_cb: WatchCallback | None = None
        self._tree_cb: TreeCallback | None = None
        self._tree_roots: tuple[str, ...] = ()
        self._notes: list[tuple[str, int]] = []  # persistent events not yet handed on
        self._notes_lock = threading.Lock()
        self._client._connection.on_persistent = self._persistent_events
        # Stands in for a server older than 3.6 (tests of the per-node fallback).
        self.refuse_add_watch = os.environ.get("ZKBRIDGE_REFUSE_ADDWATCH") == "1"
        self.fence: Check | None = None
        # The bridge's state (metadata, outbox, positions, epoch) is created
        # writable and readable by the bridge's own digest identity only: an
        # application client can neither corrupt it nor read the outbox's
        # payloads. Without digest auth there is no identity to restrict to.
        own = own_acl(settings)
        self._private = (private_root, acl_entries([own])) if own and private_root else None

    # -- lifecycle -----------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        with self._notes_lock:
            self._notes = []  # a handing-on due on an earlier loop never runs
        try:
            await asyncio.to_thread(self._client.start, self._settings.connect_timeout)
        except Exception as exc:
            await asyncio.to_thread(self._client.stop)
            # kazoo logs a refused handshake and tries again for ever: ask once
            # ourselves, so that what no retry can cure stops the bridge.
            why, fatal = await asyncio.to_thread(connect_failure, self._settings)
            if fatal:
                raise ZooKeeperTlsError(why) from exc
            raise ZooKeeperError(
                f"cannot connect to ZooKeeper at {self._settings.hosts} within "
                f"{self._settings.connect_timeout:g}s: {why}"
            ) from exc
        self._session_id = self._client.client_id[0] if self._client.client_id else None
        self._client.add_listener(self._on_state)
        await self._require_multi_read()

    async def _require_multi_read(self) -> None:
        """Refuse a server older than 3.6 at once, saying so.

        Every capture reads with ``multiRead`` (3.6). A 3.4 or 3.5 server answers
        it with Unimplemented and then drops the connection: without this
        question the bridge retried its scan against those drops until kazoo's
        connection thread died of a mismatched reply, a traceback and nothing
        that said what to do.
        """
        try:
            await self._await(self._call(self._client.multi_read_async, [("data", "/zookeeper")],
                                         what="multiRead"), "multiRead /zookeeper")
        except UnsupportedServerError as exc:
            versions = await asyncio.to_thread(server_versions, self._settings)
            await asyncio.to_thread(self._client.stop)
            said = "; ".join(f"{h} runs {v}" for h, v in versions.items())
            line = (f"ZooKeeper at {self._settings.hosts} does not implement multiRead"
                    + (f" ({said})" if said else ""))
            if any(supports_multi_read(v) for v in versions.values()):
                # A rolling upgrade under way: another server may take the next session.
                raise ZooKeeperError(f"{line}: the server this session reached is older than "
                                     "3.6 (a rolling upgrade under way?)") from exc
            raise UnsupportedServerError(
                f"{line}: zkbridge needs ZooKeeper 3.6 or later (multiRead and addWatch); "
                "upgrade every server of the ensemble") from exc

    async def diagnose(self) -> str | None:
        """Ask the servers once why this session has no connection (kazoo only logs each
        failed try): raise ZooKeeperTlsError if no retry can cure it (the servers stopped
        taking this bridge's certificate, or now speak only TLS); else a line naming what
        to check, or None when all that is known is that no server answers."""
        why, fatal = await asyncio.to_thread(connect_failure, self._settings)
        if fatal:
            raise ZooKeeperTlsError(why)
        return None if why == UNREACHED else why

    async def stop(self) -> None:
        try:
            await asyncio.to_thread(self._client.stop)
        finally:
            try:
                await asyncio.to_thread(self._client.close)
            except Exception as exc:  # kazoo: "Cannot close connection until it is stopped"
                log.warning("zookeeper_close_failed", error=str(exc))

    async def restart(self) -> None:
        """Drop the session and connect afresh.

        A client that has seen zxids newer than what a restored or wiped
        ensemble holds is refused by it forever; only a new client state
        (kazoo's restart resets the last zxid seen) gets back in.

        kazoo's own restart waits 15 s and, if no server took it by then, leaves
        the client stopped until the next restart: started in the background
        instead, it keeps trying as after the first start, and what no retry
        cures (a refused certificate) raises ZooKeeperTlsError, as at start. Only
        with zookeeper.tls, as the watchdog's questions: without it the question is
        a TLS ClientHello, a bad packet in a plain server's log.
        """
        await asyncio.to_thread(self._client.stop)
        connected = self._client.start_async()
        await asyncio.to_thread(connected.wait, self._settings.connect_timeout)
        if not self._client.connected and self._settings.tls is not None:
            await self.diagnose()

    @property
    def connected(self) -> bool:
        return bool(self._client.connected)

    @property
    def session_id(self) -> int | None:
        cid = self._client.client_id
        return cid[0] if cid else None

    def on_session(self, cb: SessionCallback) -> None:
        self._session_cbs.append(cb)

    def on_watch(self, cb: WatchCallback) -> None:
        self._watch_cb = cb

    def _on_state(self, state: str) -> bool:
        # Runs in kazoo's connection thread: only hand over, never block here.
        new_session = False
        if state == KazooState.CONNECTED:
            cid = self._client.client_id
            sid = cid[0] if cid else None
            new_session = sid != self._session_id
            self._session_id = sid
        loop = self._loop
        if loop is not None and not loop.is_closed():
            for cb in self._session_cbs:
                loop.call_soon_threadsafe(cb, str(state), new_session)
        return False

    def on_tree(self, cb: TreeCallback) -> None:
        self._tree_cb = cb

    def _persistent_events(self, notes: list[tuple[int, str, int]]) -> None:
        # kazoo's connection thread; persistent events carry no "child" kind.
        # Handed to the loop directly, while replies go through kazoo's
        # completion thread: every notification numbered below a reply
        # reaches the loop before that reply does. Runs that arrive while one
        # handing-on is still due join it: a write burst's notifications come
        # in many small reads, and a wake-up of the loop each was a tenth of
        # the connection thread's time (profiled).
        loop, cb = self._loop, self._tree_cb
        if loop is None or cb is None or loop.is_closed():
            return
        roots = self._tree_roots
        under = tuple(r + "/" for r in roots)
        mine = [(path, frame) for kind, path, frame in notes if kind != EventType_CHILD
                and (path.startswith(under) or path in roots)]
        if not mine:
            return
        with self._notes_lock:
            due = bool(self._notes)
            self._notes += mine
        if not due:
            loop.call_soon_threadsafe(self._deliver, cb)

    def _deliver(self, cb: TreeCallback) -> None:
        with self._notes_lock:
            notes, self._notes = self._notes, []
        for path, frame in notes:
            cb(path, frame)

    def _kazoo_watch(self, event: WatchedEvent) -> None:
        loop, cb = self._loop, self._watch_cb
        if loop is None or cb is None or loop.is_closed() or event.path is None:
            return
        kind = Watch.CHILDREN if event.type == EventType.CHILD else Watch.DATA
        deleted = event.type == EventType.DELETED
        loop.call_soon_threadsafe(cb, kind, event.path, deleted)

    # -- plumbing ------------------------------------------------------
    async def _await(self, async_result: Any, what: str) -> Any:
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def settle(ar: Any) -> None:
            if fut.done():
                return
            if ar.successful():
                fut.set_result(ar.value)
            else:
                fut.set_exception(translate(ar.exception, what))

        def done(ar: Any) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(settle, ar)

        async_result.rawlink(done)
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow
            # a cancellation that arrives as the future completes, and at session
            # loss every pending future completes at once (a task that ignored
            # its cancellation kept a deposed leader's term alive).
            async with asyncio.timeout(max(self._settings.session_timeout, 5.0)):
                return await fut
        except TimeoutError as exc:
            raise ZooKeeperError(f"{what}: no answer from ZooKeeper") from exc

    async def _many(self, requests: Sequence[Any], what: str) -> list[Any]:
        """Send kazoo requests together (``Client.call_many``): each answer, or its
        translated error."""
        many = Many(self._loop or asyncio.get_running_loop(), len(requests))
        self._call(self._client.call_many, requests, many.slots(), what=what)
        try:
            async with asyncio.timeout(max(self._settings.session_timeout, 5.0)):
                await many.done
        except TimeoutError as exc:
            raise ZooKeeperError(f"{what}: no answer from ZooKeeper") from exc
        return [translate(v, what) if isinstance(v, BaseException) else v
                for v in many.values]

    def _call(self, fn: Callable[..., Any], *args: Any, what: str) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # kazoo raises synchronously when not connected
            raise translate(exc, what) from exc
