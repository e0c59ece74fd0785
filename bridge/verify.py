"""Read-only comparison of replicated subtrees across regions (``zkbridge verify``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from bridge import statecodec
from bridge.config import Settings
from bridge.errors import NoPermission
from bridge.layout import Layout, is_excluded, join
from bridge.model import NodeMeta
from bridge.progress import QUIET, Progress, Task
from bridge.zk import Node, Stat, ZooKeeper


@dataclass(frozen=True, slots=True)
class Difference:
    subtree: str
    path: str
    detail: str  # one line: which regions differ and how


# Stands for a znode the verifying identity may not read (never real content).
UNREADABLE = b"\x00zkbridge: not readable\x00"


def _ignore(_: int) -> None:
    pass


async def _walk(
    zk: ZooKeeper, path_of: Callable[[str], str], exclude: Sequence[str] = (),
    tick: Callable[[int], None] = _ignore,
) -> AsyncIterator[tuple[str, Node]]:
    """Every node below ``path_of("/")``, level by level, many reads per request: (rel
    path, node).

    ``tick(n)`` as ``n`` nodes arrive, for progress bars.
    """
    level = ["/"]
    while level:
        listings, _ = await zk.read_all([("children", path_of(r)) for r in level])
        rels = [join(rel, n) for rel, names in zip(level, listings, strict=True)
                if isinstance(names, list)  # gone (None), or not listable here
                for n in names if not is_excluded(join(rel, n), exclude)]
        nodes, _ = await zk.read_all([("data", path_of(r)) for r in rels], tick)
        level = []
        for rel, node in zip(rels, nodes, strict=True):
            if node is None:
                continue
            if isinstance(node, NoPermission):
                # Named as a difference, never a crash: the path is held back somewhere.
                node = Node(UNREADABLE, Stat(0, 0, 0, False, 0, 0))
            yield rel, node
            if node.stat.num_children:
                level.append(rel)


async def read_tree(zk: ZooKeeper, mount: str, exclude: Sequence[str] = (),
                    tick: Callable[[int], None] = _ignore) -> dict[str, bytes]:
    """Every persistent znode below ``mount`` (the mount itself excluded): rel path → bytes."""
    return {rel: node.data
            async for rel, node in _walk(zk, lambda r: mount if r == "/" else mount + r, exclude,
                                         tick)
            if not node.stat.ephemeral}


async def read_meta(zk: ZooKeeper, layout: Layout,
                    tick: Callable[[int], None] = _ignore, *, since: int = 0
                    ) -> dict[str, NodeMeta]:
    """Every metadata record of a subtree (written after zxid ``since``): rel path →
    NodeMeta."""
    out: dict[str, NodeMeta] = {}
    async for rel, node in _walk(zk, layout.meta, tick=tick):
        meta = statecodec.decode_meta(node.data) if node.stat.mzxid > since else None
        if meta is not None:
            out[rel] = meta
    return out


def _show(data: bytes | None) -> str:
    if data is None:
        return "absent"
    if data == UNREADABLE:
        return "not readable by this identity (ACL)"
    preview = data[:24]
    text = preview.decode("utf-8", "backslashreplace") if preview.isascii() else preview.hex()
    more = "…" if len(data) > 24 else ""
    return f"{len(data)}B {text!r}{more}" if text else "0B"


def compare_trees(
    subtree: str, trees: dict[str, dict[str, bytes]]
) -> list[Difference]:
    regions = sorted(trees)
    paths = sorted(set().union(*(t.keys() for t in trees.values())))
    diffs = []
    for rel in paths:
        values = {r: trees[r].get(rel) for r in regions}
        if len(set(values.values())) > 1:
            detail = "; ".join(f"{r}: {_show(v)}" for r, v in values.items())
            diffs.append(Difference(subtree, rel, detail))
    return diffs


def compare_meta(subtree: str, metas: dict[str, dict[str, NodeMeta]]) -> list[Difference]:
    regions = sorted(metas)
    paths = sorted(set().union(*(m.keys() for m in metas.values())))
    diffs = []
    for rel in paths:
        clocks = {r: metas[r].get(rel) for r in regions}
        shown = {r: (str(m.vc) + ("†" if m.deleted else "")) if m else "-" for r, m in
                 clocks.items()}
        if len(set(shown.values())) > 1:
            diffs.append(Difference(subtree, rel, "clock " + "; ".join(
                f"{r}: {v}" for r, v in shown.items())))
    return diffs


async def verify(configs: Sequence[Settings], *, meta: bool = False,
                 progress: Progress = QUIET) -> list[Difference]:
    """Compare every subtree that all configs share; returns the differences.

    Regions are read one after the other (one walk at a time per ensemble);
    the first region's size is the estimate that gives the others a time left.
    """
    names = set.intersection(*({s.name for s in c.subtrees} for c in configs))
    clients = [ZooKeeper(c.zookeeper, read_only=True) for c in configs]
    try:
        await asyncio.gather(*(z.start() for z in clients))
        diffs: list[Difference] = []
        for name in sorted(names):
            trees: dict[str, dict[str, bytes]] = {}
            metas: dict[str, dict[str, NodeMeta]] = {}
            for cfg, zk in zip(configs, clients, strict=True):
                st = cfg.subtree(name)
                estimate = max((len(t) for t in trees.values()), default=None)
                task = progress.task(f"{cfg.region} {name}", estimate)
                await zk.sync(st.path)
                trees[cfg.region] = await read_tree(zk, st.path, st.exclude, task.advance)
                task.done()
                if meta:
                    task = _meta_task(progress, cfg.region, name, metas)
                    metas[cfg.region] = await read_meta(
                        zk, Layout(cfg.state_path, name, st.path), task.advance
                    )
                    task.done()
            diffs += compare_trees(name, trees)
            if meta:
                diffs += compare_meta(name, metas)
        return diffs
    finally:
        await asyncio.gather(*(z.stop() for z in clients), return_exceptions=True)


def _meta_task(progress: Progress, region: str, name: str,
               metas: dict[str, dict[str, NodeMeta]]) -> Task:
    estimate = max((len(m) for m in metas.values()), default=None)
    return progress.task(f"{region} {name} metadata", estimate)
