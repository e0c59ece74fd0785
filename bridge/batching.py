"""Pure rules of the ordered log: batch order, size bounds, and reassembly at receivers.

The ordering invariant, which the outbound and inbound pipelines enforce
together: one origin's changes to a subtree travel as a sequence of *closed*
batches (a batch holds every change to the subtree up to the highest zxid in
it), published in capture order and applied in that order by every receiver,
each batch as one ZooKeeper ``multi``. A reader in another region therefore
only sees states the origin had at batch boundaries. This module holds the
parts of that which need no server: how events are ordered inside a batch, how
an oversized batch is split without reordering, and how a receiver rebuilds a
batch from the records of its topic before anything of it is applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bridge.model import Event, Op

# ZooKeeper refuses requests above jute.maxbuffer (1 MiB by default); a batch's
# multi carries its payloads plus metadata, so payloads stay well under it.
MAX_BATCH_BYTES = 700_000
MAX_BATCH_EVENTS = 1000
# Groups of a receiver's backlog in flight at once (``bridge.chain``).
CHAIN_GROUPS = 4


def depth(rel: str) -> int:
    return rel.count("/")


def order_key(op: Op, rel: str, mzxid: int) -> tuple[int, int, int, str]:
    """Sort key inside a batch: writes in zxid order, then deletes deepest first.

    A delete leaves no zxid to read back, but it never needs one: a batch is
    applied as one ``multi``, so order inside it only decides the split of an
    oversized batch, where children go before their parents.
    """
    if op is Op.DELETE:
        return (1, 0, -depth(rel), rel)
    return (0, mzxid, depth(rel), rel)


def split(sizes: Sequence[int], *, max_bytes: int = MAX_BATCH_BYTES,
          max_events: int = MAX_BATCH_EVENTS) -> list[range]:
    """Cut a sequence into contiguous chunks within the bounds, order kept.

    An item larger than ``max_bytes`` (a znode near the data limit) travels
    alone rather than being refused here; the size limits proper are the
    codec's.
    """
    chunks: list[range] = []
    start = total = 0
    for i, size in enumerate(sizes):
        if i > start and (total + size > max_bytes or i - start >= max_events):
            chunks.append(range(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        chunks.append(range(start, len(sizes)))
    return chunks


def size_estimate(event: Event) -> int:
    """About an event's encoded size: its bytes, its path twice (key, field), the envelope."""
    return len(event.data or b"") + 2 * len(event.path) + 40 * len(event.vc.entries) + 160


def stamp(events: Sequence[Event], batch_id: int) -> list[Event]:
    """Mark ``events`` as one batch, in the given order."""
    n = len(events)
    return [e.in_batch(batch_id, i, n) for i, e in enumerate(events)]


@dataclass(frozen=True, slots=True)
class Complete:
    """A batch whose every record has arrived (``rejected`` of them were unusable)."""

    events: tuple[Event, ...]
    end_offset: int  # the offset after its last record
    rejected: int = 0
    first_offset: int = -1  # of its first record; -1: the record before end_offset
    # A null-value record's collected tombstone (never part of a batch): applied
    # only over a live version it wins against (``bridge.tombstones``).
    null: bool = False


class Assembler:
    """Rebuilds one stream's batches from its records, in offset order.

    Records of a batch are contiguous on the topic (one partition, one
    publisher). A batch is released only when all of it has arrived; a
    prefix cut short by a crash of the origin is dropped (the origin
    republishes the whole batch from its outbox), and counted. A rejected
    record fills its slot so that a bad record never stalls the stream.

    Compaction is the exception: the cleaner removes records whose key a
    later record rewrites, so an old batch can lack records for good. The
    offsets show it (a jump where records were removed). A batch with such a
    gap is released with what is left once the stream moves past it: what is
    missing was superseded by records that follow, so the end state is the
    same (only the intermediate states of compacted history are lost, which
    compaction does by design).

    ``resume_offset`` is where a restart may safely begin: never inside a
    batch that is still open.
    """

    def __init__(self, start_offset: int = 0) -> None:
        self._open: list[Event] = []
        self._id: int | None = None
        self._size = 0
        self._filled = 0  # slots taken, rejected records included
        self._rejected = 0
        self._last_index = -1
        self._gappy = False  # records of the open batch were compacted away
        self._open_from = start_offset
        self._next = start_offset
        self.dropped = 0  # records of incomplete batches dropped

    @property
    def resume_offset(self) -> int:
        return self._open_from if self._filled else self._next

    def skip(self, offset: int) -> None:
        """A record that is not part of any batch (a heartbeat)."""
        self._note_gap(offset)
        self._next = offset + 1

    def _note_gap(self, offset: int) -> bool:
        gap = offset > self._next
        if gap and self._filled:
            self._gappy = True
        return gap

    def feed(self, offset: int, event: Event | None, *, null: bool = False) -> list[Complete]:
        """Take the record at ``offset`` (``None``: rejected); return what it completes.

        At most two batches: an open one the record shows to be over (with a
        compaction gap) and the record's own. ``null``: the record is a
        null-value record carrying ``event`` (never part of a batch).
        """
        if null and event is not None:
            self._note_gap(offset)
            self._next = offset + 1
            return [*self._close(offset), Complete((event,), offset + 1, null=True)]
        gap = self._note_gap(offset)
        self._next = offset + 1
        if event is None:
            if not self._filled:
                return [Complete((), offset + 1, rejected=1)]
            self._filled += 1
            self._rejected += 1
            return self._release_if_full(offset)
        if (self._filled and event.batch is not None and event.batch == self._id
                and event.batch_index is not None and event.batch_index > self._last_index
                and (gap or self._gappy or event.batch_index == self._filled)):
            self._take(event)
            return self._release_if_full(offset)
        out = self._close(offset)
        if event.batch is None:
            return [*out, Complete((event,), offset + 1)]
        index = event.batch_index or 0
        if index > 0 and not gap:
            # A stray piece of a batch whose start we never saw (not compacted).
            self.dropped += 1
            return [*out, Complete((), offset + 1)]
        self._id, self._size, self._open_from = event.batch, event.batch_size or 1, offset
        self._gappy = index > 0
        self._take(event)
        return [*out, *self._release_if_full(offset)]

    def _take(self, event: Event) -> None:
        self._open.append(event)
        self._filled += 1
        self._last_index = event.batch_index or 0

    def _close(self, offset: int) -> list[Complete]:
        """The open batch will get no more records: release it if compacted, else drop it."""
        if not self._filled:
            return []
        if self._gappy:
            done = Complete(tuple(self._open), offset, self._rejected, self._open_from)
            self._reset()
            return [done]
        self.dropped += self._filled
        self._reset()
        return []

    def _reset(self) -> None:
        self._open, self._id, self._size = [], None, 0
        self._filled = self._rejected = 0
        self._last_index = -1
        self._gappy = False

    def _release_if_full(self, offset: int) -> list[Complete]:
        if self._filled < self._size and not (
                self._gappy and self._last_index >= self._size - 1):
            return []
        done = Complete(tuple(self._open), offset + 1, self._rejected, self._open_from)
        self._reset()
        return [done]
