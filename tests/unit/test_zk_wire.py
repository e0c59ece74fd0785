"""The adapter's replacements of kazoo's parts against kazoo's own, without servers.

``bridge.zk.wire.Multi`` replaces kazoo's TransactionRequest and
``Handler.select`` kazoo's ``selector_select``, for speed only: what goes on
the wire, and what a select answers, must be exactly what kazoo's would.
"""

from __future__ import annotations

import logging
import socket
import struct
from typing import Any

import pytest
from kazoo.client import TransactionRequest
from kazoo.handlers.utils import fileobj_to_fd, selector_select
from kazoo.protocol.serialization import Transaction
from kazoo.security import OPEN_ACL_UNSAFE, make_digest_acl

from bridge.zk import Check, Create, Delete, SetData
from bridge.zk.wire import Client, Handler, Multi


class FakeClient:
    def __init__(self, chroot: str) -> None:
        self.chroot = chroot
        self.default_acl = None
        self.logger = logging.getLogger("kazoo.test")


def kazoo_bytes(chroot: str, ops: list[tuple[object, list[object] | None]]) -> bytes:
    t = TransactionRequest(FakeClient(chroot))
    for op, acl in ops:
        if isinstance(op, Check):
            t.check(op.path, op.version)
        elif isinstance(op, Create):
            t.create(op.path, op.data, acl=acl, sequence=op.sequential)
        elif isinstance(op, SetData):
            t.set_data(op.path, op.data, op.version)
        else:
            assert isinstance(op, Delete)
            t.delete(op.path, op.version)
    return bytes(Transaction(t.operations).serialize())


OPS: list[tuple[object, list[object] | None]] = [
    (Check("/zkbridge/epoch", 7), None),
    (Create("/zkbridge/outbox/q-0000000001/b-", b"\x00\x01payload", sequential=True),
     list(OPEN_ACL_UNSAFE)),
    (Create("/app/critical/d\u00e9j\u00e0", b"", acl=None),
     [make_digest_acl("bridge", "secret", all=True), *OPEN_ACL_UNSAFE]),
    (SetData("/app/critical/a", b"v" * 300, 12), None),
    (SetData("/app/critical/empty", b"", -1), None),
    (Delete("/app/critical/gone", 3), None),
    (Delete("/app/critical/any"), None),
]


def test_multi_serializes_as_kazoo_does() -> None:
    for chroot in ("", "/tenant"):
        ours = Multi([(op, acl) for op, acl in OPS], chroot).serialize()  # type: ignore[misc]
        assert bytes(ours) == kazoo_bytes(chroot, OPS)


def test_an_empty_multi_is_just_the_end_marker() -> None:
    assert bytes(Multi([], "").serialize()) == kazoo_bytes("", [])


Case = tuple[list[Any], list[Any], list[Any], float | None]
Ready = tuple[list[Any], list[Any], list[Any]]


def in_any_order(ready: Ready) -> list[list[int]]:
    # The selectors module answers in the kernel's order of readiness; callers only test membership.
    return [sorted(fileobj_to_fd(obj) for obj in objects) for objects in ready]


def test_select_answers_as_kazoos_does() -> None:
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    try:
        ours = Handler().select
        cases: list[Case] = [([a, c], [], [], 0), ([a, c], [b, d], [], 0), ([], [b], [], 0.01)]
        for case in cases:
            assert in_any_order(ours(*case)) == in_any_order(selector_select(*case))
        assert ours([a, c], [], [], 0.01) == ([], [], [])  # nothing to read: times out
        b.send(b"x")
        d.close()  # a hang-up reads as readable: the next recv tells
        cases = [([a, c], [], [], 0), ([a], [b], [], None), ([a.fileno()], [], [], 0)]
        for case in cases:
            assert in_any_order(ours(*case)) == in_any_order(selector_select(*case))
        assert ours([a, c], [], [], 0) == ([a, c], [], [])
        with pytest.raises(ValueError):
            ours([a], [], [], -1)
    finally:
        for s in (a, b, c, d):
            s.close()


def watch_frame(kind: int, path: str) -> bytes:
    body = struct.pack(">iqi", -1, 7, 0) + struct.pack(">iii", kind, 3, len(path)) + path.encode()
    return struct.pack(">i", len(body)) + body


def test_buffered_watch_events_are_read_in_one_pass_and_one_shot_watchers_still_fire() -> None:
    """The fast path taken for frames already read: each event parsed once, numbered in
    arrival order, handed on together; kazoo's one-shot watchers still get theirs."""
    client = Client(hosts="127.0.0.1:1")
    client._stopped.clear()  # as once started: kazoo drops watch events of a stopped client
    conn = client._connection
    got: list[list[tuple[int, str, int]]] = []
    conn.on_persistent = got.append
    fired: list[Any] = []
    client._data_watchers["/m/b"].add(fired.append)
    conn._rbuf = bytearray(watch_frame(3, "/m/a") + watch_frame(3, "/m/b")
                           + watch_frame(2, "/m/c"))
    conn._read_socket(0)
    assert got == [[(3, "/m/a", 1), (3, "/m/b", 2), (2, "/m/c", 3)]]
    assert conn._rbuf == bytearray()
    callback = client.handler.callback_queue.get_nowait()
    callback()
    assert [(e.type, e.path) for e in fired] == [("CHANGED", "/m/b")]
    assert client.handler.callback_queue.empty()
