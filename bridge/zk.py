"""The ZooKeeper adapter: the only module that imports kazoo.

It offers an asyncio API over kazoo's threads: every call is issued with
kazoo's ``*_async`` variant and its result handed to the event loop with
``call_soon_threadsafe``, so the loop never blocks on ZooKeeper. Watch and
session callbacks are handed over the same way. kazoo's exceptions are
translated here into ``bridge.errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    BadVersionError,
    ConnectionLoss,
    KazooException,
    NodeExistsError,
    NoNodeError,
    NotEmptyError,
    OperationTimeoutError,
    RolledBackError,
    SessionExpiredError,
    ZookeeperError,
)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import EventType, WatchedEvent
from kazoo.retry import KazooRetry

from bridge.config import ZooKeeperSettings
from bridge.errors import FencedError, MissingNode, VersionConflict, ZooKeeperError

log = structlog.get_logger("bridge.zk")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Stat:
    version: int
    cversion: int
    num_children: int
    ephemeral: bool
    czxid: int
    mzxid: int


@dataclass(frozen=True, slots=True)
class Node:
    data: bytes
    stat: Stat


# Operations of an atomic multi.
@dataclass(frozen=True, slots=True)
class Check:
    path: str
    version: int


@dataclass(frozen=True, slots=True)
class Create:
    path: str
    data: bytes = b""
    sequential: bool = False


@dataclass(frozen=True, slots=True)
class SetData:
    path: str
    data: bytes
    version: int = -1


@dataclass(frozen=True, slots=True)
class Delete:
    path: str
    version: int = -1


Op = Check | Create | SetData | Delete


class Watch(enum.Enum):
    DATA = "data"  # data changed, node deleted or created
    CHILDREN = "children"


WatchCallback = Callable[[Watch, str, bool], None]
"""(kind, absolute path, deleted) — always called on the event loop."""

SessionCallback = Callable[[str, bool], None]
"""(state name, new session?) — always called on the event loop."""


def _stat(s: Any) -> Stat:
    return Stat(
        version=s.version,
        cversion=s.cversion,
        num_children=s.numChildren,
        ephemeral=bool(s.ephemeralOwner),
        czxid=s.czxid,
        mzxid=s.mzxid,
    )


def _translate(exc: BaseException, what: str) -> BaseException:
    if isinstance(exc, NoNodeError):
        return MissingNode(what)
    if isinstance(exc, BadVersionError | NodeExistsError | NotEmptyError):
        return VersionConflict(f"{what}: {type(exc).__name__}")
    if isinstance(exc, ConnectionLoss | SessionExpiredError | OperationTimeoutError):
        return ZooKeeperError(f"{what}: {type(exc).__name__}")
    if isinstance(exc, KazooTimeoutError):
        return ZooKeeperError(f"{what}: timed out")
    if isinstance(exc, ZookeeperError | KazooException):
        err = ZooKeeperError(f"{what}: {type(exc).__name__} {exc}")
        return err
    return exc


class ZooKeeper:
    """One session with one region's ensemble.

    ``fence`` (set after the bridge takes its epoch) is a ``Check`` prepended
    to every multi: if another bridge has bumped the epoch since, the multi
    fails and ``FencedError`` is raised instead of writing.
    """

    def __init__(self, settings: ZooKeeperSettings, *, read_only: bool = False) -> None:
        auth = [(settings.auth.scheme, settings.auth.credential)] if settings.auth else None
        self._client = KazooClient(
            hosts=settings.hosts,
            timeout=settings.session_timeout,
            # Reconnect forever: the daemon decides when an outage is fatal.
            connection_retry=KazooRetry(max_tries=-1, max_delay=5.0),
            auth_data=auth,
            read_only=read_only,
        )
        self._settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session_cbs: list[SessionCallback] = []
        self._session_id: int | None = None
        self._watch_cb: WatchCallback | None = None
        self.fence: Check | None = None

    # -- lifecycle -----------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self._client.start, self._settings.connect_timeout)
        except Exception as exc:
            await asyncio.to_thread(self._client.stop)
            raise ZooKeeperError(
                f"cannot connect to ZooKeeper at {self._settings.hosts} within "
                f"{self._settings.connect_timeout:g}s: check zookeeper.hosts and that the "
                "ensemble is up"
            ) from exc
        self._session_id = self._client.client_id[0] if self._client.client_id else None
        self._client.add_listener(self._on_state)

    async def stop(self) -> None:
        try:
            await asyncio.to_thread(self._client.stop)
        finally:
            await asyncio.to_thread(self._client.close)

    async def restart(self) -> None:
        """Drop the session and connect afresh.

        A client that has seen zxids newer than what a restored or wiped
        ensemble holds is refused by it forever; only a new client state
        (kazoo's restart resets the last zxid seen) gets back in.
        """
        await asyncio.to_thread(self._client.restart)

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
                fut.set_exception(_translate(ar.exception, what))

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

    def _call(self, fn: Callable[..., Any], *args: Any, what: str) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # kazoo raises synchronously when not connected
            raise _translate(exc, what) from exc

    # -- reads ---------------------------------------------------------
    async def get(self, path: str, *, watch: bool = False) -> Node | None:
        w = self._kazoo_watch if watch else None
        while True:
            try:
                data, stat = await self._await(
                    self._call(self._client.get_async, path, w, what=f"get {path}"),
                    f"get {path}",
                )
                return Node(data or b"", _stat(stat))
            except MissingNode:
                # Arm a creation watch so a node created later is seen; if it
                # was created in between, read it again instead of missing it.
                if not watch or await self.exists(path, watch=True) is None:
                    return None

    async def exists(self, path: str, *, watch: bool = False) -> Stat | None:
        w = self._kazoo_watch if watch else None
        stat = await self._await(
            self._call(self._client.exists_async, path, w, what=f"exists {path}"),
            f"exists {path}",
        )
        return _stat(stat) if stat is not None else None

    async def children(self, path: str, *, watch: bool = False) -> list[str] | None:
        w = self._kazoo_watch if watch else None
        try:
            names = await self._await(
                self._call(self._client.get_children_async, path, w, what=f"ls {path}"),
                f"ls {path}",
            )
        except MissingNode:
            return None
        return list(names)

    async def sync(self, path: str) -> None:
        await self._await(self._call(self._client.sync_async, path, what="sync"), "sync")

    # -- writes --------------------------------------------------------
    async def ensure_path(self, path: str) -> None:
        """Create ``path`` and its ancestors if missing.

        Looks up from the deepest level first: in the common case (the
        parent exists) this is one or two requests, not one per level.
        """
        missing: list[str] = []
        cur = path
        while cur and cur != "/" and await self.exists(cur) is None:
            missing.append(cur)
            cur = cur.rsplit("/", 1)[0]
        for p in reversed(missing):
            # NodeExists (VersionConflict here): someone made it meanwhile.
            with contextlib.suppress(VersionConflict):
                await self._await(
                    self._call(self._client.create_async, p, b"", what=f"create {p}"),
                    f"create {p}",
                )

    async def set_data(self, path: str, data: bytes, version: int = -1) -> Stat:
        stat = await self._await(
            self._call(self._client.set_async, path, data, version, what=f"set {path}"),
            f"set {path}",
        )
        return _stat(stat)

    async def create(
        self, path: str, data: bytes = b"", *, ephemeral: bool = False, sequence: bool = False
    ) -> str:
        created: str = await self._await(
            self._call(
                self._client.create_async, path, data, None, ephemeral, sequence,
                what=f"create {path}",
            ),
            f"create {path}",
        )
        return created

    async def wait_deleted(self, path: str, recheck: float = 2.0) -> None:
        """Return once ``path`` does not exist.

        A private one-shot watch wakes us; the periodic re-check covers a
        session lost meanwhile, when ZooKeeper drops the watch silently.
        """
        loop = self._loop or asyncio.get_running_loop()
        while True:
            fired = asyncio.Event()

            def wake(_event: Any, fired: asyncio.Event = fired) -> None:
                if not loop.is_closed():
                    loop.call_soon_threadsafe(fired.set)

            stat = await self._await(
                self._call(self._client.exists_async, path, wake, what=f"exists {path}"),
                f"exists {path}",
            )
            if stat is None:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(recheck):
                    await fired.wait()

    async def delete(self, path: str, version: int = -1) -> None:
        with contextlib.suppress(MissingNode):
            await self._await(
                self._call(self._client.delete_async, path, version, what=f"delete {path}"),
                f"delete {path}",
            )

    async def multi(self, ops: Sequence[Op], *, fenced: bool = True) -> list[Any]:
        """Commit ``ops`` atomically, behind the epoch check when ``fenced``.

        Returns kazoo's per-op results (created paths for creates). Raises
        ``FencedError`` when the epoch moved, ``VersionConflict`` when another
        check or create/delete precondition failed (re-read and retry).
        """
        all_ops: list[Op] = list(ops)
        if fenced:
            if self.fence is None:
                raise FencedError("no epoch taken: this bridge does not lead its region")
            all_ops.insert(0, self.fence)
        t = self._client.transaction()
        for op in all_ops:
            if isinstance(op, Check):
                t.check(op.path, op.version)
            elif isinstance(op, Create):
                t.create(op.path, op.data, sequence=op.sequential)
            elif isinstance(op, SetData):
                t.set_data(op.path, op.data, op.version)
            else:
                t.delete(op.path, op.version)
        results = await self._await(self._call(t.commit_async, what="multi"), "multi")
        failed = [
            (op, r)
            for op, r in zip(all_ops, results, strict=False)
            if isinstance(r, Exception) and not isinstance(r, RolledBackError)
        ]
        if failed:
            op, err = failed[0]
            if fenced and op is all_ops[0]:
                raise FencedError(
                    f"epoch {self.fence.path if self.fence else ''} moved: another bridge "
                    "now leads this region"
                )
            raise VersionConflict(f"multi failed at {type(op).__name__} {op.path}: "
                                  f"{type(err).__name__}")
        return list(results)

    async def take_epoch(self, epoch_path: str, holder: bytes) -> int:
        """Bump the epoch znode and fence every later multi on the new version."""
        await self.ensure_path(epoch_path)
        stat = await self.set_data(epoch_path, holder)
        self.fence = Check(epoch_path, stat.version)
        return stat.version


async def gather_limited(coros: Sequence[Any], limit: int) -> list[Any]:
    """Run awaitables with at most ``limit`` in flight (pipelining ZooKeeper calls)."""
    sem = asyncio.Semaphore(limit)

    async def one(c: Any) -> Any:
        async with sem:
            return await c

    return list(await asyncio.gather(*(one(c) for c in coros)))
