"""One ZooKeeper session as an asyncio API over kazoo's threads.

Every call is issued with kazoo's ``*_async`` variant (or queued in bulk,
``bridge.zk.wire``) and its result handed to the event loop with
``call_soon_threadsafe``, so the loop never blocks on ZooKeeper. Watch and
session callbacks are handed over the same way. kazoo's exceptions are
translated into ``bridge.errors`` by ``bridge.zk.errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import structlog
from kazoo.client import KazooState
from kazoo.exceptions import NoAuthError, NoNodeError, RolledBackError, UnimplementedError
from kazoo.protocol.paths import _prefix_root
from kazoo.protocol.serialization import GetACL
from kazoo.protocol.states import EventType, WatchedEvent
from kazoo.retry import KazooRetry
from kazoo.security import ACL, OPEN_ACL_UNSAFE

from bridge.config import ZooKeeperSettings
from bridge.errors import (
    FencedError,
    MissingNode,
    NoPermission,
    VersionConflict,
    ZooKeeperError,
)
from bridge.zk.errors import translate
from bridge.zk.values import (
    Check,
    Create,
    Delete,
    Node,
    Op,
    SessionCallback,
    Stat,
    TreeCallback,
    Watch,
    WatchCallback,
    acl_entries,
    acl_text,
    own_acl,
    stat_of,
)
from bridge.zk.wire import PERSISTENT_RECURSIVE, Client, Many, Multi

log = structlog.get_logger("bridge.zk")

T = TypeVar("T")
EventType_CHILD = 4  # ZooKeeper's NodeChildrenChanged



# A bulk getACL: requests per wait, and waits in flight. A start-up capture of
# 100,000 new znodes once sent them all at once and the last answers came after
# the adapter's timeout, so every attempt failed and started over.
ACL_CHUNK = 1000
ACL_CHUNKS_IN_FLIGHT = 4


class ZooKeeper:
    """One session with one region's ensemble.

    ``fence`` (set after the bridge takes its epoch) is a ``Check`` prepended
    to every multi: if another bridge has bumped the epoch since, the multi
    fails and ``FencedError`` is raised instead of writing.
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
        )
        self._settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session_cbs: list[SessionCallback] = []
        self._session_id: int | None = None
        self._watch_cb: WatchCallback | None = None
        self._tree_cb: TreeCallback | None = None
        self._tree_roots: tuple[str, ...] = ()
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

    def _create_acl(self, op: Create) -> list[ACL]:
        """The ACL a ``multi``'s create is sent with, as kazoo's ``create`` picks it."""
        acl = self._acl_for(op.path, op.acl)
        if acl is None:
            acl = self._client.default_acl or OPEN_ACL_UNSAFE
        return list(acl)

    def _acl_for(self, path: str, entries: Sequence[str] | None) -> list[ACL] | None:
        if entries is not None or self._private is None:
            return acl_entries(entries)
        root, acl = self._private
        return acl if path == root or path.startswith(root + "/") else None

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
            try:
                await asyncio.to_thread(self._client.close)
            except Exception as exc:  # kazoo: "Cannot close connection until it is stopped"
                log.warning("zookeeper_close_failed", error=str(exc))

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

    def on_tree(self, cb: TreeCallback) -> None:
        self._tree_cb = cb

    def _persistent_events(self, notes: list[tuple[int, str, int]]) -> None:
        # kazoo's connection thread; persistent events carry no "child" kind.
        # Handed to the loop directly, while replies go through kazoo's
        # completion thread: every notification numbered below a reply
        # reaches the loop before that reply does.
        loop, cb = self._loop, self._tree_cb
        if loop is None or cb is None or loop.is_closed():
            return
        roots = self._tree_roots
        mine = [(path, frame) for kind, path, frame in notes if kind != EventType_CHILD
                and any(path == r or path.startswith(r + "/") for r in roots)]
        if mine:
            loop.call_soon_threadsafe(self._deliver, cb, mine)

    @staticmethod
    def _deliver(cb: TreeCallback, notes: list[tuple[str, int]]) -> None:
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

    # -- reads ---------------------------------------------------------
    async def get(self, path: str, *, watch: bool = False) -> Node | None:
        w = self._kazoo_watch if watch else None
        while True:
            try:
                data, stat = await self._await(
                    self._call(self._client.get_async, path, w, what=f"get {path}"),
                    f"get {path}",
                )
                return Node(data or b"", stat_of(stat))
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
        return stat_of(stat) if stat is not None else None

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

    async def read_many(self, ops: Sequence[tuple[str, str]]) -> list[Any]:
        """Read many znodes (``("data", path)``) and listings (``("children", path)``) at once.

        One request, one consistent snapshot. Per op: a ``Node`` or a list of
        names; ``None`` if the znode does not exist; a ``NoPermission``
        instance where the ACL forbids reading (a per-path condition).
        """
        return (await self.read_many_framed(ops))[0]

    async def read_many_framed(self, ops: Sequence[tuple[str, str]]) -> tuple[list[Any], int]:
        """``read_many``, also returning the frame number of its reply (``Connection``):
        a notification numbered below it is of a change the read saw."""
        if not ops:
            return [], 0
        pending = self._call(self._client.multi_read_async, list(ops), what="multiRead")
        raw = await self._await(pending, f"multiRead of {len(ops)}")
        frame = int(getattr(pending, "zkb_frame", 0))
        out: list[Any] = []
        for (_kind, path), res in zip(ops, raw, strict=True):
            if isinstance(res, NoNodeError):
                out.append(None)
            elif isinstance(res, NoAuthError):
                out.append(NoPermission(f"read {path}: not allowed by the znode's ACL"))
            elif isinstance(res, Exception):
                raise ZooKeeperError(f"read {path}: {type(res).__name__}")
            elif isinstance(res, tuple):
                out.append(Node(res[0] or b"", stat_of(res[1])))
            else:
                out.append(list(res))
        return out, frame

    async def add_recursive_watch(self, path: str) -> bool:
        """One persistent recursive watch on ``path``; False if the server lacks addWatch.

        Events for ``path`` and everything below reach the ``on_tree``
        callback until the session ends or the connection drops (kazoo does
        not restore persistent watches on reconnect: callers re-add and rescan).
        """
        if self.refuse_add_watch:
            return False
        try:
            await self._await(
                self._call(self._client.add_watch_async, path, PERSISTENT_RECURSIVE,
                           what=f"addWatch {path}"),
                f"addWatch {path}",
            )
        except ZooKeeperError as exc:
            if isinstance(exc.__cause__, UnimplementedError) or "Unimplemented" in str(exc):
                return False
            raise
        if path not in self._tree_roots:
            self._tree_roots = (*self._tree_roots, path)
        return True

    async def get_acls(self, path: str) -> tuple[tuple[str, ...], int] | None:
        """The znode's ACL as "perms:scheme:id" entries, with its aversion; None if absent."""
        try:
            acls, stat = await self._await(
                self._call(self._client.get_acls_async, path, what=f"getACL {path}"),
                f"getACL {path}",
            )
        except MissingNode:
            return None
        return tuple(acl_text(a) for a in acls), stat.aversion

    async def get_acls_many(self, paths: Sequence[str]
                            ) -> list[tuple[tuple[str, ...], int] | None]:
        """``get_acls`` of every path, pipelined (``multiRead`` cannot read ACLs).

        Each chunk's answers become plain tuples as they arrive, equal ACLs
        shared: kazoo's objects for 100,000 znodes, held until the last chunk,
        were tens of MB of a start-up capture's peak.
        """
        shared: dict[tuple[str, ...], tuple[str, ...]] = {}

        async def chunk(part: Sequence[str]) -> list[tuple[tuple[str, ...], int] | None]:
            what = f"getACL of {len(part)} from {part[0]}"
            got = await self._many([GetACL(_prefix_root(self._client.chroot, p)) for p in part],
                                   what)
            out: list[tuple[tuple[str, ...], int] | None] = []
            for item in got:
                if isinstance(item, MissingNode):
                    out.append(None)
                elif isinstance(item, BaseException):
                    raise item
                else:
                    acls, stat = item
                    entries = tuple(acl_text(a) for a in acls)
                    out.append((shared.setdefault(entries, entries), stat.aversion))
            return out

        parts = [paths[i:i + ACL_CHUNK] for i in range(0, len(paths), ACL_CHUNK)]
        return [item for got in await gather_limited([chunk(p) for p in parts],
                                                     ACL_CHUNKS_IN_FLIGHT) for item in got]

    async def set_acls(self, path: str, entries: Sequence[str], version: int = -1) -> None:
        await self._await(
            self._call(self._client.set_acls_async, path, acl_entries(entries), version,
                       what=f"setACL {path}"),
            f"setACL {path}",
        )

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
                    self._call(self._client.create_async, p, b"", self._acl_for(p, None),
                               what=f"create {p}"),
                    f"create {p}",
                )

    async def set_data(self, path: str, data: bytes, version: int = -1) -> Stat:
        stat = await self._await(
            self._call(self._client.set_async, path, data, version, what=f"set {path}"),
            f"set {path}",
        )
        return stat_of(stat)

    async def create(
        self, path: str, data: bytes = b"", *, ephemeral: bool = False, sequence: bool = False
    ) -> str:
        created: str = await self._await(
            self._call(
                self._client.create_async, path, data, self._acl_for(path, None), ephemeral,
                sequence,
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

    async def delete_many(self, paths: Sequence[str]) -> None:
        """Delete znodes (already gone is fine): one request in the common case."""
        try:
            await self.multi([Delete(p) for p in paths], fenced=False)
        except VersionConflict:
            for p in paths:
                await self.delete(p)

    async def multi(self, ops: Sequence[Op], *, fenced: bool = True) -> list[Any]:
        """Commit ``ops`` atomically, behind the epoch check when ``fenced``.

        Returns kazoo's per-op results (created paths for creates). Raises
        ``FencedError`` when the epoch moved, ``VersionConflict`` when another
        check or create/delete precondition failed (re-read and retry).
        """
        results, _ = await self.commit(ops, fenced=fenced)
        return results

    async def commit(self, ops: Sequence[Op], *, fenced: bool = True) -> tuple[list[Any], int]:
        """``multi``, also returning the frame number of its reply (``Connection``).

        A persistent-watch notification of a path this ``multi`` wrote, numbered
        below that frame, is of a change at or before it.
        """
        all_ops: list[Op] = list(ops)
        if fenced:
            if self.fence is None:
                raise FencedError("no epoch taken: this bridge does not lead its region")
            all_ops.insert(0, self.fence)
        request = Multi([(op, self._create_acl(op) if isinstance(op, Create) else None)
                          for op in all_ops], self._client.chroot)
        pending = self._call(self._client.submit, request, what="multi")
        results = await self._await(pending, "multi")
        frame = int(getattr(pending, "zkb_frame", 0))
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
            if isinstance(err, NoAuthError):
                raise NoPermission(f"{type(op).__name__} {op.path}: not allowed by the ACL",
                                   path=op.path)
            raise VersionConflict(f"multi failed at {type(op).__name__} {op.path}: "
                                  f"{type(err).__name__}")
        return list(results), frame

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

