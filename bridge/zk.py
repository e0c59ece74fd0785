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
import os
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    EXCEPTIONS,
    AuthFailedError,
    BadVersionError,
    ConnectionClosedError,
    ConnectionDropped,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    NotEmptyError,
    OperationTimeoutError,
    RolledBackError,
    SessionExpiredError,
    UnimplementedError,
    ZookeeperError,
)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.connection import (
    _CONNECTION_DROP,
    _SESSION_EXPIRED,
    AUTH_XID,
    CLOSE_RESPONSE,
    ConnectionHandler,
)
from kazoo.protocol.paths import _prefix_root
from kazoo.protocol.serialization import (
    Auth,
    GetACL,
    GetChildren,
    GetData,
    MultiHeader,
    Transaction,
    ZnodeStat,
    int_struct,
    multiheader_struct,
    read_buffer,
    read_string,
    stat_struct,
    write_string,
)
from kazoo.protocol.serialization import Watch as WatchMessage
from kazoo.protocol.states import EventType, KeeperState, WatchedEvent
from kazoo.retry import KazooRetry
from kazoo.security import ACL, OPEN_ACL_UNSAFE, Id, make_digest_acl

from bridge.config import ZooKeeperSettings
from bridge.errors import (
    FencedError,
    MissingNode,
    NoPermission,
    VersionConflict,
    ZooKeeperError,
)

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
    pzxid: int = 0
    aversion: int = 0


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
    acl: tuple[str, ...] | None = None  # "perms:scheme:id" entries; None: open to all


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

TreeCallback = Callable[[str, int], None]
"""(absolute path, frame) of a change below a recursively watched root — on the event loop.

``frame`` numbers what the session received, in the order it arrived (see
``_Connection``): a change notified with a lower frame than a reply was made
before the request answered by that reply.
"""

SessionCallback = Callable[[str, bool], None]
"""(state name, new session?) — always called on the event loop."""


EventType_CHILD = 4  # ZooKeeper's NodeChildrenChanged
WORLD_ALL = ("31:world:anyone",)


def acl_text(acl: Any) -> str:
    return f"{acl.perms}:{acl.id.scheme}:{acl.id.id}"


def _acls(entries: Sequence[str] | None) -> list[ACL] | None:
    if entries is None:
        return None
    out = []
    for entry in entries:
        perms, scheme, ident = entry.split(":", 2)
        out.append(ACL(int(perms), Id(scheme, ident)))
    return out


def own_acl(settings: ZooKeeperSettings) -> str | None:
    """The ACL entry that lets this bridge's identity keep managing what it writes."""
    if settings.auth is None or settings.auth.scheme != "digest":
        return None
    user, _, password = settings.auth.credential.partition(":")
    return acl_text(make_digest_acl(user, password, all=True))


def _stat(s: Any) -> Stat:
    return Stat(
        version=s.version,
        cversion=s.cversion,
        num_children=s.numChildren,
        ephemeral=bool(s.ephemeralOwner),
        czxid=s.czxid,
        mzxid=s.mzxid,
        pzxid=s.pzxid,
        aversion=s.aversion,
    )


def _translate(exc: BaseException, what: str) -> BaseException:
    if isinstance(exc, NoNodeError):
        return MissingNode(what)
    if isinstance(exc, NoAuthError):
        return NoPermission(f"{what}: not allowed by the znode's ACL")
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



# --------------------------------------------------------------------------
# Request types kazoo 2.11 lacks, written on its own protocol classes: the
# read-only multi (ZooKeeper >= 3.6, opcode 22) and addWatch (>= 3.6, opcode
# 106). Only new request types are added; kazoo's behaviour is unchanged.

PERSISTENT_RECURSIVE = 1


