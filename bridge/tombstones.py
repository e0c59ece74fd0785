"""Tombstone collection: forget deletes every region has applied, once past a grace period.

A tombstone (the metadata of a deleted path) is what keeps a stale put from
bringing the znode back. It can go once no event it would have to refuse can
still arrive, which is what causal stability says (``bridge.stability``):
every region has applied the origin's stream through the delete, and this
region has applied every region's stream through the heartbeat that said so.
An event arriving later was written by a region that already held the
delete, so it carries the delete in its clock and is a genuine new write.

Two more conditions make that hold in practice:

* the grace period (``tombstone_grace``, days by default) is kept on top of
  stability; it must exceed ``max_clock_skew`` so that any write after the
  collection is stamped later than the delete it follows;
* a path is never collected while a local change or an event for it is
  pending in either pipeline, its znode exists (a placeholder kept for
  live children), or its metadata still has children.

A region that is down does not report: the minimum stays where it was and
nothing it has not applied becomes stable, so tombstones wait for it,
however long it is gone (the alternative, excluding it after the grace and
making it resync on return, would let its stale writes win against a path
already forgotten elsewhere).

After a collection the path has no clock here. A new local write to it must
still not look older than a tombstone another region has not collected yet
(a clock it dominates would be skipped there): the largest own counter of
any collected tombstone is kept as a *floor*, and a path captured without
metadata starts its own counter above it.

Null records. Each collection also publishes, on this region's own topic, a
null-value record per tombstone, carrying the collected delete ``D``: the
cleaner then forgets the path's older records there, and the null after
``delete.retention.ms``. Receivers apply ``D`` in the peer's stream order,
but only over a *live* version ``D`` dominates or beats by the conflict
rule (``Planner.null_wins``); anything else is left exactly as it is:

* In steady state this is a no-op everywhere. ``D`` was stable: every
  region applied it (or a version that beats it). What a region holds now
  is ``D`` itself, nothing (collected), or a version that beats ``D``: one
  written after the collection is stamped later than ``D`` (the grace
  exceeds the skew) and starts above the floor, so ``D`` never wins
  against it; and every version the null's origin published before its
  null lost to ``D`` already, wherever it was applied.
* A region that read topics from their start (a bootstrap, a rewind) can
  hold a version ``D`` beats: one region's topic still had an old put
  while ``D``'s own record was compacted away from the deleting region's
  topic. ``D`` is a real, announced version, so applying it there is what
  would have happened had its record still been there; the region then
  holds a tombstone with ``D``'s clock and collects it like any other.
* Where the path is absent or deleted, ``D`` is not applied: that would
  bring back a tombstone collected already, which, collected again, would
  publish another null, and so on between regions. Where the live version
  wins, not even its clock is merged with ``D``'s: the regions that
  collected ``D`` never merge it, and the clocks would differ.

No clock is made up on the way: a fabricated ``{X: n+1}`` could equal a
later genuine write of X and make it be skipped as a duplicate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping

from bridge.batching import depth
from bridge.layout import parent
from bridge.model import Event, Op
from bridge.plan import MetaEntry


def candidates(metas: Mapping[str, MetaEntry], *, stable: Callable[[str], int | None],
               before_ts: int, busy: Collection[str]) -> list[str]:
    """Tombstones whose delete is stable and stamped before ``before_ts``, deepest first."""
    out = []
    for rel, entry in metas.items():
        meta = entry.meta
        if meta is None or not meta.deleted or rel in busy or meta.ts >= before_ts:
            continue
        prefix = stable(meta.writer)
        if prefix is not None and meta.ts < prefix:
            out.append(rel)
    return sorted(out, key=lambda r: (-depth(r), r))


def removable(metas: Mapping[str, MetaEntry], chosen: Iterable[str]) -> list[str]:
    """Metadata znodes to delete for ``chosen`` (znodes absent), children before parents.

    A tombstone whose metadata still has children stays (it goes in a later
    round, after them); bare metadata directories left empty go too, or the
    mirror would keep the shape of every path ever deleted.
    """
    children: Counter[str] = Counter(parent(r) for r in metas if r != "/")
    out: list[str] = []
    gone: set[str] = set()
    for rel in sorted(set(chosen), key=lambda r: (-depth(r), r)):
        if children[rel] > 0 or rel in gone:
            continue
        out.append(rel)
        gone.add(rel)
        up = parent(rel)
        children[up] -= 1
        while (up != "/" and up not in gone and children[up] == 0
               and (entry := metas.get(up)) is not None and entry.meta is None):
            out.append(up)
            gone.add(up)
            children[parent(up)] -= 1
            up = parent(up)
    return out


def floor_after(metas: Mapping[str, MetaEntry], removed: Iterable[str], region: str,
                floor: int) -> int:
    """The new floor for ``region``'s counters once ``removed`` is forgotten."""
    for rel in removed:
        entry = metas.get(rel)
        if entry is not None and entry.meta is not None:
            floor = max(floor, entry.meta.vc.get(region))
    return floor


def null_events(metas: Mapping[str, MetaEntry], removed: Iterable[str], *, origin: str,
                subtree: str) -> list[Event]:
    """The tombstones among ``removed`` as delete events, for their null-value records.

    Each keeps the clock, stamp and writer it was collected with: a null
    carries a version every region has applied, never a made-up one.
    """
    out = []
    for rel in removed:
        entry = metas.get(rel)
        if entry is None or entry.meta is None or not entry.meta.deleted:
            continue
        m = entry.meta
        if not m.vc.entries or not m.writer:
            continue  # not a delete any region announced: nothing to carry
        out.append(Event(origin=origin, subtree=subtree, path=rel, op=Op.DELETE, vc=m.vc,
                         ts=m.ts, writer=m.writer))
    return out
