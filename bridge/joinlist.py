"""The unrecorded znodes a join set aside, kept in the region's ensemble until it ends.

A joining subtree's copy has no records, so a znode of it that an
application deletes while a crashed join's bridge is down leaves no trace:
the next start could not tell it from a path the region never held, and a
peer's version would come back over the application's delete. The join's
first scan therefore writes the paths it set aside, in chunks under
``Layout.aside``; the node's data says the list is whole. A list left
unfinished by a crash is dropped and written again from the next scan.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from bridge import statecodec
from bridge.errors import CodecError
from bridge.layout import Layout
from bridge.statecodec import MAX_REREAD_PATHS
from bridge.zk import Create, Delete, Node, SetData, ZooKeeper

WHOLE = b"whole"
CHUNK_BYTES = 512 * 1024  # well under jute.maxbuffer


def chunks(paths: Sequence[str]) -> Iterator[tuple[str, ...]]:
    """``paths`` in pieces each one znode can hold (count and bytes bounded)."""
    piece: list[str] = []
    size = 0
    for p in paths:
        n = len(p.encode()) + 8  # with msgpack's header, generously
        if piece and (len(piece) >= MAX_REREAD_PATHS or size + n > CHUNK_BYTES):
            yield tuple(piece)
            piece, size = [], 0
        piece.append(p)
        size += n
    if piece:
        yield tuple(piece)


async def load(zk: ZooKeeper, layout: Layout) -> frozenset[str] | None:
    """The list a join of this subtree wrote; None if there is no whole one (one
    left unfinished, or unreadable, is dropped)."""
    top = await zk.get(layout.aside)
    if top is None:
        return None
    names = sorted(await zk.children(layout.aside) or ())
    if top.data == WHOLE:
        nodes, _ = await zk.read_all([("data", f"{layout.aside}/{n}") for n in names])
        try:
            return frozenset(p for n in nodes if isinstance(n, Node)
                             for p in statecodec.decode_paths(n.data))
        except CodecError:
            pass
    await drop(zk, layout, names)
    return None


async def save(zk: ZooKeeper, layout: Layout, paths: Sequence[str]) -> None:
    top = layout.aside
    await zk.multi([Create(top, b"")])
    for i, piece in enumerate(chunks(sorted(paths))):
        await zk.multi([Create(f"{top}/{i:06d}", statecodec.encode_paths(piece))])
    await zk.multi([SetData(top, WHOLE)])


async def drop(zk: ZooKeeper, layout: Layout, names: Sequence[str] | None = None) -> None:
    """Remove the list (before the joining marker: a list never outlives its join)."""
    if names is None:
        if await zk.exists(layout.aside) is None:
            return
        names = await zk.children(layout.aside) or ()
    await zk.multi([*(Delete(f"{layout.aside}/{n}") for n in names), Delete(layout.aside)])