class _MultiRead:
    """Many getData/getChildren in one request, answered at one zxid.

    The server runs it as one request in its commit processor, which never
    interleaves a read with a write being applied, so the reply is a
    snapshot: see ``tests/integration/test_zk_protocol.py``. Each op fails on
    its own (an error result in its slot); the others still answer.
    """

    type = 22

    def __init__(self, ops: Sequence[tuple[str, str]]) -> None:
        self.ops = list(ops)

    def serialize(self) -> bytearray:
        b = bytearray()
        for kind, path in self.ops:
            req = GetData(path, None) if kind == "data" else GetChildren(path, None)
            b.extend(MultiHeader(req.type, False, -1).serialize() + req.serialize())
        b.extend(multiheader_struct.pack(-1, True, -1))
        return b

    @classmethod
    def deserialize(cls, raw: bytes, offset: int) -> list[Any]:
        results: list[Any] = []
        header, offset = MultiHeader.deserialize(raw, offset)
        while not header.done:
            if header.type == GetData.type:
                data, offset = read_buffer(raw, offset)
                stat = ZnodeStat._make(stat_struct.unpack_from(raw, offset))
                offset += stat_struct.size
                results.append((data, stat))
            elif header.type == GetChildren.type:
                count = int_struct.unpack_from(raw, offset)[0]
                offset += int_struct.size
                names = []
                for _ in range(max(count, 0)):
                    name, offset = read_string(raw, offset)
                    names.append(name)
                results.append(names)
            else:  # -1: an error result for this op alone
                err = int_struct.unpack_from(raw, offset)[0]
                offset += int_struct.size
                results.append(EXCEPTIONS[err]())
            header, offset = MultiHeader.deserialize(raw, offset)
        return results


class _Multi:
    """A ``multi`` (opcode 14) serialized in one pass; answered as kazoo's ``Transaction``.

    kazoo's TransactionRequest normalizes every path and builds a bytes
    object per operation and per header: at a catch-up, serializing the
    thousand-event ``multi``s was about a sixth of the receiver's CPU
    (profiled). The paths here are the adapter's own, absolute and normal.
    """

    type = Transaction.type
    deserialize = Transaction.deserialize

    def __init__(self, ops: Sequence[tuple[Op, list[ACL] | None]], chroot: str) -> None:
        self.ops = ops  # each Create with the ACL it is created with
        self.chroot = chroot

    def serialize(self) -> bytearray:
        b = bytearray()
        header, integer = multiheader_struct.pack, int_struct.pack
        for op, acl in self.ops:
            path = (_prefix_root(self.chroot, op.path) if self.chroot else op.path).encode()
            if isinstance(op, SetData):
                b += header(5, False, -1)
                b += integer(len(path)) + path
                b += integer(len(op.data)) + op.data
                b += integer(op.version)
            elif isinstance(op, Create):
                b += header(1, False, -1)
                b += integer(len(path)) + path
                b += integer(len(op.data)) + op.data
                b += integer(len(acl or ()))
                for entry in acl or ():
                    b += integer(entry.perms)
                    b += write_string(entry.id.scheme) + write_string(entry.id.id)
                b += integer(2 if op.sequential else 0)
            else:  # Check (13) and Delete (2): a path and a version
                b += header(13 if isinstance(op, Check) else 2, False, -1)
                b += integer(len(path)) + path
                b += integer(op.version)
        b += header(-1, True, -1)
        return b


class _AddWatch:
    type = 106

    def __init__(self, path: str, mode: int) -> None:
        self.path = path
        self.mode = mode

    def serialize(self) -> bytearray:
        return bytearray(write_string(self.path) + int_struct.pack(self.mode))

    @classmethod
    def deserialize(cls, raw: bytes, offset: int) -> bool:
        return True


# A bulk getACL: requests per wait, and waits in flight. A start-up capture of
# 100,000 new znodes once sent them all at once and the last answers came after
# the adapter's timeout, so every attempt failed and started over.
ACL_CHUNK = 1000
ACL_CHUNKS_IN_FLIGHT = 4
# Requests taken from kazoo's queue per wake-up of its connection thread.
SEND_BATCH = 1024
RECV_CHUNK = 256 * 1024


