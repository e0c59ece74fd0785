"""kazoo's wire protocol, extended: the request types kazoo 2.11 lacks and batched socket I/O.

The read-only multi (ZooKeeper >= 3.6, opcode 22), addWatch (>= 3.6, opcode
106) and a one-pass ``multi``, written on kazoo's own protocol classes; a
connection that delivers persistent-watch events and numbers what the
session receives (frames); and a client that queues many requests with one
wake-up. Only new request types are added; kazoo's behaviour is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import (
    EXCEPTIONS,
    AuthFailedError,
    ConnectionClosedError,
    ConnectionDropped,
    SessionExpiredError,
)
from kazoo.handlers.threading import SequentialThreadingHandler
from kazoo.handlers.utils import fileobj_to_fd
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
    GetChildren,
    GetData,
    MultiHeader,
    ReplyHeader,
    Transaction,
    ZnodeStat,
    int_struct,
    multiheader_struct,
    read_buffer,
    read_string,
    stat_struct,
    write_string,
)
from kazoo.protocol.states import KeeperState
from kazoo.security import ACL

from bridge.zk.values import Check, Create, Op, SetData

_WATCH_HEAD = struct.Struct(">iii")  # a watch event: type, state, path length
PERSISTENT_RECURSIVE = 1  # addWatch mode: one watch on a whole subtree, kept after it fires


class MultiRead:
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


class Multi:
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


class AddWatch:
    type = 106

    def __init__(self, path: str, mode: int) -> None:
        self.path = path
        self.mode = mode

    def serialize(self) -> bytearray:
        return bytearray(write_string(self.path) + int_struct.pack(self.mode))

    @classmethod
    def deserialize(cls, raw: bytes, offset: int) -> bool:
        return True


class Handler(SequentialThreadingHandler):  # type: ignore[misc]
    """kazoo's threading handler with a ``select`` that costs one system call.

    kazoo's builds an epoll selector per call (create, register, wait,
    close: four system calls and a dozen Python objects), and its connection
    thread selects before every read and every write. Profiled in steady
    state, that was about a fifth of the connection thread's time, taken
    from the GIL the event loop needs. ``poll`` has no descriptor limit
    either, which is why kazoo left ``select.select``.
    """

    def select(self, rlist: Sequence[Any], wlist: Sequence[Any], xlist: Sequence[Any],
               timeout: float | None = None) -> tuple[list[Any], list[Any], list[Any]]:
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be non-negative")
        poller = select.poll()
        reads: dict[int, list[Any]] = {}
        writes: dict[int, list[Any]] = {}
        for objects, into in ((rlist, reads), (wlist, writes)):
            for obj in objects:
                into.setdefault(fileobj_to_fd(obj), []).append(obj)
        for fd in dict.fromkeys([*reads, *writes]):  # in the caller's order, kept by poll
            poller.register(fd, (select.POLLIN if fd in reads else 0)
                            | (select.POLLOUT if fd in writes else 0))
        readable: list[Any] = []
        writable: list[Any] = []
        for fd, got in poller.poll(None if timeout is None else math.ceil(timeout * 1000)):
            # Read as the selectors module reads it: an error or a hang-up
            # makes a descriptor ready both ways, and the caller's next recv
            # or send reports it.
            if got & ~select.POLLOUT:
                readable += reads.get(fd, ())
            if got & ~select.POLLIN:
                writable += writes.get(fd, ())
        return readable, writable, []


# Requests taken from kazoo's queue per wake-up of its connection thread.
SEND_BATCH = 1024
RECV_CHUNK = 256 * 1024


class Connection(ConnectionHandler):  # type: ignore[misc]
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
        if self.on_persistent is None:
            super()._read_watch_event(buffer, offset)
            return
        kind, _state, size = _WATCH_HEAD.unpack_from(buffer, offset)
        start = offset + _WATCH_HEAD.size
        path = buffer[start:start + size].decode() if size > 0 else ""
        # Gathered, and handed on before the next reply (``_read_response``)
        # or at the end of the read: a burst of events costs the event loop
        # one wake-up, not one each, and still reaches it before any reply
        # read after them.
        if self._notes is None:
            self._notes = []
        self._notes.append((kind, path, self.frames))
        client = self.client
        # kazoo's own handling only serves one-shot watchers (by exact path);
        # skipped when there is none, as for every event of a persistent
        # watch: it parsed each event again and built a WatchedEvent for
        # nobody, a fifth of the connection thread's time in steady state.
        if path in client._data_watchers or path in client._child_watchers:
            super()._read_watch_event(buffer, offset)

    def _read_header(self, timeout: float) -> tuple[Any, bytes, int]:
        buf = self._rbuf
        if self._bulk and self._frame_buffered():
            # The whole frame is read already: taken at once, without kazoo's
            # two reads (each a context manager and a copy).
            end = 4 + int_struct.unpack_from(buf, 0)[0]
            frame = bytes(buf[4:end])
            del buf[:end]
            header, offset = ReplyHeader.deserialize(frame, 0)
            return header, frame, offset
        result: tuple[Any, bytes, int] = super()._read_header(timeout)
        return result

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


class Slot:
    """Where kazoo's connection puts one answer of a ``Many`` (it calls only these)."""

    __slots__ = ("fired", "index", "many", "zkb_frame")

    def __init__(self, many: Many, index: int) -> None:
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


class Many:
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

    def slots(self) -> list[Slot]:
        return [Slot(self, i) for i in range(len(self.values))]

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


class Client(KazooClient):  # type: ignore[misc]
    """KazooClient with the two request types above and bulk queueing; nothing else differs."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("handler", Handler())
        super().__init__(**kwargs)
        self._connection = Connection(
            self, self._conn_retry.copy(), logger=self.logger,
            sasl_options=kwargs.get("sasl_options"),
        )

    def multi_read_async(self, ops: Sequence[tuple[str, str]]) -> Any:
        return self.submit(MultiRead(ops))

    def add_watch_async(self, path: str, mode: int) -> Any:
        return self.submit(AddWatch(path, mode))

    def submit(self, request: Any) -> Any:
        """Queue one request of ours: kazoo's AsyncResult of its answer."""
        result = self.handler.async_result()
        self._call(request, result)
        return result

    def call_many(self, requests: Sequence[Any], slots: Sequence[Slot]) -> None:
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
BatchedClient = Client
