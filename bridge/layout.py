"""Where a subtree's znodes and state live, and how a znode compares with its metadata.

Pure: paths below a mount, the state layout under the state path, and the
classification of one znode against the bridge's record of it.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from bridge.model import NodeMeta, content_hash
from bridge.zk import Node


def parent(rel: str) -> str:
    return rel.rsplit("/", 1)[0] or "/"


def ancestors(rel: str) -> list[str]:
    """Proper ancestors below the mount, nearest first (``/a/b/c`` → ``/a/b``, ``/a``)."""
    out = []
    cur = parent(rel)
    while cur != "/":
        out.append(cur)
        cur = parent(cur)
    return out


def is_excluded(rel: str, exclude: Sequence[str]) -> bool:
    """Is ``rel`` one of the excluded paths or below one?"""
    return any(rel == x or rel.startswith(x + "/") for x in exclude)


def join(rel: str, name: str) -> str:
    return f"/{name}" if rel == "/" else f"{rel}/{name}"


def subtrees_root(state_path: str) -> str:
    """Where each subtree's state lives, one child per subtree replicated here."""
    return f"{state_path}/subtrees"


@dataclass(frozen=True, slots=True)
class Layout:
    """Where one subtree's znodes and state live."""

    state_path: str
    name: str
    mount: str

    @property
    def base(self) -> str:
        return f"{subtrees_root(self.state_path)}/{self.name}"

    @property
    def meta_root(self) -> str:
        return f"{self.base}/meta"

    @property
    def outbox(self) -> str:
        return f"{self.base}/outbox"

    @property
    def positions(self) -> str:
        return f"{self.base}/positions"

    @property
    def topic_ids(self) -> str:
        """Kafka's id of each region's topic as last read: a re-created topic shows by it."""
        return f"{self.base}/topic_ids"

    @property
    def rereads(self) -> str:
        """Peers' topics read again for paths no longer excluded: up to where only those
        paths' events apply, per peer (``TopicCheck.read_again``)."""
        return f"{self.base}/rereads"

    @property
    def excluded(self) -> str:
        """The exclude list the peers' topics were last read under: paths it had that the
        configuration no longer has are read again (``TopicCheck.read_again``)."""
        return f"{self.base}/excluded"

    @property
    def gc(self) -> str:
        """Tombstone collection's record (the counter floor for recreated paths)."""
        return f"{self.base}/gc"

    @property
    def joining(self) -> str:
        """Present from the subtree's first start in this region until what only this
        region held is published (``bridge.joining``)."""
        return f"{self.base}/joining"

    @property
    def aside(self) -> str:
        """The unrecorded znodes a join set aside, while it runs (``bridge.joinlist``)."""
        return f"{self.base}/aside"

    @property
    def away(self) -> str:
        """Made by a start whose configuration lacks the subtree, replicated here
        before: its next start here joins (``bridge.joining``)."""
        return f"{self.base}/away"

    @property
    def mount_record(self) -> str:
        """The mount the subtree's state describes: where its last start here
        scanned it, past the mass-delete breaker."""
        return f"{self.base}/mount"

    @property
    def conflicts(self) -> str:
        return f"{self.base}/conflicts"

    @property
    def held(self) -> str:
        """Peer events waiting for permission to write their znode, kept across restarts."""
        return f"{self.base}/held"

    @property
    def overflow_marker(self) -> str:
        """Present while the subtree's outbox is overflowed (``bridge.overflow``)."""
        return f"{self.state_path}/overflow/{self.name}"

    def held_node(self, rel: str) -> str:
        return f"{self.held}/{hashlib.sha1(rel.encode()).hexdigest()}"

    def znode(self, rel: str) -> str:
        return self.mount if rel == "/" else self.mount + rel

    def meta(self, rel: str) -> str:
        return self.meta_root if rel == "/" else self.meta_root + rel

    def rel_of(self, path: str) -> str | None:
        if path == self.mount:
            return "/"
        if path.startswith(self.mount + "/"):
            return path[len(self.mount) :]
        return None


class Change(enum.Enum):
    NONE = "none"  # znode and metadata agree
    PUT = "put"
    DELETE = "delete"
    IGNORE = "ignore"  # ephemeral: never replicated
    MAYBE_PLACEHOLDER = "maybe-placeholder"  # empty childless node over a tombstone


def classify(node: Node | None, meta: NodeMeta | None) -> Change:
    """Has the application changed this znode since the bridge last recorded it?"""
    if node is not None and node.stat.ephemeral:
        return Change.IGNORE
    if meta is None:
        return Change.PUT if node is not None else Change.NONE
    if not meta.deleted:
        if node is None:
            return Change.DELETE
        return Change.NONE if content_hash(node.data) == meta.data_hash else Change.PUT
    if node is None:
        return Change.NONE
    if node.data == b"":
        # A deleted node kept only to hold live children is a placeholder; once
        # childless it is either a leftover (children deleted, not yet captured)
        # or a genuine re-creation: the caller must look at the children's metadata.
        return Change.NONE if node.stat.num_children > 0 else Change.MAYBE_PLACEHOLDER
    return Change.PUT