class _Connection(ConnectionHandler):  # type: ignore[misc]
    """kazoo's connection, plus persistent recursive watch events and batched socket I/O.

    kazoo looks up one-shot watchers by exact path and drops anything else;
    events of a persistent recursive watch name descendants, so they are
    offered to ``on_persistent`` first. One-shot watchers still run as before.

    kazoo's loop sends one request per wake-up (a ``select``, a ``send`` and a
    ``recv`` of its wake-up byte) and reads each reply with two ``select`` and
    ``recv`` pairs: about 2,000 pipelined ``getACL`` per second on this
    machine, whatever the server can take. Here every queued request goes out
    in one write, and replies are read in large chunks and all handled before
    the loop selects again. Requests still leave, and replies are still
    matched, in the order kazoo queued them.

    Every frame received (a reply or a watch event) is numbered in arrival
    order. ZooKeeper sends a session the notifications a write triggers
    before that write's reply, so a notification numbered below a ``multi``'s
    reply is of a change at or before that ``multi`` (``ZooKeeper.commit``).
    """

    # Persistent-watch events, handed on in runs: (type, path, frame) each.
    on_persistent: Callable[[list[tuple[int, str, int]]], None] | None = None
    frames = 0
    _notes: list[tuple[int, str, int]] | None = None
    _rbuf: bytearray
    _bulk: bool = False
    _xid: int

    def _read_watch_event(self, buffer: bytes, offset: int) -> None:
        self.frames += 1
        if self.on_persistent is not None:
            event, _ = WatchMessage.deserialize(buffer, offset)
            # Gathered, and handed on before the next reply (``_read_response``)
            # or at the end of the read: a burst of events costs the event loop
            # one wake-up, not one each, and still reaches it before any reply
            # read after them.
            if self._notes is None:
                self._notes = []
            self._notes.append((event.type, event.path, self.frames))
        super()._read_watch_event(buffer, offset)

    def _hand_on(self) -> None:
        notes, self._notes = self._notes, None
        if notes and self.on_persistent is not None:
            self.on_persistent(notes)

    def _read_response(self, header: Any, buffer: bytes, offset: int) -> Any:
        self._hand_on()
        self.frames += 1
        pending = self.client._pending
        if pending and pending[0][1] is not None:
            pending[0][1].zkb_frame = self.frames  # read by ZooKeeper.commit
        return super()._read_response(header, buffer, offset)

    def _connect(self, host: str, hostip: str, port: int) -> Any:
        self._rbuf = bytearray()  # nothing read on an old socket belongs to a new one
        return super()._connect(host, hostip, port)

    def _send_request(self, read_timeout: float, connect_timeout: float) -> None:
        client = self.client
        try:
            # One wake-up byte per queued request; the byte is sent after its
            # request was queued, so each byte read stands for one request there.
            wakes = len(self._read_sock.recv(SEND_BATCH, socket.MSG_DONTWAIT))
        except OSError:
            return
        out = bytearray()
        hook: Exception | None = None
        with contextlib.suppress(IndexError):
            for _ in range(wakes):
                request, async_object = client._queue[0]
                # kazoo's test hooks, raised where kazoo raises them.
                if request is _SESSION_EXPIRED:
                    hook = SessionExpiredError("Session expired: Testing")
                    break
                if request is _CONNECTION_DROP:
                    hook = ConnectionDropped("Connection dropped: Testing")
                    break
                if request.type == Auth.type:
                    xid = AUTH_XID
                else:
                    self._xid = (self._xid % 2147483647) + 1
                    xid = self._xid
                body = bytearray(int_struct.pack(xid))
                if request.type:
                    body += int_struct.pack(request.type)
                body += request.serialize()
                out += int_struct.pack(len(body)) + body
                client._queue.popleft()
                # Pending before the write: if the socket breaks halfway, kazoo
                # fails them with a connection loss instead of leaving them unanswered.
                client._pending.append((request, async_object, xid))
        if out:
            self._write(bytes(out), connect_timeout)
        if hook is not None:
            raise hook

    def _read_socket(self, read_timeout: float) -> Any:
        self._bulk = True
        try:
            result = super()._read_socket(read_timeout)
            # Replies already read into the buffer never wake the select again.
            while result != CLOSE_RESPONSE and (self._frame_buffered() or self._tls_pending()):
                result = super()._read_socket(read_timeout)
            return result
        finally:
            self._bulk = False
            self._hand_on()

    def _frame_buffered(self) -> bool:
        buf = self._rbuf
        return len(buf) >= 4 and len(buf) >= 4 + int_struct.unpack_from(buf, 0)[0]

    def _tls_pending(self) -> bool:
        pending = getattr(self._socket, "pending", None)
        return pending is not None and pending() > 0

    def _read(self, length: int, timeout: float) -> bytes:
        buf = self._rbuf
        if not self._bulk and len(buf) == 0:
            return bytes(super()._read(length, timeout))
        with self._socket_error_handling():
            while len(buf) < length:
                if not self._bulk:
                    buf += super()._read(length - len(buf), timeout)
                    break
                if not self._tls_pending() and not self.handler.select(
                        [self._socket], [], [], timeout)[0]:
                    raise self.handler.timeout_exception("socket time-out during read")
                try:
                    chunk = self._socket.recv(max(RECV_CHUNK, length - len(buf)))
                except ssl.SSLError as e:
                    if e.errno in (ssl.SSL_ERROR_WANT_READ, ssl.SSL_ERROR_WANT_WRITE):
                        continue
                    raise
                if not chunk:
                    raise ConnectionDropped("socket connection broken")
                buf += chunk
            out = bytes(buf[:length])
            del buf[:length]
            return out


