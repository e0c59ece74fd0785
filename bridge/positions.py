"""Where this region stands in each topic: the next offset per partition, the topic's id,
and what applies of a topic read again for paths no longer excluded.

A peer's position is written in the same ``multi`` as the batch it follows
(``op``, then ``written`` once committed), so a restart resumes exactly
after the last batch applied. The version of each position znode is kept
for the term: that check fences a write made from a stale view.
"""

from __future__ import annotations

from bridge import statecodec
from bridge.errors import VersionConflict
from bridge.layout import Layout
from bridge.zk import Create, Delete, SetData, ZooKeeper
from bridge.zk import Op as ZkOp

__all__ = ["Positions", "read_positions"]


class Positions:
    def __init__(self, zk: ZooKeeper, layout: Layout) -> None:
        self.zk = zk
        self.root = layout.positions
        self.topic_ids = layout.topic_ids
        self.rereads = layout.rereads
        self.excluded = layout.excluded
        self._versions: dict[str, int] = {}

    def forget(self) -> None:
        """At a term's start: versions are read again before a write."""
        self._versions.clear()

    async def read(self, peer: str) -> dict[int, int]:
        """Next offset to apply per partition of ``peer``'s topic (empty: from the start)."""
        node = await self.zk.get(f"{self.root}/{peer}")
        if node is None:
            self._versions.pop(peer, None)
            return {}
        self._versions[peer] = node.stat.version
        return statecodec.decode_positions(node.data) if node.data else {}

    def op(self, peer: str, positions: dict[int, int]) -> ZkOp:
        """The write of ``peer``'s position, to commit with the batch it describes."""
        path = f"{self.root}/{peer}"
        data = statecodec.encode_positions(positions)
        version = self._versions.get(peer)
        return Create(path, data) if version is None else SetData(path, data, version)

    def written(self, peer: str) -> None:
        self._versions[peer] = self._versions.get(peer, -1) + 1

    async def write(self, peer: str, positions: dict[int, int]) -> None:
        try:
            await self.zk.multi([self.op(peer, positions)])
        except VersionConflict:
            await self.read(peer)
            raise
        self.written(peer)

    async def read_topic_id(self, region: str) -> str | None:
        """The id of ``region``'s topic when positions were last taken from it (None: unknown)."""
        node = await self.zk.get(f"{self.topic_ids}/{region}")
        if node is None or not node.data:
            return None
        return node.data.decode("ascii", errors="replace")

    async def write_topic_id(self, region: str, topic_id: str) -> None:
        # Its own znode, not a field of the position record: a release that
        # does not know topic ids still reads the positions it wrote.
        path = f"{self.topic_ids}/{region}"
        await self.zk.multi([await self._put(path, topic_id.encode("ascii"))])

    async def read_rereads(self, peer: str) -> dict[int, tuple[int, tuple[str, ...]]]:
        """``peer``'s filter of a topic read again (empty: none)."""
        node = await self.zk.get(f"{self.rereads}/{peer}")
        return statecodec.decode_rereads(node.data) if node is not None else {}

    async def rereads_op(self, peer: str, rereads: statecodec.Rereads) -> ZkOp | None:
        """The write of ``peer``'s filter of a topic read again (empty: its removal), to
        commit with the rewound position it applies to; None: nothing to write."""
        path = f"{self.rereads}/{peer}"
        if rereads:
            return await self._put(path, statecodec.encode_rereads(rereads))
        return Delete(path, -1) if await self.zk.exists(path) is not None else None

    async def write_rereads(self, peer: str, rereads: statecodec.Rereads) -> None:
        op = await self.rereads_op(peer, rereads)
        if op is not None:
            await self.zk.multi([op])

    async def read_excluded(self) -> tuple[str, ...] | None:
        """The exclude list the peers' topics were last read under (None: not known)."""
        node = await self.zk.get(self.excluded)
        return statecodec.decode_paths(node.data) if node is not None else None

    async def excluded_op(self, exclude: tuple[str, ...]) -> ZkOp:
        """The write of the exclude list the peers' topics are read under from now on."""
        return await self._put(self.excluded, statecodec.encode_paths(exclude))

    async def _put(self, path: str, data: bytes) -> ZkOp:
        """Write ``data`` at ``path``, a znode only the leader writes: made if absent."""
        if await self.zk.exists(path) is None:
            return Create(path, data)
        return SetData(path, data)


async def read_positions(zk: ZooKeeper, layout: Layout, peer: str) -> dict[int, int]:
    """Next offset to apply per partition of ``peer``'s topic (empty: from the start)."""
    return await Positions(zk, layout).read(peer)
