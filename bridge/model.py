"""Value types shared by every layer: events, per-znode metadata, vector clocks.

All are frozen so that a value read from ZooKeeper or Kafka can be passed
between tasks and threads without anyone changing it underneath.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

SCHEMA_VERSION = 1


class Op(enum.StrEnum):
    PUT = "put"
    DELETE = "delete"
    HEARTBEAT = "heartbeat"


def content_hash(data: bytes | None) -> bytes:
    """Digest of a znode's bytes; ``None`` (deleted) has the empty digest.

    16 bytes of BLAKE2b: collisions are irrelevant at metadata scale and the
    digest is part of every metadata record and conflict tie-break.
    """
    if data is None:
        return b""
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class VectorClock:
    """Region → counter; absent regions count as zero. Entries kept sorted."""

    entries: tuple[tuple[str, int], ...] = ()

    @staticmethod
    def of(mapping: Mapping[str, int]) -> VectorClock:
        return VectorClock(tuple(sorted((r, c) for r, c in mapping.items() if c > 0)))

    def as_dict(self) -> dict[str, int]:
        return dict(self.entries)

    def get(self, region: str) -> int:
        for r, c in self.entries:
            if r == region:
                return c
        return 0

    def incremented(self, region: str) -> VectorClock:
        d = self.as_dict()
        d[region] = d.get(region, 0) + 1
        return VectorClock.of(d)

    def __str__(self) -> str:
        return "{" + ",".join(f"{r}:{c}" for r, c in self.entries) + "}"


@dataclass(frozen=True, slots=True)
class Version:
    """What conflict rules compare: one version of one znode's content.

    ``data_hash`` is ``content_hash`` of the content (empty for a delete).
    """

    vc: VectorClock
    ts: int
    writer: str
    data_hash: bytes
    deleted: bool


@dataclass(frozen=True, slots=True)
class Event:
    """One replicated change (or heartbeat) as it travels on a topic."""

    origin: str
    subtree: str
    path: str
    op: Op
    vc: VectorClock
    ts: int
    writer: str
    data: bytes | None = None
    v: int = SCHEMA_VERSION
    # Schema 1.1: the origin's batch this event belongs to (None: a batch of
    # its own, as senders before 1.1 and `zkbridge resync` publish), its
    # place in it and the batch's length. A receiver applies a batch only
    # once it holds all of it.
    batch: int | None = None
    batch_index: int = 0
    batch_size: int = 1
    # Schema 1.1, puts under `acl: copy`: the znode's ACL at the origin, one
    # "perms:scheme:id" string per entry (flat, so 1.0 receivers ignore it).
    acl: tuple[str, ...] | None = None
    # Schema 1.2: the publishing ensemble's incarnation (the marker under its
    # state path). Two ensembles publishing as one region show two values on
    # one topic; None from senders before 1.2.
    inc: str | None = None
    # Schema 1.3, heartbeats only: per origin region, the hybrid-clock stamp of
    # the newest heartbeat of that origin's stream this region has applied past
    # (so everything the origin published before it is applied here). Sorted
    # (region, ts) pairs; None from senders before 1.3.
    applied: tuple[tuple[str, int], ...] | None = None

    def in_batch(self, batch: int, index: int, size: int) -> Event:
        """This event as member ``index`` of the ``size`` events of ``batch``.

        ``dataclasses.replace`` took 7 µs an event here, 2 µs this way, and a
        start-up capture stamps every znode of the subtree.
        """
        return Event(self.origin, self.subtree, self.path, self.op, self.vc, self.ts,
                     self.writer, self.data, self.v, batch, index, size, self.acl, self.inc,
                     self.applied)

    @property
    def key(self) -> bytes:
        """Kafka record key: the relative path, so compaction keeps the latest."""
        return self.path.encode()

    def version(self) -> Version:
        return Version(
            vc=self.vc,
            ts=self.ts,
            writer=self.writer,
            data_hash=content_hash(self.data if self.op is Op.PUT else None),
            deleted=self.op is Op.DELETE,
        )


@dataclass(frozen=True, slots=True)
class NodeMeta:
    """The bridge's record of the last replicated state of one znode.

    ``deleted`` marks a tombstone (kept so a stale put cannot resurrect the
    node). ``placeholder`` marks a znode the bridge created only to hold
    children: an absent parent, or a deleted node that still had live children.
    ``placeholder_czxid`` is the latter's creation zxid in this region (0: not
    known): the same znode found childless later is that placeholder left
    over, one created anew is an application's.
    """

    vc: VectorClock
    data_hash: bytes
    deleted: bool
    writer: str
    ts: int
    placeholder: bool = False
    placeholder_czxid: int = 0

    def version(self) -> Version:
        return Version(
            vc=self.vc, ts=self.ts, writer=self.writer, data_hash=self.data_hash,
            deleted=self.deleted,
        )


@dataclass(frozen=True, slots=True)
class Conflict:
    """A record of one resolved conflict, for ``zkbridge conflicts``."""

    subtree: str
    path: str
    local: Version
    remote: Version
    winner: str  # "local" or "remote"
    rule: str
    merged: VectorClock
    at_ms: int = 0
    extra: Mapping[str, str] = field(default_factory=dict)
