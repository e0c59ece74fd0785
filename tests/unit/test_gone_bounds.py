"""A joining scan dates each recorded znode it finds missing (``ScanResult.gone``).

No servers: an in-memory tree answers the scan's reads. The bound is the
nearest present ancestor's pzxid as read after the listing that lacked the
path, so a delete made after the marker is never dated before it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from bridge import joining, statecodec
from bridge.clock import HybridClock
from bridge.config import MassDeleteSettings
from bridge.errors import NoPermission
from bridge.layout import Layout
from bridge.model import NodeMeta, VectorClock, content_hash
from bridge.scan import NEVER, Scanner
from bridge.store import SubtreeStore
from bridge.zk import Node, Stat

LAYOUT = Layout("/zkbridge", "s", "/app")
MARKER = 100


def meta_node(data: bytes) -> Node:
    meta = NodeMeta(vc=VectorClock.of({"r1": 1}), data_hash=content_hash(data), deleted=False,
                    writer="r1", ts=1)
    return Node(statecodec.encode_meta(meta), Stat(0, 0, 0, False, 1, 1))


class Tree:
    """Znodes by path, each (data, mzxid, pzxid); children from the paths."""

    def __init__(self, znodes: dict[str, tuple[bytes, int, int]], metas: Sequence[str]) -> None:
        self.nodes: dict[str, Node] = {}
        for path, (data, mzxid, pzxid) in znodes.items():
            self.nodes[path] = Node(data, Stat(0, 0, 0, False, mzxid, mzxid, pzxid))
        for rel in metas:
            here = self.nodes.get(LAYOUT.znode(rel))
            self.nodes[LAYOUT.meta(rel)] = meta_node(here.data if here else b"gone")
        self.nodes.setdefault(LAYOUT.meta_root, Node(b"", Stat(0, 0, 0, False, 1, 1)))

    def kids(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return sorted({p[len(prefix):].split("/")[0] for p in self.nodes
                       if p.startswith(prefix)})

    def stat_of(self, path: str) -> Node | None:
        node = self.nodes.get(path)
        if node is None:
            return None
        s = node.stat
        return Node(node.data, Stat(s.version, s.cversion, len(self.kids(path)), False,
                                    s.czxid, s.mzxid, s.pzxid))

    async def sync(self, path: str) -> None:
        return None

    async def read_all(self, ops: Sequence[tuple[str, str]], progress: Any = None
                       ) -> tuple[list[Any], list[int]]:
        out: list[Any] = []
        for kind, path in ops:
            if kind == "children":
                out.append(self.kids(path) if path in self.nodes else None)
            else:
                out.append(self.stat_of(path))
        return out, [1] * len(ops)


def scan(tree: Tree, joining_: bool = True) -> tuple[SubtreeStore, Any]:
    store = SubtreeStore(tree, LAYOUT, region="r2",  # type: ignore[arg-type]
                         clock=HybridClock(lambda: 1), max_data_bytes=1 << 20)
    store.joining = {} if joining_ else None
    store.join_zxid = MARKER if joining_ else 0
    store.mount_before = LAYOUT.mount  # nothing to record
    result = asyncio.run(Scanner(store, MassDeleteSettings(min_nodes=1000)).scan())
    return store, result


def test_a_delete_is_dated_by_the_nearest_present_ancestor() -> None:
    # /a/x deleted (its parent's last child change at 50); /b and its child /b/y gone
    # (the mount's last child change at 60); /c/z deleted after the marker (150).
    tree = Tree({"/app": (b"", 1, 60), "/app/a": (b"a", 10, 50), "/app/c": (b"c", 10, 150)},
                ["/a", "/a/x", "/b", "/b/y", "/c", "/c/z"])
    store, result = scan(tree)
    assert result.gone == {"/a/x": 50, "/b": 60, "/b/y": 60, "/c/z": 150}
    assert joining.set_aside(store, result) == {"/c/z"}
    assert store.joining == {"/a/x": None, "/b": None, "/b/y": None}


def test_a_scan_not_joining_reads_no_more_and_dates_nothing() -> None:
    tree = Tree({"/app": (b"", 1, 60), "/app/a": (b"a", 10, 50)}, ["/a", "/a/x"])
    reads: list[tuple[str, str]] = []
    inner = tree.read_all

    async def counted(ops: Sequence[tuple[str, str]], progress: Any = None
                      ) -> tuple[list[Any], list[int]]:
        reads.extend(ops)
        return await inner(ops, progress)

    tree.read_all = counted  # type: ignore[method-assign]
    _, result = scan(tree, joining_=False)
    assert result.gone == {} and "/a/x" in result.changed
    assert ("data", "/app") not in reads and ("data", "/app/a") in reads  # /a: its content


@pytest.mark.parametrize("second", ["vanished", "refused"])
def test_an_ancestor_not_read_again_gives_its_own_bound_or_none(second: str) -> None:
    """/a's read after its listings finds it gone (then it was deleted by the
    mount's last child change, 60) or refused (then nothing dates /a/x's delete)."""
    tree = Tree({"/app": (b"", 1, 60), "/app/a": (b"a", 10, 50)}, ["/a", "/a/x"])
    real = tree.stat_of
    reads = {"n": 0}

    def stat_of(path: str) -> Node | NoPermission | None:
        if path == "/app/a":
            reads["n"] += 1
            if reads["n"] == 2:  # the read after /a's listings
                return None if second == "vanished" else NoPermission("no", path)
        return real(path)

    tree.stat_of = stat_of  # type: ignore[method-assign,assignment]
    store, result = scan(tree)
    assert result.gone == {"/a/x": 60 if second == "vanished" else NEVER}
    assert joining.set_aside(store, result) == (set() if second == "vanished" else {"/a/x"})
