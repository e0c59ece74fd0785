"""Planning one apply ``multi``: per path, what a peer's events do to the znodes and metadata.

A pure-ish view of the tree as the ops planned so far leave it (versions,
child counts), so a batch that creates parents, deletes children and their
placeholder parent, or touches a path twice still becomes one valid
``multi``. Trees: missing parents become empty placeholders; a delete that
wins over a znode with children leaves an empty tombstoned placeholder,
removed in the same ``multi`` as its last child, whatever the order.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import structlog

from bridge import batching, codec, statecodec
from bridge.acl import AclPolicy
from bridge.clock import HybridClock
from bridge.errors import NoPermission
from bridge.layout import Layout, ancestors, is_excluded, parent
from bridge.model import Conflict, Event, NodeMeta, Op, VectorClock, content_hash
from bridge.resolve import Action, decide
from bridge.zk import Create, Delete, Node, SetData
from bridge.zk import Op as ZkOp

log = structlog.get_logger("bridge.store")

_RETRIED = ("it is tried again by itself (after 5 s, backing off to once a minute), at every "
            "audit or scan and on SIGHUP")
_GONE = ("it is applied once that ephemeral znode is gone (tried again by itself, backing off "
         "to once a minute, and on SIGHUP)")
# Why a peer's event waits (``held_back``), and what ``znode_held_back`` tells the
# operator: the bridge may not write the znode, a hard quota of this region refuses
# it, this region's server refuses its ACL, or it or its parent is ephemeral here.
# Each is retried, never skipped. (A capture's holds, "read" and "acl", are told
# as a missing permission too.)
HINTS = {
    "write": f"the bridge's ZooKeeper identity lacks permission; {_RETRIED}",
    "quota": "a hard quota of this region (setquota -N/-B) refuses it: raise the quota or free "
             f"room; {_RETRIED}",
    "acl-refused": "this region's ZooKeeper refuses the origin's ACL (an authentication scheme "
                   "it has no provider for, such as sasl or x509): configure the same "
                   f"authProvider in every region, or use acl: open for this subtree; {_RETRIED}",
    "ephemeral": "an ephemeral znode of this region stands where the origin has a persistent "
                 f"one: {_GONE}",
    "ephemeral-parent": "its parent is an ephemeral znode in this region, persistent at the "
                        f"origin: {_GONE}",
}
WRITE_HOLDS = tuple(HINTS)


class Outcome(enum.Enum):
    APPLIED = "applied"
    CONFLICT_REMOTE = "conflict_remote_won"
    CONFLICT_LOCAL = "conflict_local_won"
    SKIPPED = "skipped"  # dominated or duplicate
    OVERSIZED = "oversized"
    EXCLUDED = "excluded"
    HELD_BACK = "held_back"  # the bridge may not write the znode (ACL)
    COLLISION = "clock_collision"  # equal clocks, different content: refused


@dataclass(frozen=True, slots=True)
class CapturedBatch:
    """A committed closed batch of local changes: its events and the outbox entry holding them
    (None: written while the outbox was full, ``bridge.overflow``)."""

    events: tuple[Event, ...]
    payloads: tuple[bytes, ...]
    outbox_path: str | None


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


class NeedRead(Exception):
    def __init__(self, rels: Iterable[str]) -> None:
        self.rels = set(rels)
        super().__init__("more znodes to read")


@dataclass(slots=True)
class View:
    """A znode as the plan of one multi sees it (after the ops planned so far)."""

    version: int
    children: int
    empty: bool
    ephemeral: bool = False
    czxid: int = 0  # 0: created by this plan, not known yet


@dataclass(slots=True)
class Plan:
    ops: list[ZkOp] = field(default_factory=list)
    metas: dict[str, MetaEntry] = field(default_factory=dict)  # overlay on the cache
    acls: list[tuple[str, tuple[str, ...] | None]] = field(default_factory=list)  # set after
    held: dict[str, Event] = field(default_factory=dict)  # peer events now held for permission


def view_of(node: Node | None) -> View | None:
    if node is None:
        return None
    return View(node.stat.version, node.stat.num_children, node.data == b"",
                 node.stat.ephemeral, node.stat.czxid)


class Planner:
    """The planning half of a subtree's store (``SubtreeStore`` adds the I/O)."""

    layout: Layout
    clock: HybridClock
    max_data_bytes: int
    exclude: tuple[str, ...]
    acl: AclPolicy
    metas: dict[str, MetaEntry]
    oversized: dict[str, int]
    held_back: dict[str, str]
    held_events: dict[str, Event]
    retried: dict[str, str]  # held events being tried again: why each waited

    def excluded(self, rel: str) -> bool:
        return is_excluded(rel, self.exclude)

    def meta(self, rel: str) -> NodeMeta | None:
        entry = self.metas.get(rel)
        return entry.meta if entry else None

    def hold(self, rel: str, what: str) -> None:
        if self.held_back.get(rel) != what and self.retried.get(rel) != what:
            log.warning("znode_held_back", subtree=self.layout.name, path=rel, operation=what,
                        hint=HINTS.get(what, HINTS["write"]))
        self.held_back[rel] = what
        self.retried.pop(rel, None)  # tried and refused: planned as held from now on

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

    def _keep_held(self, plan: Plan, event: Event) -> None:
        """Keep a peer event the bridge may not write yet, in the same ``multi`` as the
        position that passes it: a restart must not lose it.

        One per path: a second one is resolved against the first by the
        conflict rule, as it would be against the znode, and the winner is
        kept with the merged clock.
        """
        rel = event.path
        before = plan.held.get(rel) or self.held_events.get(rel)
        keep = event
        if before is not None:
            d = decide(before.version(), event.version())
            newer = d.action is Action.APPLY or (d.action is Action.CONFLICT and d.remote_wins)
            winner = event if newer else before
            keep = replace(winner, vc=d.merged) if d.action is Action.CONFLICT else winner
            if keep == before:
                return
        data = codec.encode(keep)
        path = self.layout.held_node(rel)
        existed = rel in self.held_events or rel in plan.held
        plan.ops.append(SetData(path, data, -1) if existed else Create(path, data))
        plan.held[rel] = keep

    def null_wins(self, plan: Plan, event: Event) -> bool:
        """Whether a null record's collected delete applies here (``bridge.tombstones``).

        Only over a live version it dominates or beats. Where the path is
        absent or deleted it would bring back a tombstone collected already
        (collected again, another null: a ping-pong between regions); where
        the live version wins, the usual conflict bookkeeping (a merged clock)
        would leave this region's clock different from every region that
        collected the delete, so the null leaves everything as it is.
        """
        entry = plan.metas.get(event.path) or self.metas.get(event.path)
        local = entry.meta if entry is not None else None
        if local is None or local.deleted:
            return False
        d = decide(local.version(), event.version())
        return d.action is Action.APPLY or (d.action is Action.CONFLICT and d.remote_wins)

    def _meta_op(self, plan: Plan, rel: str, meta: NodeMeta,
                 before: Mapping[str, MetaEntry] | None = None) -> None:
        """Write ``rel``'s metadata, creating missing metadata directories first.

        ``before``: the metadata a plan sent ahead of this one writes (not yet
        committed; this plan is sent only once it has).
        """
        before = before or {}
        entry = plan.metas.get(rel) or before.get(rel) or self.metas.get(rel)
        data = statecodec.encode_meta(meta)
        path = self.layout.meta(rel)
        if entry is not None:
            plan.ops.append(SetData(path, data, entry.version))
            plan.metas[rel] = MetaEntry(meta, entry.version + 1)
            return
        for anc in reversed(ancestors(rel)):
            if anc not in plan.metas and anc not in before and anc not in self.metas:
                plan.ops.append(Create(self.layout.meta(anc), b""))
                plan.metas[anc] = MetaEntry(None, 0)
        plan.ops.append(Create(path, data))
        plan.metas[rel] = MetaEntry(meta, 0)


    def _cleanup_ops(self, plan: Plan, views: dict[str, View | None], gone: Iterable[str],
                     placeholders: Iterable[str]) -> None:
        """Delete tombstoned placeholders (and such ancestors) that local deletes leave empty."""
        for rel in sorted(set(gone), key=batching.depth, reverse=True):
            if rel in placeholders:
                view = views.get(rel)
                if view is None:
                    # The application deleted the placeholder itself.
                    self._unmark_placeholder(plan, rel)
                    self._drop_placeholder(plan, views, parent(rel))
                    continue
                view.children = 0
                self._drop_placeholder(plan, views, rel)
            else:
                # The read already counts the application's delete among the
                # parent's children: nothing to subtract.
                self._drop_placeholder(plan, views, parent(rel))


    def _drop_placeholder(self, plan: Plan, views: dict[str, View | None], rel: str) -> None:
        while rel != "/":
            view = views.get(rel)
            if view is None:
                if rel in views:  # gone already
                    self._unmark_placeholder(plan, rel)
                return
            meta = self._current_meta(plan, rel)
            if view.children > 0 or not view.empty or meta is None or not meta.deleted:
                return
            plan.ops.append(Delete(self.layout.znode(rel), view.version))
            views[rel] = None
            self._unmark_placeholder(plan, rel)
            rel = parent(rel)
            pv = views.get(rel)
            if pv is None:
                return
            pv.children -= 1


    def _current_meta(self, plan: Plan, rel: str) -> NodeMeta | None:
        """``rel``'s metadata as the plan so far leaves it."""
        return (plan.metas.get(rel) or self.metas.get(rel) or MetaEntry(None, 0)).meta


    def _unmark_placeholder(self, plan: Plan, rel: str) -> None:
        """Its znode gone, a tombstone is no longer a placeholder.

        Whether a delete left one depends on whether this region held children
        then, so a flag left set here would keep the tombstones of regions
        that agree on everything else different (seen in a fault campaign).
        """
        meta = self._current_meta(plan, rel)
        if meta is not None and meta.deleted and meta.placeholder:
            self._meta_op(plan, rel, replace(meta, placeholder=False, placeholder_czxid=0))


    def _plan_apply(self, events: Sequence[Event],
                    reads: dict[str, Node | NoPermission | None],
                    if_live: frozenset[int] = frozenset(),
                    views: dict[str, View | None] | None = None) -> tuple[Plan, Applied]:
        """``views``: the znodes as the plans before this one leave them (``bridge.chain``),
        updated in place; by default, as ``reads`` found them."""
        plan = Plan()
        if views is None:
            views = {r: view_of(n) for r, n in reads.items() if not isinstance(n, NoPermission)}
        outcomes: list[tuple[Event, Outcome]] = []
        conflicts: list[Conflict] = []
        for i, event in enumerate(events):
            if i in if_live and not self.null_wins(plan, event):
                outcomes.append((event, Outcome.SKIPPED))
                continue
            outcome, conflict = self._plan_one(plan, views, reads, event)
            outcomes.append((event, outcome))
            if conflict is not None:
                conflicts.append(conflict)
                plan.ops.append(Create(self.layout.conflicts + "/c-",
                                       statecodec.encode_conflict(conflict), sequential=True))
        return plan, Applied(tuple(outcomes), tuple(conflicts))


    def _plan_one(self, plan: Plan, views: dict[str, View | None],
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
        if isinstance(reads.get(rel), NoPermission) or (
                self.held_back.get(rel) in WRITE_HOLDS and rel not in self.retried):
            self.hold(rel, self.held_back.get(rel, "read"))
            self._keep_held(plan, event)
            return Outcome.HELD_BACK, None
        if rel not in views:
            raise NeedRead([rel])
        view = views[rel]
        if view is not None and view.ephemeral:
            # This region's ephemeral znode (an application's session) stands
            # where the origin has a persistent one: it waits for that session.
            self.hold(rel, "ephemeral")
            self._keep_held(plan, event)
            return Outcome.HELD_BACK, None
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
                if event.acl is not None:
                    plan.acls.append((rel, event.acl))
            else:
                self._parents(plan, views, rel)
                plan.ops.append(Create(znode, data, acl=self.acl.for_create(event.acl)))
                views[rel] = View(0, 0, data == b"")
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
            meta = replace(meta, placeholder=True, placeholder_czxid=view.czxid)
        self._meta_op(plan, rel, meta)
        return self._applied(decision.action), conflict


    @staticmethod
    def _applied(action: Action) -> Outcome:
        return Outcome.APPLIED if action is Action.APPLY else Outcome.CONFLICT_REMOTE


    @staticmethod
    def _child_count(views: dict[str, View | None], rel: str, delta: int) -> None:
        p = parent(rel)
        if p == "/":
            return
        if p not in views:
            raise NeedRead([p])
        pv = views[p]
        if pv is not None:
            pv.children += delta


    def _parents(self, plan: Plan, views: dict[str, View | None], rel: str) -> None:
        """Plan creation of missing ancestors as empty placeholders, outermost first."""
        missing: list[str] = []
        for anc in ancestors(rel):
            if anc not in views:
                raise NeedRead([anc])
            if views[anc] is not None:
                break
            missing.append(anc)
        for anc in reversed(missing):
            plan.ops.append(Create(self.layout.znode(anc), b""))
            self._child_count(views, anc, +1)
            views[anc] = View(0, 0, True)
            known = self._current_meta(plan, anc)
            if known is None:
                self._meta_op(plan, anc, NodeMeta(vc=VectorClock(), data_hash=content_hash(b""),
                                                  deleted=False, writer="", ts=0,
                                                  placeholder=True))
            elif known.deleted and not known.placeholder:
                # Over a tombstone, as a delete applied over children leaves it in
                # other regions: marked the same (its czxid unknown until created).
                self._meta_op(plan, anc, replace(known, placeholder=True))
