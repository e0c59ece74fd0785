"""The ZooKeeper adapter: the only package that imports kazoo.

``zookeeper`` is the asyncio API over one session (``ZooKeeper``), built on
``session`` (its lifecycle, callbacks and call plumbing) and ``errors`` (kazoo's
exceptions in the bridge's terms); ``values`` is what it takes and returns,
``wire`` the request types and socket I/O kazoo 2.11 lacks. Everything else in
the bridge imports from here.
"""

from bridge.zk.values import (
    WORLD_ALL,
    AclRead,
    Check,
    Create,
    Delete,
    Node,
    Op,
    SessionCallback,
    SetData,
    Stat,
    TreeCallback,
    Watch,
    WatchCallback,
    acl_text,
    own_acl,
)
from bridge.zk.wire import BatchedClient
from bridge.zk.zookeeper import ACL_CHUNK, ACL_CHUNKS_IN_FLIGHT, ZooKeeper, gather_limited

__all__ = ["ACL_CHUNK", "ACL_CHUNKS_IN_FLIGHT", "WORLD_ALL", "AclRead", "BatchedClient", "Check",
           "Create", "Delete", "Node", "Op", "SessionCallback", "SetData", "Stat", "TreeCallback",
           "Watch", "WatchCallback", "ZooKeeper", "acl_text", "gather_limited", "own_acl"]
