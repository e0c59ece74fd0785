"""Full scans of one subtree: what changed while nobody watched, and the metadata cache.

Nothing is delivered while disconnected and a persistent watch does not
survive a reconnect, so watches only tell *where* to look; the full scan
(after ``sync``) at the start of every term and after every reconnect is what
guarantees no change is missed. It reads the znodes and the metadata mirror
level by level with many reads per request (``multiRead``), and leaves the
store's metadata cache filled for the term.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import structlog

from bridge.config import MassDeleteSettings
from bridge.errors import MassDeleteError, NoPermission
from bridge.layout import Change, classify, join
from bridge.plan import MetaEntry
from bridge.store import SubtreeStore
from bridge.zk import ACL_CHUNK, Node, gather_limited

log = structlog.get_logger("bridge.scan")

CHUNK = 250  # reads per request
CONCURRENCY = 4  # requests in flight
ACLS_AHEAD = 4 * ACL_CHUNK  # ACLs of new znodes read ahead, per scan


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


class Scanner:
    def __init__(self, store: SubtreeStore, mass_delete: MassDeleteSettings) -> None:
        self.store = store
        self.mass_delete = mass_delete

    async def _read(self, ops: list[tuple[str, str]]) -> tuple[list[Any], list[int]]:
        """The answers, and the frame of the reply that gave each."""
        chunks = [ops[i : i + CHUNK] for i in range(0, len(ops), CHUNK)]
        parts = await gather_limited([self.store.zk.read_many_framed(c) for c in chunks],
                                     CONCURRENCY)
        return ([r for got, _ in parts for r in got],
                [frame for got, frame in parts for _ in got])

    async def scan(self, *, allow_mass_delete: bool = False) -> ScanResult:
        self.store.rebuilding = True
        try:
            return await self._scan(allow_mass_delete)
        finally:
            self.store.rebuilding = False

    async def _scan(self, allow_mass_delete: bool) -> ScanResult:
        started = time.monotonic()
        store, lay = self.store, self.store.layout
        await store.zk.sync(lay.mount)
        store.metas = {"/": MetaEntry(None, 0)}
        changed: list[str] = []
        present: list[str] = []
        reads: dict[str, tuple[Node, int]] = {}
        znodes = replicated = deletes = 0
        ahead = ACLS_AHEAD
        # (rel, list its znode children?, list its metadata children?)
        level: list[tuple[str, bool, bool]] = [("/", True, True)]
        while level:
            ops = [op for rel, zkids, mkids in level
                   for op in ((("children", lay.znode(rel)),) if zkids else ())
                   + ((("children", lay.meta(rel)),) if mkids else ())]
            listings = iter((await self._read(ops))[0])
            # What a listing did not name is not read: the watch went first, so
            # a znode created since is notified; metadata changes only under
            # the subtree's lock, which the scan holds.
            in_tree: set[str] = set()
            in_meta: set[str] = set()
            for rel, zkids, mkids in level:
                for want, into in ((zkids, in_tree), (mkids, in_meta)):
                    if not want:
                        continue
                    names = next(listings)
                    if isinstance(names, NoPermission):
                        store.hold(rel, "read")
                    elif names:
                        into.update(join(rel, n) for n in names)
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
            answers = iter(zip(*await self._read(ops), strict=True))
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
                if change is Change.DELETE:
                    deletes += 1
                zkids = node is not None and change is not Change.IGNORE and (
                    node.stat.num_children > 0)
                mkids = isinstance(mnode, Node) and mnode.stat.num_children > 0
                if zkids or mkids:
                    level.append((rel, zkids, mkids))
        # Held back for reading: looked at again by every scan.
        for rel in [r for r, what in store.held_back.items() if what == "read"]:
            if rel not in changed:
                changed.append(rel)
        result = ScanResult(tuple(changed), znodes, replicated, deletes,
                            time.monotonic() - started, tuple(present), reads)
        self._breaker(result, allow_mass_delete)
        return result

    def _breaker(self, result: ScanResult, allow: bool) -> None:
        md = self.mass_delete
        if allow or result.deletes < max(md.min_nodes, 1):
            return
        if result.deletes > md.max_ratio * max(result.replicated, 1):
            raise MassDeleteError(
                f"subtree {self.store.layout.name!r}: the scan found {result.deletes} of "
                f"{result.replicated} replicated znodes deleted locally (more than "
                f"{md.max_ratio:.0%}); refusing to announce a mass delete to every region. "
                "If the deletion is intended, start once with `zkbridge run --allow-mass-delete`; "
                "if the local ensemble lost data, restore it instead."
            )
