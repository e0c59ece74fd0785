"""Values of the ZooKeeper adapter: znodes, stats, the operations of a ``multi``, watches.

Frozen, so that what a reply carried can be handed between kazoo's thread
and the event loop unchanged; the kazoo objects they are made from stay in
this package.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kazoo.security import ACL, Id, make_digest_acl

from bridge.config import ZooKeeperSettings


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
    data_length: int = 0


@dataclass(frozen=True, slots=True)
class Node:
    data: bytes
    stat: Stat


@dataclass(frozen=True, slots=True)
class AclRead:
    """A znode's ACL ("perms:scheme:id" entries) as read, and which znode and ACL version
    it belongs to: a znode deleted and created again has a new ``czxid``, and its
    ``aversion`` starts again at 0."""

    entries: tuple[str, ...]
    aversion: int
    czxid: int


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
``Connection``): a change notified with a lower frame than a reply was made
before the request answered by that reply.
"""

SessionCallback = Callable[[str, bool], None]
"""(state name, new session?) — always called on the event loop."""


WORLD_ALL = ("31:world:anyone",)


def acl_text(acl: Any) -> str:
    return f"{acl.perms}:{acl.id.scheme}:{acl.id.id}"


def acl_entries(entries: Sequence[str] | None) -> list[ACL] | None:
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


def stat_of(s: Any) -> Stat:
    return Stat(
        version=s.version,
        cversion=s.cversion,
        num_children=s.numChildren,
        ephemeral=bool(s.ephemeralOwner),
        czxid=s.czxid,
        mzxid=s.mzxid,
        pzxid=s.pzxid,
        aversion=s.aversion,
        data_length=s.dataLength,
    )

