"""One subtree's replication state in the region's own ensemble.

Holds the layout (metadata mirror, outbox, positions, conflicts under the
state path) and the two writes that matter, each one atomic ``multi`` behind
the epoch check:

* capture: a local change becomes new metadata plus an outbox entry;
* apply: a remote event becomes new znode content plus new metadata.

Callers serialise work per path; the version checks in every multi catch
anything that slips past (an application writing meanwhile), and the caller
retries on ``VersionConflict``.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import structlog

from bridge import codec
from bridge.clock import HybridClock
from bridge.errors import VersionConflict
from bridge.model import Conflict, Event, NodeMeta, Op, VectorClock, content_hash
from bridge.resolve import Action, decide
from bridge.zk import Check, Create, Delete, Node, SetData, ZooKeeper
from bridge.zk import Op as ZkOp

log = structlog.get_logger("bridge.store")

RETRIES = 20


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


@dataclass(frozen=True, slots=True)
class Layout:
    """Where one subtree's znodes and state live."""

    state_path: str
    name: str
    mount: str

    @property
    def base(self) -> str:
        return f"{self.state_path}/subtrees/{self.name}"

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
    def conflicts(self) -> str:
        return f"{self.base}/conflicts"

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


@dataclass(frozen=True, slots=True)
class Local:
    """A consistent-enough read of one path: its znode and its metadata."""

    rel: str
    node: Node | None
    meta: NodeMeta | None
    meta_version: int | None  # None: the metadata znode does not exist yet
    meta_children: int = 0


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


class Outcome(enum.Enum):
    APPLIED = "applied"
    CONFLICT_REMOTE = "conflict_remote_won"
    CONFLICT_LOCAL = "conflict_local_won"
    SKIPPED = "skipped"  # dominated or duplicate
    EPHEMERAL = "ephemeral"
    OVERSIZED = "oversized"
    EXCLUDED = "excluded"


@dataclass(frozen=True, slots=True)
class Captured:
    """A committed local change: the event and the outbox entry holding it."""

    event: Event
    outbox_path: str
    payload: bytes


