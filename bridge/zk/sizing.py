"""How many reads one ``multiRead`` carries: as many as the answers seen so far allow.

ZooKeeper builds a reply whole in its heap before it sends it (serialized
into a buffer that doubles as it grows, then copied). One ``multiRead`` of 40
znodes of 900 KB (a 36 MB reply) ran a server with a 256 MB heap out of
memory, and it exited, where the same 40 reads sent one by one, all in flight
at once, did not; so did three requests of 8 to 16 such znodes in flight. So
a request carries reads whose estimated answers add up to ``REPLY_BUDGET``:
each kind of read is estimated at its largest answer seen, starting from
ZooKeeper's 1 MB limit (two reads per request), halving with each reply of
smaller answers. A scan of small znodes is at full size (``READS_MAX``) after
about ten replies; one large znode makes the next requests small at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from bridge.zk.values import Node

REPLY_BUDGET = 2 << 20  # bytes of answers a request is sized for
# The environment variable exists for tests of reads that take several replies.
READS_MAX = int(os.environ.get("ZKBRIDGE_READ_CHUNK") or 500)
LARGEST_START = 1 << 20  # ZooKeeper's default jute.maxbuffer: the largest znode it takes
FLOOR = 1024


def answer_size(answer: Any) -> int:
    """Bytes one answer of a ``multiRead`` carries: a znode's data, or a listing's names."""
    if isinstance(answer, Node):
        return len(answer.data)
    if isinstance(answer, list):
        return sum(len(name) + 4 for name in answer)
    return 0


class ReplySizer:
    """Per kind of read ("data", "children"), the estimate of the largest answer; one
    per session. Only answers of a kind tell of it: a scan's small listings say
    nothing of the data below them."""

    def __init__(self) -> None:
        self.largest = {"data": LARGEST_START, "children": LARGEST_START}

    def take(self, ops: Sequence[tuple[str, str]], start: int) -> int:
        """How many of ``ops[start:]`` the next request carries (at least one)."""
        total = count = 0
        for kind, _path in ops[start:start + READS_MAX]:
            total += self.largest[kind]
            if count and total > REPLY_BUDGET:
                break
            count += 1
        return count

    def saw(self, ops: Sequence[tuple[str, str]], answers: Iterable[Any]) -> None:
        """A reply arrived: per kind, its largest answer or half the estimate, the larger."""
        biggest: dict[str, int] = {}
        for (kind, _path), answer in zip(ops, answers, strict=True):
            # An absent or unreadable znode counts as small: a receiver reads the
            # paths it is about to create, absent all of them.
            biggest[kind] = max(biggest.get(kind, 0), answer_size(answer))
        for kind, size in biggest.items():
            self.largest[kind] = max(size, self.largest[kind] // 2, FLOOR)
