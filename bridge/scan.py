"""Change detection for one subtree: watch bookkeeping and full scans.

ZooKeeper watches are one-shot and nothing is delivered while disconnected,
so watches only tell *where* to look; the full scan (after ``sync``) on start
and after every reconnect is what guarantees no change is missed. The scan
also arms a data watch and a child watch on every znode it visits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from bridge.config import MassDeleteSettings
from bridge.errors import MassDeleteError
from bridge.store import Change, Local, SubtreeStore, classify, join
from bridge.zk import gather_limited

log = structlog.get_logger("bridge.scan")

CONCURRENCY = 64


@dataclass(frozen=True, slots=True)
class ScanResult:
    changed: tuple[str, ...]  # paths whose local change must be captured, parents first
    znodes: int
    replicated: int  # live metadata records
    deletes: int
    seconds: float


class Scanner:
    def __init__(self, store: SubtreeStore, mass_delete: MassDeleteSettings) -> None:
        self.store = store
        self.mass_delete = mass_delete
        self._children: dict[str, set[str]] = {}  # rel → znode child names, while watched

    def forget(self, rel: str) -> None:
        self._children.pop(rel, None)

    def reset(self) -> None:
        self._children.clear()

    async def children_changed(self, rel: str) -> list[str]:
        """A child watch fired (or must be armed): re-arm it, return children that came or went."""
        names = await self.store.zk.children(self.store.layout.znode(rel), watch=True)
        if names is None:
            self._children.pop(rel, None)
            return []
        new = set(names)
        old = self._children.get(rel, set())
        self._children[rel] = new
        return [join(rel, n) for n in sorted(new ^ old) if not self.store.excluded(join(rel, n))]

    def watched(self, rel: str) -> bool:
        """Is a child watch known to be armed on ``rel``?"""
        return rel in self._children

    async def ensure_watched(self, rel: str) -> list[str]:
        """After capturing a present znode: make sure its children are watched too."""
        if rel in self._children:
            return []
        return await self.children_changed(rel)

    async def scan(self, *, allow_mass_delete: bool = False) -> ScanResult:
        started = time.monotonic()
        store = self.store
        self.reset()
        await store.zk.sync(store.layout.mount)
        changed: list[str] = []
        znodes = replicated = deletes = 0
        level = ["/"]
        while level:
            listings = await gather_limited([self._list(rel) for rel in level], CONCURRENCY)
            rels = sorted({r for names in listings for r in names})
            reads: list[Local] = await gather_limited(
                [store.read(r, watch=True) for r in rels], CONCURRENCY
            )
            level = []
            for local in reads:
                change = classify(local.node, local.meta)
                if local.node is not None and change is not Change.IGNORE:
                    znodes += 1
                if local.meta is not None and not local.meta.deleted:
                    replicated += 1
                if change in (Change.PUT, Change.DELETE, Change.MAYBE_PLACEHOLDER):
                    changed.append(local.rel)
                if change is Change.DELETE:
                    deletes += 1
                if (local.node is not None and change is not Change.IGNORE) or local.meta_children:
                    level.append(local.rel)
        result = ScanResult(tuple(changed), znodes, replicated, deletes, time.monotonic() - started)
        self._breaker(result, allow_mass_delete)
        return result

    async def _list(self, rel: str) -> list[str]:
        zk, lay = self.store.zk, self.store.layout
        znames = await zk.children(lay.znode(rel), watch=True)
        if znames is not None:
            self._children[rel] = set(znames)
        mnames = await zk.children(lay.meta(rel)) or []
        names = set(znames or []) | set(mnames)
        return [join(rel, n) for n in names if not self.store.excluded(join(rel, n))]

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
