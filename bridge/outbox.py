"""A subtree's outbox: captured batches kept in ZooKeeper until Kafka acknowledged them.

A capture's ``multi`` writes its batch's metadata and one outbox entry
together, so a crash between the capture and the publish loses nothing: the
next term publishes what the outbox still holds, in capture order.

The outbox is sharded: entries are sequential znodes inside *buckets*
(``q-<index>``) of at most ``OUTBOX_BUCKET`` entries, so no listing the
bridge makes comes near ZooKeeper's 1 MB reply limit however long Kafka is
away (one flat directory held ~60,000 entries). Each term opens a bucket
after the last one; entries of the previous release (``b-...`` directly
under the outbox) are older than every bucket and go first.

Reading the outbox back is streamed (``Outbound.feed``): a day of Kafka
outage is millions of entries, more than a process should hold. An entry's
place in capture order is its *key*: (bucket index, name), the previous
release's flat entries being bucket -1.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence

from bridge import statecodec
from bridge.errors import VersionConflict
from bridge.layout import Layout, parent
from bridge.zk import Create, ZooKeeper, gather_limited
from bridge.zk import Op as ZkOp

__all__ = ["OUTBOX_BUCKET", "Outbox", "outbox_depth", "outbox_key"]

# Entries per outbox bucket: a listing of about 160 KB. The environment
# variable exists for tests, which need several buckets from a few writes.
OUTBOX_BUCKET = int(os.environ.get("ZKBRIDGE_OUTBOX_BUCKET") or 10_000)
READ_GROUP = 500  # entries read per group, up to 64 reads in flight
SIZE_GROUP = 5000  # entries stat'ed per group when measuring (``size``)


class Outbox:
    def __init__(self, zk: ZooKeeper, layout: Layout) -> None:
        self.zk = zk
        self.outbox = layout.outbox
        self._bucket = ""  # the bucket new entries go to (see _open_bucket)
        self._bucket_known = False
        self._bucket_exists = False
        # A multi that writes an entry lost its answer: it may have committed,
        # leaving an entry nobody queued (the retry then finds nothing to
        # capture). The caller hands the outbox to the feeder.
        self.unsure = False

    def reset(self) -> None:
        """At a term's start: the bucket is chosen again (``open_after_pending``)."""
        self._bucket = ""

    def answer_lost(self, *, held_entry: bool) -> None:
        """A ``multi`` that may have created the bucket (and an entry) lost its answer."""
        self._bucket_known = False
        self.unsure = self.unsure or held_entry

    async def _open_bucket(self) -> None:
        last = max((index for index, _ in await self.dirs()), default=-1)
        self._bucket = f"{self.outbox}/q-{last + 1:010d}"
        self._bucket_known = False

    async def entry_ops(self, ops: list[ZkOp], data: bytes) -> None:
        """Append the creation of an entry holding ``data`` (and of its bucket, if new)."""
        if not self._bucket:
            await self._open_bucket()
        if not self._bucket_known:
            self._bucket_exists = await self.zk.exists(self._bucket) is not None
            self._bucket_known = True
        if not self._bucket_exists:
            ops.append(Create(self._bucket, b""))
        ops.append(Create(self._bucket + "/b-", data, sequential=True))

    def written(self, created: str) -> None:
        """The entry ``created`` committed: the next goes to a new bucket once this one is full."""
        self._bucket_exists = True
        if int(created.rsplit("-", 1)[-1]) + 1 >= OUTBOX_BUCKET:
            index = int(self._bucket.rsplit("-", 1)[-1]) + 1
            self._bucket = f"{self.outbox}/q-{index:010d}"
            self._bucket_exists = False

    def key(self, path: str) -> tuple[int, str]:
        return outbox_key(self.outbox, path)

    async def dirs(self) -> list[tuple[int, str]]:
        """(bucket index, directory) in capture order; the flat entries' directory is -1."""
        names = await self.zk.children(self.outbox) or []
        out = [(int(n[2:]), f"{self.outbox}/{n}") for n in names
               if n.startswith("q-") and n[2:].isdigit()]
        if any(not n.startswith("q-") for n in names):
            out.append((-1, self.outbox))
        return sorted(out)

    async def depth(self) -> int:
        """Entries in the outbox (each bucket's count from its stat, not its listing)."""
        return await _depth(self.zk, self.outbox)

    async def names(self, index: int, directory: str) -> list[str]:
        """The entries of one bucket (``index`` -1: the flat ones), in capture order."""
        names = await self.zk.children(directory) or []
        return sorted(n for n in names if index >= 0 or not n.startswith("q-"))

    async def size(self, progress: Callable[[int], None] = lambda entries: None
                   ) -> tuple[int, int]:
        """Entries in the outbox and the bytes of their data (one ``exists`` each, pipelined).

        ``progress`` is told the entries measured so far after each group.
        """
        entries = size = 0
        for index, directory in await self.dirs():
            names = await self.names(index, directory)
            for i in range(0, len(names), SIZE_GROUP):
                stats = await self.zk.stats_many(
                    [f"{directory}/{n}" for n in names[i : i + SIZE_GROUP]])
                for stat in stats:
                    if stat is not None:
                        entries += 1
                        size += stat.data_length
                progress(entries)
        return entries, size

    async def read(self, paths: Sequence[str]) -> list[tuple[str, list[bytes]]]:
        """The payloads of entries (those still there), in the order given."""
        out = []
        for i in range(0, len(paths), READ_GROUP):
            part = paths[i : i + READ_GROUP]
            nodes = await gather_limited([self.zk.get(p) for p in part], 64)
            out += [(p, statecodec.decode_outbox(n.data))
                    for p, n in zip(part, nodes, strict=True) if n is not None]
        return out

    async def open_after_pending(self) -> tuple[list[bytes], bool]:
        """Start this term's bucket after every one left; return the newest batch's payloads,
        and whether earlier terms left any entry at all.

        Batches are stamped in capture order across terms, so the newest
        batch entry holds the highest batch id an earlier term left
        unpublished: the clock observes it so that new batch ids sort after
        the pending ones. Entries of null records (stamped with the old
        deletes they carry) are looked past, a bounded number of them.
        """
        newest: list[bytes] = []
        looked = 0
        for index, directory in reversed(await self.dirs()):
            for name in reversed(await self.names(index, directory)):
                got = await self.read([f"{directory}/{name}"])
                payloads = got[0][1] if got else []
                newest += payloads
                looked += 1
                if looked >= 100 or any(not statecodec.is_null_entry(p) for p in payloads):
                    await self._open_bucket()  # this term's entries go after all of these
                    return newest, True
        await self._open_bucket()
        return newest, looked > 0

    async def drop_empty_buckets(self, deleted: Iterable[str]) -> None:
        """Remove the buckets ``deleted`` emptied, except the one being filled."""
        buckets = {parent(p) for p in deleted} - {self.outbox, self._bucket}
        for bucket in sorted(buckets):
            stat = await self.zk.exists(bucket)
            if stat is not None and stat.num_children == 0:
                with contextlib.suppress(VersionConflict):  # refilled meanwhile: not ours
                    await self.zk.delete(bucket, stat.version)


async def outbox_depth(zk: ZooKeeper, layout: Layout) -> int:
    """Outbox entries (batches) recorded but not yet acknowledged by Kafka."""
    return await _depth(zk, layout.outbox)


async def _depth(zk: ZooKeeper, outbox: str) -> int:
    names = await zk.children(outbox) or []
    depth = sum(1 for n in names if not n.startswith("q-"))
    stats = await gather_limited(
        [zk.exists(f"{outbox}/{n}") for n in names if n.startswith("q-")], 32)
    return depth + sum(int(st.num_children) for st in stats if st is not None)


def outbox_key(outbox: str, path: str) -> tuple[int, str]:
    """An entry's place in capture order: (bucket index, name); flat entries -1."""
    rel = path[len(outbox) + 1 :]
    bucket, _, name = rel.rpartition("/")
    return (int(bucket[2:]), name) if bucket else (-1, name)