class SubtreeStore:
    def __init__(
        self,
        zk: ZooKeeper,
        layout: Layout,
        *,
        region: str,
        clock: HybridClock,
        max_data_bytes: int,
        exclude: Sequence[str] = (),
    ) -> None:
        self.zk = zk
        self.layout = layout
        self.region = region
        self.clock = clock
        self.max_data_bytes = max_data_bytes
        self.exclude = tuple(exclude)
        self.oversized: dict[str, int] = {}  # rel → size, for status and metrics
        self._meta_dirs: set[str] = set()

    def excluded(self, rel: str) -> bool:
        return is_excluded(rel, self.exclude)

    async def setup(self) -> None:
        lay = self.layout
        for path in (lay.mount, lay.meta_root, lay.outbox, lay.positions, lay.conflicts):
            await self.zk.ensure_path(path)

    # -- reads ---------------------------------------------------------
    async def read(self, rel: str, *, watch: bool = False) -> Local:
        node, mnode = await asyncio.gather(
            self.zk.get(self.layout.znode(rel), watch=watch),
            self.zk.get(self.layout.meta(rel)),
        )
        if mnode is None:
            return Local(rel, node, None, None)
        return Local(
            rel, node, codec.decode_meta(mnode.data), mnode.stat.version, mnode.stat.num_children
        )

    async def live_meta_children(self, rel: str) -> list[str]:
        names = await self.zk.children(self.layout.meta(rel)) or []
        out = []
        for name in names:
            child = join(rel, name)
            m = await self.zk.get(self.layout.meta(child))
            meta = codec.decode_meta(m.data) if m else None
            if meta is not None and not meta.deleted:
                out.append(child)
        return out

    # -- capture -------------------------------------------------------
    async def capture(self, rel: str, *, watch: bool = True) -> list[Captured]:
        """Announce the local change at ``rel`` if there is one.

        Returns what was committed (possibly several events: a leftover
        placeholder first captures the deletes of its children).
        """
        if self.excluded(rel):
            return []
        for _ in range(RETRIES):
            local = await self.read(rel, watch=watch)
            try:
                return await self._capture(local)
            except VersionConflict:
                self._meta_dirs.clear()
                continue
        raise VersionConflict(f"capture {rel}: kept changing, will retry later")

    async def _capture(self, local: Local) -> list[Captured]:
        change = classify(local.node, local.meta)
        if change is Change.MAYBE_PLACEHOLDER:
            live = await self.live_meta_children(local.rel)
            if live:
                out: list[Captured] = []
                for child in live:
                    out.extend(await self.capture(child, watch=False))
                return out
            change = Change.PUT
        if change in (Change.NONE, Change.IGNORE):
            self.oversized.pop(local.rel, None)
            return []
        if change is Change.PUT:
            assert local.node is not None
            if len(local.node.data) > self.max_data_bytes:
                self._report_oversized(local.rel, len(local.node.data))
                return []
        self.oversized.pop(local.rel, None)
        return [await self._commit_capture(local, change)]

    def _report_oversized(self, rel: str, size: int) -> None:
        if self.oversized.get(rel) != size:
            log.warning(
                "znode_oversized",
                subtree=self.layout.name,
                path=rel,
                size=size,
                limit=self.max_data_bytes,
                hint="not replicated until it shrinks below limits.max_data_bytes",
            )
        self.oversized[rel] = size

    async def _commit_capture(self, local: Local, change: Change) -> Captured:
        prev = local.meta
        vc = (prev.vc if prev else VectorClock()).incremented(self.region)
        ts = self.clock.now(after=prev.ts if prev else 0)
        data = local.node.data if change is Change.PUT and local.node else None
        op = Op.PUT if change is Change.PUT else Op.DELETE
        event = Event(
            origin=self.region,
            subtree=self.layout.name,
            path=local.rel,
            op=op,
            vc=vc,
            ts=ts,
            writer=self.region,
            data=data,
        )
        payload = codec.encode(event)
        meta = NodeMeta(
            vc=vc, data_hash=content_hash(data), deleted=op is Op.DELETE, writer=self.region, ts=ts
        )
        ops: list[ZkOp] = []
        if local.node is not None:
            # The content announced is the content read: a write in between fails the multi.
            ops.append(Check(self.layout.znode(local.rel), local.node.stat.version))
        ops.extend(await self._meta_ops(local, meta))
        if op is Op.DELETE:
            ops.extend(await self._cleanup_ops(local.rel, removing_self=False))
        ops.append(Create(self.layout.outbox + "/e-", payload, sequential=True))
        results = await self.zk.multi(ops)
        return Captured(event, str(results[-1]), payload)

    async def _meta_ops(self, local: Local, meta: NodeMeta) -> list[ZkOp]:
        path = self.layout.meta(local.rel)
        if local.meta_version is None:
            # Metadata nodes are never deleted (tombstones stay), so a parent
            # seen once stays; the cache is dropped whenever a multi fails.
            meta_parent = self.layout.meta(parent(local.rel))
            if meta_parent not in self._meta_dirs:
                await self.zk.ensure_path(meta_parent)
                self._meta_dirs.add(meta_parent)
            return [Create(path, codec.encode_meta(meta))]
        return [SetData(path, codec.encode_meta(meta), local.meta_version)]

    async def _cleanup_ops(self, rel: str, *, removing_self: bool) -> list[ZkOp]:
        """Delete tombstoned placeholder ancestors that the removal of ``rel`` leaves empty.

        The first ancestor kept gets a version check on its metadata: if it
        becomes a tombstone concurrently, this multi fails and the retry sees
        it, so an emptied placeholder is never left behind by a race.
        """
        ops: list[ZkOp] = []
        gone = 1 if removing_self else 0
        for anc in ancestors(rel):
            a = await self.read(anc)
            qualifies = (
                a.node is not None
                and a.meta is not None
                and a.meta.deleted
                and a.node.data == b""
                and a.node.stat.num_children - gone <= 0
            )
            if not qualifies:
                if a.meta_version is not None:
                    ops.append(Check(self.layout.meta(anc), a.meta_version))
                break
            assert a.node is not None
            ops.append(Delete(self.layout.znode(anc), a.node.stat.version))
            gone = 1
        return ops

    async def collapse(self, rel: str) -> None:
        """Remove a tombstoned placeholder that has no children left (after a race)."""
        for _ in range(RETRIES):
            local = await self.read(rel)
            if classify(local.node, local.meta) is not Change.MAYBE_PLACEHOLDER:
                return
            if await self.live_meta_children(rel):
                return  # children deleted locally but not captured yet: capture handles it
            assert local.node is not None
            ops: list[ZkOp] = [Delete(self.layout.znode(rel), local.node.stat.version)]
            ops.extend(await self._cleanup_ops(rel, removing_self=True))
            try:
                await self.zk.multi(ops)
                return
            except VersionConflict:
                continue

    # -- apply ---------------------------------------------------------
    async def apply(self, event: Event) -> tuple[Outcome, list[Captured]]:
        """Apply one remote event; also returns local changes it had to capture first."""
        rel = event.path
        if self.excluded(rel):
            return Outcome.EXCLUDED, []
        if event.data is not None and len(event.data) > self.max_data_bytes:
            self._report_oversized(rel, len(event.data))
            return Outcome.OVERSIZED, []
        captured: list[Captured] = []
        for _ in range(RETRIES):
            # Watch what we are about to write: a local change right after our
            # write must be seen, whatever the parent's child watch reports.
            local = await self.read(rel, watch=True)
            change = classify(local.node, local.meta)
            if change is Change.IGNORE:
                return Outcome.EPHEMERAL, captured
            if change is not Change.NONE:
                # Never apply over a local write nobody has seen: announce it first.
                captured.extend(await self.capture(rel, watch=False))
                if rel in self.oversized:
                    return Outcome.OVERSIZED, captured
                continue
            try:
                return await self._apply(local, event), captured
            except VersionConflict:
                self._meta_dirs.clear()
                continue
        raise VersionConflict(f"apply {rel}: kept changing, will retry")

    async def _apply(self, local: Local, event: Event) -> Outcome:
        remote = event.version()
        decision = decide(local.meta.version() if local.meta else None, remote)
        if decision.action is Action.SKIP:
            return Outcome.SKIPPED
        self.clock.observe(event.ts)
        ops: list[ZkOp] = []
        if decision.action is Action.CONFLICT and not decision.remote_wins:
            assert local.meta is not None
            ops.extend(await self._meta_ops(local, replace(local.meta, vc=decision.merged)))
            outcome = Outcome.CONFLICT_LOCAL
        else:
            meta = NodeMeta(
                vc=decision.merged,
                data_hash=remote.data_hash,
                deleted=remote.deleted,
                writer=event.writer,
                ts=event.ts,
            )
            ops.extend(await self._content_ops(local, event, meta))
            outcome = (
                Outcome.APPLIED if decision.action is Action.APPLY else Outcome.CONFLICT_REMOTE
            )
        if decision.action is Action.CONFLICT:
            assert local.meta is not None
            record = Conflict(
                subtree=self.layout.name,
                path=local.rel,
                local=local.meta.version(),
                remote=remote,
                winner="remote" if decision.remote_wins else "local",
                rule=decision.rule,
                merged=decision.merged,
                at_ms=int(time.time() * 1000),
            )
            conflict_path = self.layout.conflicts + "/c-"
            ops.append(Create(conflict_path, codec.encode_conflict(record), sequential=True))
        await self.zk.multi(ops)
        if event.op is Op.DELETE and local.node is not None and local.node.stat.num_children:
            # Left a placeholder because children existed when read; if they
            # went meanwhile, their cleanup may have missed it.
            await self.collapse(local.rel)
        return outcome

    async def _content_ops(self, local: Local, event: Event, meta: NodeMeta) -> list[ZkOp]:
        rel, node = local.rel, local.node
        znode = self.layout.znode(rel)
        ops: list[ZkOp] = []
        if event.op is Op.PUT:
            data = event.data or b""
            if node is not None:
                ops.append(SetData(znode, data, node.stat.version))
            else:
                ops.extend(await self._parent_ops(rel))
                ops.append(Create(znode, data))
        elif node is not None:
            if node.stat.num_children == 0:
                ops.append(Delete(znode, node.stat.version))
                ops.extend(await self._cleanup_ops(rel, removing_self=True))
            else:
                # ZooKeeper cannot delete a node with children: keep an empty
                # placeholder, removed when its last child goes.
                ops.append(SetData(znode, b"", node.stat.version))
                meta = replace(meta, placeholder=True)
        ops.extend(await self._meta_ops(local, meta))
        return ops

    async def _parent_ops(self, rel: str) -> list[ZkOp]:
        """Create missing ancestors as empty placeholders, outermost first."""
        missing: list[Local] = []
        for anc in ancestors(rel):
            a = await self.read(anc)
            if a.node is not None:
                break
            if a.meta is not None and not a.meta.deleted:
                # The ancestor was deleted here but nobody was told yet.
                await self.capture(anc, watch=False)
                raise VersionConflict(f"ancestor {anc} changed locally")
            missing.append(a)
        ops: list[ZkOp] = []
        for a in reversed(missing):
            ops.append(Create(self.layout.znode(a.rel), b""))
            if a.meta is None:
                ph = NodeMeta(
                    vc=VectorClock(),
                    data_hash=content_hash(b""),
                    deleted=False,
                    writer="",
                    ts=0,
                    placeholder=True,
                )
                ops.extend(await self._meta_ops(a, ph))
        return ops

    # -- outbox, positions, conflicts ------------------------------------
    async def pending_outbox(self) -> list[tuple[str, bytes]]:
        names = sorted(await self.zk.children(self.layout.outbox) or [])
        out = []
        for name in names:
            path = f"{self.layout.outbox}/{name}"
            node = await self.zk.get(path)
            if node is not None:
                out.append((path, node.data))
        return out

    async def outbox_depth(self) -> int:
        return await outbox_depth(self.zk, self.layout)

    async def read_positions(self, peer: str) -> dict[int, int]:
        return await read_positions(self.zk, self.layout, peer)

    async def write_positions(self, peer: str, positions: dict[int, int]) -> None:
        path = f"{self.layout.positions}/{peer}"
        data = codec.encode_positions(positions)
        stat = await self.zk.exists(path)
        op: ZkOp = SetData(path, data, stat.version) if stat else Create(path, data)
        await self.zk.multi([op])

    async def trim_conflicts(self, keep: int) -> None:
        names = sorted(await self.zk.children(self.layout.conflicts) or [])
        for name in names[: max(0, len(names) - keep)]:
            await self.zk.delete(f"{self.layout.conflicts}/{name}")


async def outbox_depth(zk: ZooKeeper, layout: Layout) -> int:
    """Local changes recorded but not yet acknowledged by Kafka."""
    stat = await zk.exists(layout.outbox)
    return stat.num_children if stat else 0


async def read_positions(zk: ZooKeeper, layout: Layout, peer: str) -> dict[int, int]:
    """Next offset to apply per partition of ``peer``'s topic (empty: from the start)."""
    node = await zk.get(f"{layout.positions}/{peer}")
    return codec.decode_positions(node.data) if node and node.data else {}
