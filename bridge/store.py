"""One subtree's replication state in the region's own ensemble, and its two atomic writes.

Holds the layout (metadata mirror, outbox, positions, conflicts under the
state path), an in-memory copy of the metadata for the leadership term (the
leader is its only writer, so it is read once, by the start-up scan), and the
two writes that matter, each one ``multi`` behind the epoch check:

* capture: a closed batch of local changes becomes new metadata for every path
  in it plus one outbox entry holding the whole batch;
* apply: a complete batch of a peer's events becomes new znode content, new
  metadata and the peer's new position, together.

Callers never run a capture and an apply of one subtree at the same time
(the pipelines share one lock per subtree). Version checks in every multi
catch what slips past (an application writing meanwhile): the metadata read
again, the batch is planned afresh, never reordered.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import structlog

from bridge import batching, codec
from bridge.clock import HybridClock
from bridge.errors import NoPermission, VersionConflict
from bridge.model import Conflict, Event, NodeMeta, Op, VectorClock, content_hash
from bridge.resolve import Action, decide
from bridge.zk import Create, Delete, Node, SetData, ZooKeeper
from bridge.zk import Op as ZkOp

log = structlog.get_logger("bridge.store")

RETRIES = 20
CLOSURE_ROUNDS = 50


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
    HELD_BACK = "held_back"  # the bridge may not write the znode (ACL)
    COLLISION = "clock_collision"  # equal clocks, different content: refused


@dataclass(frozen=True, slots=True)
class CapturedBatch:
    """A committed closed batch of local changes: its events and the outbox entry holding them."""

    events: tuple[Event, ...]
    payloads: tuple[bytes, ...]
    outbox_path: str


@dataclass(frozen=True, slots=True)
class Applied:
    """What applying one batch did, event by event (conflicts as records)."""

    outcomes: tuple[tuple[Event, Outcome], ...]
    conflicts: tuple[Conflict, ...] = ()


@dataclass(slots=True)
class MetaEntry:
    """A metadata znode as last written or read: ``meta`` None for a bare directory."""

    meta: NodeMeta | None
    version: int


class LocalChanges(Exception):
    """Apply found local changes nobody announced yet: capture them first."""

    def __init__(self, rels: Iterable[str]) -> None:
        self.rels = sorted(set(rels))
        super().__init__(f"{len(self.rels)} local changes to capture first")


class _NeedRead(Exception):
    def __init__(self, rels: Iterable[str]) -> None:
        self.rels = set(rels)
        super().__init__("more znodes to read")


@dataclass(slots=True)
class _View:
    """A znode as the plan of one multi sees it (after the ops planned so far)."""

    version: int
    children: int
    empty: bool
    ephemeral: bool = False


@dataclass(slots=True)
class _Plan:
    ops: list[ZkOp] = field(default_factory=list)
    metas: dict[str, MetaEntry] = field(default_factory=dict)  # overlay on the cache


def _view(node: Node | None) -> _View | None:
    if node is None:
        return None
    return _View(node.stat.version, node.stat.num_children, node.data == b"",
                 node.stat.ephemeral)


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
        # rel → "read" or "write": znodes the bridge's identity may not touch.
        self.held_back: dict[str, str] = {}
        self.held_events: dict[str, Event] = {}  # remote events waiting for permission
        self.metas: dict[str, MetaEntry] = {}
        # Where paths go back when a batch had to be cut before closing.
        self.requeue: Callable[[set[str]], None] = lambda rels: None
        self._position_versions: dict[str, int] = {}

    def excluded(self, rel: str) -> bool:
        return is_excluded(rel, self.exclude)

    def _replicable(self, rel: str) -> bool:
        return rel != "/" and not self.excluded(rel)

    async def setup(self) -> None:
        lay = self.layout
        for path in (lay.mount, lay.meta_root, lay.outbox, lay.positions, lay.conflicts):
            await self.zk.ensure_path(path)
        self.metas = {"/": MetaEntry(None, 0)}
        self._position_versions.clear()

    # -- the metadata cache --------------------------------------------------
    def meta(self, rel: str) -> NodeMeta | None:
        entry = self.metas.get(rel)
        return entry.meta if entry else None

    def load_meta(self, rel: str, node: Node | None) -> None:
        """Record a metadata znode read by a scan (``None``: it does not exist)."""
        if node is None:
            self.metas.pop(rel, None)
        else:
            self.metas[rel] = MetaEntry(codec.decode_meta(node.data), node.stat.version)

    def live_children(self, rel: str) -> list[str]:
        prefix = "/" if rel == "/" else rel + "/"
        return [r for r, e in self.metas.items()
                if r.startswith(prefix) and "/" not in r[len(prefix):]
                and e.meta is not None and not e.meta.deleted]

    async def refresh_meta(self, rels: Iterable[str]) -> None:
        """Read metadata again after a failed multi (the cache may be behind)."""
        todo = sorted(set(rels))
        nodes = await self.zk.read_many([("data", self.layout.meta(r)) for r in todo])
        for rel, node in zip(todo, nodes, strict=True):
            self.load_meta(rel, node if isinstance(node, Node) else None)

    async def _read(self, rels: Iterable[str]) -> dict[str, Node | NoPermission | None]:
        todo = sorted(set(rels))
        out: dict[str, Node | NoPermission | None] = {}
        for chunk in range(0, len(todo), 500):
            part = todo[chunk : chunk + 500]
            nodes = await self.zk.read_many([("data", self.layout.znode(r)) for r in part])
            out.update(zip(part, nodes, strict=True))
        return out

    def _hold(self, rel: str, what: str) -> None:
        if self.held_back.get(rel) != what:
            log.warning("znode_held_back", subtree=self.layout.name, path=rel, operation=what,
                        hint="the bridge's ZooKeeper identity lacks permission; it is retried "
                             "at the next scan and on SIGHUP")
        self.held_back[rel] = what

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

    def _meta_op(self, plan: _Plan, rel: str, meta: NodeMeta) -> None:
        """Write ``rel``'s metadata, creating missing metadata directories first."""
        entry = plan.metas.get(rel) or self.metas.get(rel)
        data = codec.encode_meta(meta)
        path = self.layout.meta(rel)
        if entry is not None:
            plan.ops.append(SetData(path, data, entry.version))
            plan.metas[rel] = MetaEntry(meta, entry.version + 1)
            return
        for anc in reversed(ancestors(rel)):
            if anc not in plan.metas and anc not in self.metas:
                plan.ops.append(Create(self.layout.meta(anc), b""))
                plan.metas[anc] = MetaEntry(None, 0)
        plan.ops.append(Create(path, data))
        plan.metas[rel] = MetaEntry(meta, 0)

    def _commit(self, plan: _Plan) -> None:
        self.metas.update(plan.metas)

    # -- capture ---------------------------------------------------------------
    async def capture(self, rels: Iterable[str],
                      notified: Callable[[], set[str]] = set) -> list[CapturedBatch]:
        """Announce the local changes among ``rels``: a closed batch (or several, if large).

        Closure: the znodes are read in one ``multiRead``, a snapshot at one
        zxid Z. A change is notified before the reply to a later read on the
        same session exactly when its zxid is at most Z, so the paths
        ``notified()`` reports once the reply is in are the ones that changed
        up to Z without being read: read everything again with them, until a
        read brings no new path (a bounded fixpoint; a path already read is
        covered, whatever its notification says). Paths left over when the
        bound is hit are returned to ``notified``'s owner via ``requeue``.
        """
        todo = {r for r in rels if self._replicable(r)}
        rounds = 0
        for _ in range(RETRIES + CLOSURE_ROUNDS):
            reads = await self._read(todo)
            new = {r for r in notified() if self._replicable(r)} - set(reads)
            if new and rounds < CLOSURE_ROUNDS:
                rounds += 1
                todo |= new
                continue
            if new:
                log.warning("batch_not_closed", subtree=self.layout.name, rounds=rounds,
                            hint="the application writes new paths faster than one read")
                self.requeue(new)
            try:
                return await self._capture(reads)
            except _NeedRead as more:
                todo |= more.rels
            except VersionConflict:
                await self.refresh_meta(set(reads) | {a for r in reads for a in ancestors(r)})
        raise VersionConflict(f"capture in {self.layout.name}: kept changing, will retry")

    async def _capture(self, reads: dict[str, Node | NoPermission | None]) -> list[CapturedBatch]:
        changes: list[tuple[tuple[int, int, int, str], Op, str, Node | None]] = []
        cleanup: list[str] = []  # tombstoned placeholders left empty by local deletes
        for rel, node in reads.items():
            if isinstance(node, NoPermission):
                self._hold(rel, "read")
                continue
            if self.held_back.pop(rel, None) == "read":
                log.info("znode_released", subtree=self.layout.name, path=rel)
            meta = self.meta(rel)
            change = classify(node, meta)
            if change is Change.MAYBE_PLACEHOLDER:
                live = self.live_children(rel)
                missing = [c for c in live if c not in reads]
                if missing:
                    raise _NeedRead(missing)
                change = Change.NONE if live else Change.PUT
                if live:
                    cleanup.append(rel)
            if change is Change.PUT:
                assert node is not None
                if len(node.data) > self.max_data_bytes:
                    self._report_oversized(rel, len(node.data))
                    continue
                changes.append((batching.order_key(Op.PUT, rel, node.stat.mzxid), Op.PUT, rel,
                                node))
            elif change is Change.DELETE:
                changes.append((batching.order_key(Op.DELETE, rel, 0), Op.DELETE, rel, None))
            if change is not Change.PUT:
                self.oversized.pop(rel, None)
        if not changes and not cleanup:
            return []
        changes.sort(key=lambda c: c[0])
        deleted = {rel for _, op, rel, _ in changes if op is Op.DELETE}
        parents = {parent(r) for r in deleted | set(cleanup)} - {"/"}
        need = [p for p in parents if p not in reads and (m := self.meta(p)) is not None
                and m.deleted]
        if need:
            raise _NeedRead(need)
        views = {r: _view(n) for r, n in reads.items() if not isinstance(n, NoPermission)}
        events: list[Event] = []
        for _, op, rel, node in changes:
            prev = self.meta(rel)
            vc = (prev.vc if prev else VectorClock()).incremented(self.region)
            ts = self.clock.now(after=prev.ts if prev else 0)
            data = node.data if node is not None else None
            events.append(Event(origin=self.region, subtree=self.layout.name, path=rel, op=op,
                                vc=vc, ts=ts, writer=self.region, data=data))
        batch_id = self.clock.now()
        stamped = batching.stamp(events, batch_id)
        payloads = [codec.encode(e) for e in stamped]
        out: list[CapturedBatch] = []
        chunks = batching.split([len(p) for p in payloads])
        if len(chunks) > 1:
            log.info("batch_split", subtree=self.layout.name, events=len(events),
                     pieces=len(chunks), bytes=sum(len(p) for p in payloads))
        for n, chunk in enumerate(chunks):
            plan = _Plan()
            for i in chunk:
                e = events[i]
                self._meta_op(plan, e.path, NodeMeta(
                    vc=e.vc, data_hash=content_hash(e.data), deleted=e.op is Op.DELETE,
                    writer=self.region, ts=e.ts))
            if n == len(chunks) - 1:
                self._cleanup_ops(plan, views, [*deleted, *cleanup], cleanup)
            part = [stamped[i] for i in chunk]
            if len(chunks) > 1:  # each piece travels as a batch of its own, in order
                part = batching.stamp(part, self.clock.now())
            enc = [codec.encode(e) for e in part]
            plan.ops.append(Create(self.layout.outbox + "/b-", codec.encode_outbox(enc),
                                   sequential=True))
            results = await self.zk.multi(plan.ops)
            self._commit(plan)
            out.append(CapturedBatch(tuple(part), tuple(enc), str(results[-1])))
        for e in events:
            self.oversized.pop(e.path, None)
        return out

    def _cleanup_ops(self, plan: _Plan, views: dict[str, _View | None], gone: Iterable[str],
                     placeholders: Iterable[str]) -> None:
        """Delete tombstoned placeholders (and such ancestors) that local deletes leave empty."""
        for rel in sorted(set(gone), key=batching.depth, reverse=True):
            if rel in placeholders:
                view = views.get(rel)
                if view is None:
                    continue
                view.children = 0
                self._drop_placeholder(plan, views, rel)
            else:
                # The read already counts the application's delete among the
                # parent's children: nothing to subtract.
                self._drop_placeholder(plan, views, parent(rel))

    def _drop_placeholder(self, plan: _Plan, views: dict[str, _View | None], rel: str) -> None:
        while rel != "/":
            view = views.get(rel)
            meta = (plan.metas.get(rel) or self.metas.get(rel) or MetaEntry(None, 0)).meta
            if (view is None or view.children > 0 or not view.empty or meta is None
                    or not meta.deleted):
                return
            plan.ops.append(Delete(self.layout.znode(rel), view.version))
            views[rel] = None
            rel = parent(rel)
            pv = views.get(rel)
            if pv is None:
                return
            pv.children -= 1

    # -- apply -------------------------------------------------------------------
    async def apply(self, events: Sequence[Event], extra: Sequence[ZkOp] = ()) -> Applied:
        """Apply a peer's complete batch (or consecutive batches) as one ``multi``.

        ``extra`` (the peer's new position) commits in the same ``multi``, so a
        restart never applies a batch twice or half. Raises ``LocalChanges``
        when a path it touches changed locally unannounced: the caller
        captures those first and calls again.
        """
        wanted = {e.path for e in events} | {parent(e.path) for e in events}
        wanted.discard("/")
        for _ in range(RETRIES):
            reads = await self._read(wanted)
            while True:
                local = [r for r, n in reads.items() if not isinstance(n, NoPermission)
                         and not self.excluded(r) and r not in self.oversized
                         and r not in self.held_back
                         and classify(n, self.meta(r)) in (Change.PUT, Change.DELETE,
                                                            Change.MAYBE_PLACEHOLDER)]
                if local:
                    raise LocalChanges(local)
                try:
                    plan, result = self._plan_apply(events, reads)
                    break
                except _NeedRead as more:
                    wanted |= more.rels
                    reads.update(await self._read(more.rels - set(reads)))
            plan.ops.extend(extra)
            if not plan.ops:
                return result
            try:
                await self.zk.multi(plan.ops)
            except NoPermission as exc:
                rel = self.layout.rel_of(exc.path or "")
                if rel is None:
                    raise
                self._hold(rel, "write")
                continue
            except VersionConflict:
                await self.refresh_meta(set(plan.metas) | wanted)
                continue
            self._commit(plan)
            for e, outcome in result.outcomes:
                if (outcome is not Outcome.HELD_BACK
                        and self.held_events.pop(e.path, None) is not None):
                    self.held_back.pop(e.path, None)
                    log.info("znode_released", subtree=self.layout.name, path=e.path)
            return result
        raise VersionConflict(f"apply in {self.layout.name}: kept changing, will retry")

    def _plan_apply(self, events: Sequence[Event],
                    reads: dict[str, Node | NoPermission | None]) -> tuple[_Plan, Applied]:
        plan = _Plan()
        views: dict[str, _View | None] = {
            r: _view(n) for r, n in reads.items() if not isinstance(n, NoPermission)}
        outcomes: list[tuple[Event, Outcome]] = []
        conflicts: list[Conflict] = []
        for event in events:
            outcome, conflict = self._plan_one(plan, views, reads, event)
            outcomes.append((event, outcome))
            if conflict is not None:
                conflicts.append(conflict)
                plan.ops.append(Create(self.layout.conflicts + "/c-",
                                       codec.encode_conflict(conflict), sequential=True))
        return plan, Applied(tuple(outcomes), tuple(conflicts))

    def _plan_one(self, plan: _Plan, views: dict[str, _View | None],
                  reads: dict[str, Node | NoPermission | None],
                  event: Event) -> tuple[Outcome, Conflict | None]:
        rel = event.path
        if self.excluded(rel):
            return Outcome.EXCLUDED, None
        if event.data is not None and len(event.data) > self.max_data_bytes:
            self._report_oversized(rel, len(event.data))
            return Outcome.OVERSIZED, None
        if rel in self.oversized:  # a local version too large to announce stays put
            return Outcome.OVERSIZED, None
        if isinstance(reads.get(rel), NoPermission) or self.held_back.get(rel) == "write":
            self._hold(rel, self.held_back.get(rel, "read"))
            self.held_events[rel] = event
            return Outcome.HELD_BACK, None
        if rel not in views:
            raise _NeedRead([rel])
        view = views[rel]
        if view is not None and view.ephemeral:
            return Outcome.EPHEMERAL, None
        entry = plan.metas.get(rel) or self.metas.get(rel)
        local = entry.meta if entry else None
        remote = event.version()
        decision = decide(local.version() if local else None, remote)
        if decision.action is Action.SKIP:
            return Outcome.SKIPPED, None
        if decision.action is Action.COLLISION:
            return Outcome.COLLISION, None
        self.clock.observe(event.ts)
        conflict = None
        if decision.action is Action.CONFLICT:
            assert local is not None
            conflict = Conflict(
                subtree=self.layout.name, path=rel, local=local.version(), remote=remote,
                winner="remote" if decision.remote_wins else "local", rule=decision.rule,
                merged=decision.merged, at_ms=int(time.time() * 1000))
            if not decision.remote_wins:
                self._meta_op(plan, rel, replace(local, vc=decision.merged))
                return Outcome.CONFLICT_LOCAL, conflict
        meta = NodeMeta(vc=decision.merged, data_hash=remote.data_hash, deleted=remote.deleted,
                        writer=event.writer, ts=event.ts)
        znode = self.layout.znode(rel)
        if event.op is Op.PUT:
            data = event.data or b""
            if view is not None:
                plan.ops.append(SetData(znode, data, view.version))
                view.version += 1
                view.empty = data == b""
            else:
                self._parents(plan, views, rel)
                plan.ops.append(Create(znode, data))
                views[rel] = _View(0, 0, data == b"")
                self._child_count(views, rel, +1)
        elif view is not None:
            if view.children == 0:
                plan.ops.append(Delete(znode, view.version))
                views[rel] = None
                self._child_count(views, rel, -1)
                self._meta_op(plan, rel, meta)
                self._drop_placeholder(plan, views, parent(rel))
                return self._applied(decision.action), conflict
            # ZooKeeper cannot delete a node with children: keep an empty
            # placeholder, removed when its last child goes.
            plan.ops.append(SetData(znode, b"", view.version))
            view.version += 1
            view.empty = True
            meta = replace(meta, placeholder=True)
        self._meta_op(plan, rel, meta)
        return self._applied(decision.action), conflict

    @staticmethod
    def _applied(action: Action) -> Outcome:
        return Outcome.APPLIED if action is Action.APPLY else Outcome.CONFLICT_REMOTE

    @staticmethod
    def _child_count(views: dict[str, _View | None], rel: str, delta: int) -> None:
        p = parent(rel)
        if p == "/":
            return
        if p not in views:
            raise _NeedRead([p])
        pv = views[p]
        if pv is not None:
            pv.children += delta

    def _parents(self, plan: _Plan, views: dict[str, _View | None], rel: str) -> None:
        """Plan creation of missing ancestors as empty placeholders, outermost first."""
        missing: list[str] = []
        for anc in ancestors(rel):
            if anc not in views:
                raise _NeedRead([anc])
            if views[anc] is not None:
                break
            missing.append(anc)
        for anc in reversed(missing):
            plan.ops.append(Create(self.layout.znode(anc), b""))
            self._child_count(views, anc, +1)
            views[anc] = _View(0, 0, True)
            if (plan.metas.get(anc) or self.metas.get(anc) or MetaEntry(None, 0)).meta is None:
                self._meta_op(plan, anc, NodeMeta(vc=VectorClock(), data_hash=content_hash(b""),
                                                  deleted=False, writer="", ts=0,
                                                  placeholder=True))

    # -- outbox, positions, conflicts ------------------------------------
    async def pending_outbox(self) -> list[tuple[str, list[bytes]]]:
        """Outbox entries left by an earlier term, in capture order, with their payloads."""
        names = sorted(await self.zk.children(self.layout.outbox) or [])
        out = []
        for name in names:
            path = f"{self.layout.outbox}/{name}"
            node = await self.zk.get(path)
            if node is not None:
                out.append((path, codec.decode_outbox(node.data)))
        return out

    async def outbox_depth(self) -> int:
        return await outbox_depth(self.zk, self.layout)

    async def read_positions(self, peer: str) -> dict[int, int]:
        node = await self.zk.get(f"{self.layout.positions}/{peer}")
        if node is None:
            self._position_versions.pop(peer, None)
            return {}
        self._position_versions[peer] = node.stat.version
        return codec.decode_positions(node.data) if node.data else {}

    def position_op(self, peer: str, positions: dict[int, int]) -> ZkOp:
        """The write of ``peer``'s position, to commit with the batch it describes."""
        path = f"{self.layout.positions}/{peer}"
        data = codec.encode_positions(positions)
        version = self._position_versions.get(peer)
        return Create(path, data) if version is None else SetData(path, data, version)

    def position_written(self, peer: str) -> None:
        self._position_versions[peer] = self._position_versions.get(peer, -1) + 1

    async def write_positions(self, peer: str, positions: dict[int, int]) -> None:
        try:
            await self.zk.multi([self.position_op(peer, positions)])
        except VersionConflict:
            await self.read_positions(peer)
            raise
        self.position_written(peer)

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
