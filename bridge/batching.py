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
from dataclasses import dataclass, replace

from bridge.model import Event, Op

# ZooKeeper refuses requests above jute.maxbuffer (1 MiB by default); a batch's
# multi carries its payloads plus metadata, so payloads stay well under it.
MAX_BATCH_BYTES = 700_000
MAX_BATCH_EVENTS = 1000


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
    return [replace(e, batch=batch_id, batch_index=i, batch_size=n) for i, e in enumerate(events)]


@dataclass(frozen=True, slots=True)
class Complete:
    """A batch whose every record has arrived (``rejected`` of them were unusable)."""

    events: tuple[Event, ...]
    end_offset: int  # the offset after its last record
    rejected: int = 0


class Assembler:
    """Rebuilds one stream's batches from its records, in offset order.

    Records of a batch are contiguous on the topic (one partition, one
    publisher). A batch is released only when all of it has arrived; a
    prefix cut short by a crash of the origin is dropped (the origin
    republishes the whole batch from its outbox), and counted. A rejected
    record fills its slot so that a bad record never stalls the stream.
    ``resume_offset`` is where a restart may safely begin: never inside a
    batch that is still open.
    """

    def __init__(self, start_offset: int = 0) -> None:
        self._open: list[Event | None] = []
        self._id: int | None = None
        self._size = 0
        self._open_from = start_offset
        self._next = start_offset
        self.dropped = 0  # records of incomplete batches dropped

    @property
    def resume_offset(self) -> int:
        return self._open_from if self._open else self._next

    def _abandon(self) -> None:
        if self._open:
            self.dropped += len(self._open)
        self._open, self._id, self._size = [], None, 0

    def skip(self, offset: int) -> None:
        """A record that is not part of any batch (a heartbeat)."""
        self._next = offset + 1

    def feed(self, offset: int, event: Event | None) -> Complete | None:
        """Take the record at ``offset`` (``None``: rejected); return a batch once complete."""
        self._next = offset + 1
        if event is None:
            if not self._open:
                return Complete((), offset + 1, rejected=1)
            self._open.append(None)
            return self._release_if_full(offset)
        if event.batch is None:
            self._abandon()
            return Complete((event,), offset + 1)
        if event.batch_index == 0:
            self._abandon()
            self._id, self._size, self._open_from = event.batch, event.batch_size, offset
            self._open = [event]
            return self._release_if_full(offset)
        if self._open and event.batch == self._id and event.batch_index == len(self._open):
            self._open.append(event)
            return self._release_if_full(offset)
        # A stray piece of a batch whose start we never saw.
        self._abandon()
        self.dropped += 1
        return Complete((), offset + 1)

    def _release_if_full(self, offset: int) -> Complete | None:
        if len(self._open) < self._size:
            return None
        events = tuple(e for e in self._open if e is not None)
        rejected = len(self._open) - len(events)
        self._open, self._id, self._size = [], None, 0
        return Complete(events, offset + 1, rejected)
