"""The outbox's bound: what a long Kafka outage may take of the local ensemble's memory.

Every outbox entry lives in ZooKeeper's heap until Kafka acknowledged it. A
subtree whose unpublished entries reach ``outbox_max_mb`` *overflows*: from
its next capture on, changes update only the bridge's metadata (their clocks,
so conflict resolution still sees them) and no entry is written. A marker
znode, written before the first capture without an entry, carries that
across restarts.

Once publishing has taken the outbox back below half the bound, the marker
becomes a re-announce marker (``bridge.reannounce``) and every path whose
metadata changed since the marker was created is published again, as
``zkbridge resync`` does for all: every change the overflow kept from the
outbox reaches the peers with the clock it was captured with. Until that
is done, peers may see the changes of this region out of their capture
order (each one resolves by its clock as usual), and this region's
heartbeats carry no ``applied`` report, so no tombstone is taken as stable
on its account.

The bytes are counted as entries are written and acknowledged; at a term's
start, what earlier terms left is measured with one ``exists`` per entry.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import structlog

from bridge import failpoints
from bridge.errors import MissingNode, VersionConflict
from bridge.zk import Delete

if TYPE_CHECKING:
    from bridge.engine import Bridge

log = structlog.get_logger("bridge.overflow")

# An entry's znode, its name and its place in the server's maps take about
# this much of ZooKeeper's heap beyond the entry's data: 50,000 outbox-like
# entries measured 376 (1 B of data) and 427 bytes (300 B) each, after a full
# GC, on the harness's ZooKeeper 3.8 (README, "Kafka unreachable").
ENTRY_OVERHEAD = 400
OVERFLOWED = "outbox overflowed"  # the cause of the re-announce that ends an overflow


def entry_cost(size: int) -> int:
    """What an outbox entry of ``size`` bytes is counted as against ``outbox_max_mb``."""
    return size + ENTRY_OVERHEAD


class Overflow:
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        # Estimated bytes of each subtree's outbox (entry_cost of every entry).
        self.bytes: dict[str, int] = dict.fromkeys(bridge.stores, 0)
        # Subtrees whose overflow is ending or ended: its re-announce is started once.
        self._ending: set[str] = set()

    def marker(self, name: str) -> str:
        return self.bridge.stores[name].layout.overflow_marker

    def bound(self) -> int:
        return int(self.bridge.settings.outbox_max_mb * (1 << 20))

    def active(self, name: str) -> bool:
        """Whether ``name``'s captures skip the outbox, or their re-announce is not done
        (what `status` and the gauge show; a re-announce after topic loss is no overflow)."""
        return (self.bridge.stores[name].overflow is not None
                or OVERFLOWED in (self.bridge.reannounce.cause(name) or ""))

    def unannounced(self, name: str) -> bool:
        """Whether changes of ``name`` stamped earlier may still be missing from its topic:
        an overflow, or any re-announce under way (after one, or after topic loss)."""
        return (self.bridge.stores[name].overflow is not None
                or self.bridge.reannounce.busy(name))

    def reset(self) -> None:
        """At a term's end: the next term reads the marker and measures the outbox again."""
        for name, store in self.bridge.stores.items():
            self.bytes[name] = 0
            store.overflow = None
            store.overflow_marked = False
        self._ending.clear()

    async def start_term(self, name: str, pending: bool) -> None:
        """Read ``name``'s marker and measure what earlier terms left in its outbox."""
        b = self.bridge
        store = b.stores[name]
        marker = self.marker(name)
        if await b.retry("read overflow marker", lambda: b.zk.exists(marker)) is not None:
            store.overflow, store.overflow_marked = marker, True
            log.warning("outbox_overflowed", subtree=name, reason="left by an earlier term",
                        hint="changes update only the metadata until Kafka has taken the outbox "
                             "below half of outbox_max_mb; then what changed is published")
        if pending:
            # One `exists` per entry, pipelined: 100,000 took 6.4 s here, so the
            # 380,000 small entries the default bound allows take about 25 s,
            # and `status` says what the start is on meanwhile.
            began, done = time.monotonic(), [0]

            def measured(entries: int) -> None:
                done[0] = entries

            entries, size = await b.start_up.during(
                f"measure:{name}",
                lambda: f"measuring the outbox of {name}: {done[0]:,} entries so far",
                b.retry("measure outbox", lambda: store.outbox.size(measured)))
            self.bytes[name] = size + entries * ENTRY_OVERHEAD
            log.info("outbox_measured", subtree=name, entries=entries,
                     megabytes=round(self.bytes[name] / (1 << 20), 1),
                     bound_megabytes=b.settings.outbox_max_mb,
                     seconds=round(time.monotonic() - began, 2))
        self._check(name)

    def written(self, name: str, size: int) -> None:
        """An outbox entry of ``size`` bytes was written."""
        self.bytes[name] += entry_cost(size)
        self._check(name)

    def acked(self, name: str, size: int) -> None:
        """Kafka acknowledged an outbox entry of ``size`` bytes (its delete follows)."""
        self.bytes[name] = max(0, self.bytes[name] - entry_cost(size))
        self._check(name)

    def _check(self, name: str) -> None:
        store = self.bridge.stores[name]
        if store.overflow is None:
            if self.bytes[name] >= self.bound():
                self._enter(name)
        elif self.bytes[name] < self.bound() // 2 and name not in self._ending:
            self._ending.add(name)
            self.bridge.reannounce.start(name, before=lambda: self._leave(name),
                                         cause=OVERFLOWED)

    def _enter(self, name: str) -> None:
        # The next capture writes the marker first (``Capturing.capture``).
        self.bridge.stores[name].overflow = self.marker(name)
        self._ending.discard(name)  # its end starts a re-announce again
        megabytes = round(self.bytes[name] / (1 << 20), 1)
        self.bridge.stats[f"outbox_overflows:{name}"] += 1
        # `status` says so (OVERFLOWED) for as long as ``active``: no incident,
        # which would fade after ten minutes of a longer outage.
        log.error("outbox_overflowed", subtree=name, megabytes=megabytes,
                  bound_megabytes=self.bridge.settings.outbox_max_mb,
                  hint="Kafka has been slow or away too long: further changes update only the "
                       "metadata; once Kafka takes the outbox below half of outbox_max_mb "
                       "what changed meanwhile is published again. Check Kafka; raise "
                       "outbox_max_mb only if the ZooKeeper servers' heap allows")

    async def _leave(self, name: str) -> int | None:
        """The re-announce's first step: captures use the outbox again.

        Under the subtree's lock, so every capture without an entry is in the
        metadata that the re-announce reads next. One ``multi`` turns the
        overflow marker into a re-announce marker asking for the metadata
        changed since the overflow's marker was created (its ``czxid``), or
        since an earlier re-announce's ask if that is older: a crash before
        leaves the overflow, and the next term ends it again (idempotent).
        Returns what the re-announce marker asks for (None: no capture was
        kept out of the outbox and no re-announce is unfinished).
        """
        b = self.bridge
        store = b.stores[name]
        reannounce = b.reannounce
        async with b.locks[name]:
            failpoints.hit(failpoints.OVERFLOW_ENDING)
            since = prior = await reannounce.read_since(name)
            if store.overflow_marked:
                marker = self.marker(name)
                stat = await b.retry("read overflow marker", lambda: b.zk.exists(marker))
                since = stat.czxid if stat is not None else 0
                if prior is not None:
                    since = min(since, prior)
                ops = [reannounce.marker_op(name, prior, since), Delete(marker)]
                await b.retry("mark re-announce",
                              lambda: b.zk.ensure_path(reannounce.marker(name).rsplit("/", 1)[0]))
                # Fenced: a deposed leader must not end the next one's overflow.
                # Refused: a retry after a lost answer, which committed.
                with contextlib.suppress(VersionConflict, MissingNode):
                    await b.retry("end overflow", lambda: b.zk.multi(ops))
            store.overflow, store.overflow_marked = None, False
        log.warning("outbox_overflow_ended", subtree=name,
                    megabytes=round(self.bytes[name] / (1 << 20), 1),
                    action="publishing again what changed during the overflow"
                    if since is not None else "nothing was kept out of the outbox")
        return since