class _Slot:
    """Where kazoo's connection puts one answer of a ``_Many`` (it calls only these)."""

    __slots__ = ("fired", "index", "many", "zkb_frame")

    def __init__(self, many: _Many, index: int) -> None:
        self.many = many
        self.index = index
        self.fired = False

    def set(self, value: Any = None) -> None:
        self._fire(value)

    def set_exception(self, exc: BaseException) -> None:
        self._fire(exc)

    def _fire(self, value: Any) -> None:
        # Once: a request failed while being queued is failed again when
        # kazoo empties its queue.
        if not self.fired:
            self.fired = True
            self.many.answer(self.index, value)


class _Many:
    """The answers to requests queued together, and one wake-up of the event loop for all.

    In place of kazoo's AsyncResult per request, which builds a Condition and
    hands its callbacks to a third thread when answered: with kazoo's wake-up
    send per request, most of a bulk getACL's cost (profiled at a start-up
    capture). An answer that is an exception is returned as one.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int) -> None:
        self.loop = loop
        self.values: list[Any] = [None] * n
        self.left = n
        self.lock = threading.Lock()
        self.done: asyncio.Future[None] = loop.create_future()

    def slots(self) -> list[_Slot]:
        return [_Slot(self, i) for i in range(len(self.values))]

    def answer(self, index: int, value: Any) -> None:
        self.values[index] = value
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if last and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class _Client(KazooClient):  # type: ignore[misc]
    """KazooClient with the two request types above and bulk queueing; nothing else differs."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._connection = _Connection(
            self, self._conn_retry.copy(), logger=self.logger,
            sasl_options=kwargs.get("sasl_options"),
        )

    def multi_read_async(self, ops: Sequence[tuple[str, str]]) -> Any:
        return self.submit(_MultiRead(ops))

    def add_watch_async(self, path: str, mode: int) -> Any:
        return self.submit(_AddWatch(path, mode))

    def submit(self, request: Any) -> Any:
        """Queue one request of ours: kazoo's AsyncResult of its answer."""
        result = self.handler.async_result()
        self._call(request, result)
        return result

    def call_many(self, requests: Sequence[Any], slots: Sequence[_Slot]) -> None:
        """Queue requests at once, as kazoo's ``_call`` does one: one wake-up send for all."""
        failed: BaseException | None = None
        if self._state == KeeperState.AUTH_FAILED:
            failed = AuthFailedError()
        elif self._state in (KeeperState.CLOSED, KeeperState.EXPIRED_SESSION):
            failed = (SessionExpiredError() if self._state == KeeperState.EXPIRED_SESSION
                      else ConnectionClosedError("Connection has been closed"))
        write_sock = self._connection._write_sock
        if failed is None and write_sock is None:
            failed = ConnectionClosedError("Connection has been closed")
        if failed is not None:
            for slot in slots:
                slot.set_exception(failed)
            return
        self._queue.extend(zip(requests, slots, strict=True))
        try:
            write_sock.send(b"\0" * len(requests))
        except OSError:
            # As kazoo: the connection is closing, and fails what it holds.
            for slot in slots:
                slot.set_exception(ConnectionClosedError("Connection has been closed"))

