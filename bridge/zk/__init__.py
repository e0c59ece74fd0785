"""The ZooKeeper adapter: the only package that imports kazoo.

``session`` is the asyncio API over one session (``ZooKeeper``), ``values``
what it takes and returns, ``wire`` the request types and socket I/O kazoo
2.11 lacks. Everything else in the bridge imports from here.
"""

from bridge.zk.session import ACL_CHUNK, ZooKeeper, gather_limited
from bridge.zk.values import (
    WORLD_ALL,
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

__all__ = ["ACL_CHUNK", "WORLD_ALL", "BatchedClient", "Check", "Create", "Delete", "Node", "Op",
           "SessionCallback", "SetData", "Stat", "TreeCallback", "Watch", "WatchCallback",
           "ZooKeeper", "acl_text", "gather_limited", "own_acl"]
