"""The adapter's own ``multi`` serialization against kazoo's, byte for byte.

No servers: ``bridge.zk.wire.Multi`` replaces kazoo's TransactionRequest for speed only,
so what goes on the wire must be exactly what kazoo would have sent.
"""

from __future__ import annotations

import logging

from kazoo.client import TransactionRequest
from kazoo.protocol.serialization import Transaction
from kazoo.security import OPEN_ACL_UNSAFE, make_digest_acl

from bridge.zk import Check, Create, Delete, SetData
from bridge.zk.wire import Multi


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
