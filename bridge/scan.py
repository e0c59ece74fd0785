"""Full scans and audits of one subtree: what changed while nobody watched, and the
metadata cache.

Nothing is delivered while disconnected and a persistent watch does not
survive a reconnect, so watches only tell *where* to look; the full scan
(after ``sync``) at the start of every term and after every reconnect is what
guarantees no change is missed. It reads the znodes and the metadata mirror
level by level with many reads per request (``multiRead``), and leaves the
store's metadata cache filled for the term. An audit (every ``audit_interval``)
only lists the tree and compares it with that cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import structlog

from bridge.config import MassDeleteSettings
from bridge.errors import MassDeleteError, NoPermission
from bridge.layout import Change, classify, join, parent
from bridge.plan import MetaEntry
from bridge.store import SubtreeStore
from bridge.zk import ACL_CHUNK, Node

log = structlog.get_logger("bridge.scan")

ACLS_AHEAD = 4 * ACL_CHUNK  # ACLs of new znodes read ahead, per scan
# A delete's bound when none was read: above every marker, so the delete is
# taken for an application's (``SubtreeStore.gone_before``).
NEVER = 1 << 63


@dataclass(frozen=True, slots=True)
class ScanResult:
    changed: tuple[str, ...]  # paths whose local change must be captured
    znodes: int
    replicated: int  # live metadata records
    deletes: int
    seconds: float
    present: tuple[str, ...] = ()  # every replicated znode found (for per-node watches)
    # Changed znodes as the scan read them, each with its reply's frame: the
    # capture that follows reads again only what was notified since.
    reads: Mapping[str, tuple[Node, int]] = field(default_factory=dict)
    # While joining: each recorded znode found missing, with a zxid at or above
    # its delete's (``SubtreeStore.gone_before``).
    gone: Mapping[str, int] = field(default_factory=dict)
    # At a mount moved since the last start (``SubtreeStore.mount_before``): the
    # znodes that differ from their record and were last written before it (a
    # copy made before the bridge's last writes at the old mount), and the
    # recorded ones missing.
    older: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuditResult:
    suspects: tuple[str, ...]  # paths a capture must read: the listings and the cache differ
    listed: int  # znodes listed
    seconds: float


class Scanner:
    def __init__(self, store: SubtreeStore, mass_delete: MassDeleteSettings) -> None:
        self.store = store
        self.mass_delete = mass_delete
        # The scan under way or last run, for a start's progress: znodes and
        # metadata records read so far, and the changes it found (None until done).
        self.read = 0
        self.found: int | None = None

    async def _read(self, ops: list[tuple[str, str]], progress: Callable[[int], None] | None = None
                    ) -> tuple[list[Any], list[int]]:
        """The answers, and the frame of the reply that gave each."""
        return await self.store.zk.read_all(ops, progress)

    def _count(self, n: int) -> None:
        self.read += n

    async def scan(self, *, allow_mass_delete: bool = False) -> ScanResult:
        self.store.rebuilding = True
        try:
            return await self._scan(allow_mass_delete)
        finally:
            self.store.rebuilding = False

    async def _scan(self, allow_mass_delete: bool) -> ScanResult:
        started = time.monotonic()
        self.read, self.found = 0, None
        store, lay = self.store, self.store.layout
        await store.zk.sync(lay.mount)
        store.metas = {"/": MetaEntry(None, 0)}
        changed: list[str] = []
        present: list[str] = []
        reads: dict[str, tuple[Node, int]] = {}
        gone: dict[str, int] = {}
        joining = store.joining is not None
        moved = store.moved_from is not None
        older: list[str] = []
        missing: list[str] = []
        znodes = replicated = deletes = 0
        ahead = ACLS_AHEAD
        # (rel, list its znode children?, list its metadata children?, the zxid by
        # which a missing child was deleted, if rel is missing too)
        level: list[tuple[str, bool, bool, int]] = [("/", True, True, NEVER)]
        while level:
            # While joining, each parent of records is read again after its
            # listings: its pzxid bounds the deletes of the children they lack.
            ops = [op for rel, zkids, mkids, _ in level
                   for op in ((("children", lay.znode(rel)),) if zkids else ())
                   + ((("children", lay.meta(rel)),) if mkids else ())
                   + ((("data", lay.znode(rel)),) if joining and mkids else ())]
            listings = iter((await self._read(ops))[0])
            # What a listing did not name is not read: the watch went first, so
            # a znode created since is notified; metadata changes only under
            # the subtree's lock, which the scan holds.
            in_tree: set[str] = set()
            in_meta: set[str] = set()
            bounds: dict[str, int] = {}
            for rel, zkids, mkids, bound in level:
                for want, into in ((zkids, in_tree), (mkids, in_meta)):
                    if not want:
                        continue
                    names = next(listings)
                    if isinstance(names, NoPermission):
                        store.hold(rel, "read")
                    elif names:
                        into.update(join(rel, n) for n in names)
                if joining and mkids:
                    again = next(listings)
                    bounds[rel] = (again.stat.pzxid if isinstance(again, Node)
                                   else bound if again is None else NEVER)
            todo = sorted(r for r in in_tree | in_meta if not store.excluded(r))
            # A znode without metadata is new here: the capture after the scan
            # announces it, with its ACL. The first few thousand are read ahead
            # while their data is read, so that the capture's first pieces need
            # not wait; the capture reads the rest a few groups ahead itself.
            # (All of 100,000 ahead slowed the scan's own reads, queued behind
            # them at the server, by 1-2.5 s, and the start was no shorter.)
            reader = store.acl_reader
            if reader is not None and reader.connected and ahead > 0:
                new = list(islice(((lay.znode(r), r) for r in todo if r not in in_meta), ahead))
                ahead -= len(new)
                store.acl.prefetch(reader, new, lay.mount)
            ops = [op for r in todo for op in (
                (("data", lay.znode(r)),) if r in in_tree else ()) + (
                (("data", lay.meta(r)),) if r in in_meta else ())]
            answers = iter(zip(*await self._read(ops, self._count), strict=True))
            level = []
            for rel in todo:
                node, frame = next(answers) if rel in in_tree else (None, 0)
                mnode = next(answers)[0] if rel in in_meta else None
                store.load_meta(rel, mnode if isinstance(mnode, Node) else None)
                if isinstance(node, NoPermission):
                    store.hold(rel, "read")
                    continue
                meta = store.meta(rel)
                change = classify(node, meta)
                if node is not None and change is not Change.IGNORE:
                    znodes += 1
                    present.append(rel)
                if meta is not None and not meta.deleted:
                    replicated += 1
                if change in (Change.PUT, Change.DELETE, Change.MAYBE_PLACEHOLDER):
                    changed.append(rel)
                    if isinstance(node, Node):
                        reads[rel] = (node, frame)
                if moved and change is Change.PUT and isinstance(node, Node) and (
                        isinstance(mnode, Node) and node.stat.mzxid < mnode.stat.mzxid):
                    older.append(rel)
                if change is Change.DELETE:
                    deletes += 1
                    if moved:
                        missing.append(rel)
                    if joining:
                        gone[rel] = bounds.get(parent(rel), NEVER)
                zkids = node is not None and change is not Change.IGNORE and (
                    node.stat.num_children > 0)
                mkids = isinstance(mnode, Node) and mnode.stat.num_children > 0
                if zkids or mkids:
                    level.append((rel, zkids, mkids, bounds.get(parent(rel), NEVER)))
        # Held back for reading: looked at again by every scan.
        for rel in [r for r, what in store.held_back.items() if what == "read"]:
            if rel not in changed:
                changed.append(rel)
        result = ScanResult(tuple(changed), znodes, replicated, deletes,
                            time.monotonic() - started, tuple(present), reads, gone,
                            tuple(older), tuple(missing))
        self.found = len(changed)
        self._breaker(result, allow_mass_delete)
        await store.note_mount()
        return result

    async def audit(self) -> AuditResult:
        """Every znode's listing against the metadata cache (the periodic check).

        While the session holds, the persistent watch reports every change the
        bridge may read, and the cache is exact (the leader is its only
        writer), so neither data nor metadata is read again. What the watch
        misses is a znode the bridge may not read (servers with the
        CVE-2024-23944 fix send no event for it): a name the cache does not
        know, a live path of the cache the listing lacks, a listing refused.
        Those, and the paths held back for reading, are the suspects a capture
        reads. No lock is held: a path that changes meanwhile is at worst read
        once more by that capture.
        """
        started = time.monotonic()
        store, lay = self.store, self.store.layout
        live: dict[str, list[str]] = {}
        for rel, entry in store.metas.items():
            if rel != "/" and entry.meta is not None and not entry.meta.deleted:
                live.setdefault(parent(rel), []).append(rel)
        suspects: set[str] = set()
        listed = 0
        level = ["/"]
        while level:
            listings = (await self._read([("children", lay.znode(r)) for r in level]))[0]
            below: list[str] = []
            for rel, names in zip(level, listings, strict=True):
                listed += 1
                if isinstance(names, NoPermission):
                    suspects.add(rel)
                    continue
                here = {join(rel, n) for n in names or ()}
                for child in here:
                    if not store.excluded(child):
                        below.append(child)
                        if child not in store.metas:
                            suspects.add(child)
                suspects.update(c for c in live.get(rel, ())
                                if c not in here and not store.excluded(c))
            level = below
        # Names the cache does not know are mostly ephemeral znodes (never
        # replicated): read them here, so that only the others go to a capture.
        unknown = sorted(r for r in suspects if r not in store.metas)
        nodes = (await self._read([("data", lay.znode(r)) for r in unknown]))[0]
        suspects.difference_update(r for r, node in zip(unknown, nodes, strict=True)
                                   if node is None or (isinstance(node, Node)
                                                       and node.stat.ephemeral))
        suspects.update(r for r, what in store.held_back.items() if what == "read")
        return AuditResult(tuple(sorted(suspects)), listed, time.monotonic() - started)

    def _breaker(self, result: ScanResult, allow: bool) -> None:
        if (before := self.store.moved_from) is not None:
            self._moved(result, allow, before)
        if allow or result.deletes < max(self.mass_delete.min_nodes, 1):
            return
        if self._mass(result):
            raise MassDeleteError(
                f"subtree {self.store.layout.name!r}: the scan found {result.deletes} of "
                f"{result.replicated} replicated znodes deleted locally (more than "
                f"{self.mass_delete.max_ratio:.0%}); refusing to announce a mass delete to "
                "every region. If the deletion is intended, start once with `zkbridge run "
                "--allow-mass-delete`; if the local ensemble lost data, restore it instead."
            )

    def _mass(self, result: ScanResult) -> bool:
        return result.deletes > self.mass_delete.max_ratio * max(result.replicated, 1)

    def _moved(self, result: ScanResult, allow: bool, before: str) -> None:
        """At a moved mount, only a tree the state describes goes on: one copied while
        the bridge still applied the peers' writes at the old mount holds older
        values and lacks their creates, and announced, they would go over the
        federation's newer versions in every region."""
        mount = self.store.layout.mount
        head = f"subtree {self.store.layout.name!r}: its mount here was {before} and is {mount} now"
        copy = (f"Copy the tree from {before} to {mount} with this bridge stopped (znodes "
                f"that match the state are taken as they are), or configure {before} again.")
        if result.older:
            raise MassDeleteError(
                f"{head}, and {len(result.older)} znodes there were written before the "
                f"versions the state records ({_some(result.older)}): a copy made while "
                f"the bridge still wrote at {before}; refusing to announce older values "
                f"to every region. {copy}")
        if not result.missing:
            return
        # Most of it missing is a copy not made (yet), not the applications' deletes:
        # no override, or a mistyped path would delete the subtree in every region.
        mass = self._mass(result)
        if allow and not mass:
            return
        offer = (f" `--allow-mass-delete` does not apply at a moved mount: to delete most "
                 f"of the subtree, do it at {before} before the move.") if mass else (
            f" If your applications deleted them at {mount} since the move, start once "
            f"with `zkbridge run --allow-mass-delete`.")
        raise MassDeleteError(
            f"{head}, and {len(result.missing)} of its {result.replicated} replicated "
            f"znodes are missing there ({_some(result.missing)}); refusing to announce "
            f"their delete to every region. {copy}{offer}")


def _some(paths: tuple[str, ...], shown: int = 3) -> str:
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more
