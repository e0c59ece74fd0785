"""The unrecorded znodes a join set aside, kept in the region's ensemble until it ends.

A joining subtree's copy has no records, so a znode of it that an
application deletes while a crashed join's bridge is down leaves no trace:
the next start could not tell it from a path the region never held, and a
peer's version would come back over the application's delete. The join's
first scan therefore writes the paths it set aside, in chunks under
``Layout.aside``; the node's data says the list is whole for the joining
marker made at a zxid (its czxid). A marker made since (widened for another
path), or a list left unfinished by a crash, makes the next scan add what it
set aside. Nothing is dropped before the join ends: a path listed once was
set aside by a scan of this join, and a delete of it while a bridge was down
is the application's, whichever start comes next.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from bridge import failpoints, statecodec
from bridge.errors import CodecError
from bridge.layout import Layout
from bridge.statecodec import MAX_REREAD_PATHS
from bridge.zk import Create, Delete, Node, SetData, ZooKeeper

WHOLE = b"whole"  # a release before: whole for a marker it does not name
CHUNK_BYTES = 512 * 1024  # well under jute.maxbuffer


def whole(line: int) -> bytes:
    """The list's data once it is whole for the marker made at zxid ``line``."""
    return WHOLE + b":" + str(line).encode()


def whole_for(data: bytes) -> int | None:
    """The marker's zxid a list's data says it is whole for (None: unfinished, or
    written by a release before, which names none)."""
    head, sep, line = data.partition(b":")
    if head != WHOLE or not sep or not line.isdigit():
        return None
    return int(line)


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


async def load(zk: ZooKeeper, layout: Layout) -> tuple[frozenset[str] | None, int | None]:
    """The paths a join of this subtree listed (None: no list), and the marker's zxid
    the list is whole for (None: unfinished). An unreadable list is dropped."""
    top = await zk.get(layout.aside)
    if top is None:
        return None, None
    names = sorted(await zk.children(layout.aside) or ())
    nodes, _ = await zk.read_all([("data", f"{layout.aside}/{n}") for n in names])
    try:
        return (frozenset(p for n in nodes if isinstance(n, Node)
                          for p in statecodec.decode_paths(n.data)), whole_for(top.data))
    except CodecError:
        await drop(zk, layout, names)
        return None, None


async def save(zk: ZooKeeper, layout: Layout, paths: Sequence[str], line: int) -> None:
    """Add ``paths`` to the list, then mark it whole for the marker made at ``line``
    (the chunks first: a crash in between leaves the list to be added to again)."""
    top = layout.aside
    names = await zk.children(top)
    if names is None:
        if not paths:
            return  # no list, none needed: the next scan sets aside the same
        await zk.multi([Create(top, b"")])
    first = max((int(n) for n in names or () if n.isdigit()), default=-1) + 1
    for i, piece in enumerate(chunks(sorted(paths)), first):
        await zk.multi([Create(f"{top}/{i:06d}", statecodec.encode_paths(piece))])
    failpoints.hit(failpoints.JOIN_LISTED)
    await zk.multi([SetData(top, whole(line))])


async def drop(zk: ZooKeeper, layout: Layout, names: Sequence[str] | None = None) -> None:
    """Remove the list (before the joining marker: a list never outlives its join)."""
    if names is None:
        if await zk.exists(layout.aside) is None:
            return
        names = await zk.children(layout.aside) or ()
    await zk.multi([*(Delete(f"{layout.aside}/{n}") for n in names), Delete(layout.aside)])