# The bench measures raw ZooKeeper rates through the same connection code.
BatchedClient = _Client


class ZooKeeper:
    """One session with one region's ensemble.

    ``fence`` (set after the bridge takes its epoch) is a ``Check`` prepended
    to every multi: if another bridge has bumped the epoch since, the multi
    fails and ``FencedError`` is raised instead of writing.
    """

    def __init__(self, settings: ZooKeeperSettings, *, read_only: bool = False,
                 private_root: str | None = None) -> None:
        auth = [(settings.auth.scheme, settings.auth.credential)] if settings.auth else None
        self._client = _Client(
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
        self._private = (private_root, _acls([own])) if own and private_root else None

    def _create_acl(self, op: Create) -> list[ACL]:
        """The ACL a ``multi``'s create is sent with, as kazoo's ``create`` picks it."""
        acl = self._acl_for(op.path, op.acl)
        if acl is None:
            acl = self._client.default_acl or OPEN_ACL_UNSAFE
        return list(acl)

    def _acl_for(self, path: str, entries: Sequence[str] | None) -> list[ACL] | None:
        if entries is not None or self._private is None:
            return _acls(entries)
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

    async def _many(self, requests: Sequence[Any], what: str) -> list[Any]:
        """Send kazoo requests together (``_Client.call_many``): each answer, or its
        translated error."""
        many = _Many(self._loop or asyncio.get_running_loop(), len(requests))
        self._call(self._client.call_many, requests, many.slots(), what=what)
        try:
            async with asyncio.timeout(max(self._settings.session_timeout, 5.0)):
                await many.done
        except TimeoutError as exc:
            raise ZooKeeperError(f"{what}: no answer from ZooKeeper") from exc
        return [_translate(v, what) if isinstance(v, BaseException) else v
                for v in many.values]

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

    async def read_many(self, ops: Sequence[tuple[str, str]]) -> list[Any]:
        """Read many znodes (``("data", path)``) and listings (``("children", path)``) at once.

        One request, one consistent snapshot. Per op: a ``Node`` or a list of
        names; ``None`` if the znode does not exist; a ``NoPermission``
        instance where the ACL forbids reading (a per-path condition).
        """
        return (await self.read_many_framed(ops))[0]

    async def read_many_framed(self, ops: Sequence[tuple[str, str]]) -> tuple[list[Any], int]:
        """``read_many``, also returning the frame number of its reply (``_Connection``):
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
                out.append(Node(res[0] or b"", _stat(res[1])))
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
            self._call(self._client.set_acls_async, path, _acls(entries), version,
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
        return _stat(stat)

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
        """``multi``, also returning the frame number of its reply (``_Connection``).

        A persistent-watch notification of a path this ``multi`` wrote, numbered
        below that frame, is of a change at or before it.
        """
        all_ops: list[Op] = list(ops)
        if fenced:
            if self.fence is None:
                raise FencedError("no epoch taken: this bridge does not lead its region")
            all_ops.insert(0, self.fence)
        request = _Multi([(op, self._create_acl(op) if isinstance(op, Create) else None)
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
