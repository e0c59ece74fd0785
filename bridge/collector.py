"""The leader's tombstone collector: a round per subtree every little while, under its lock.

What may be collected is ``bridge.tombstones``' rule; this module supplies
its inputs from the running pipelines (the stable prefixes, the paths
pending in either pipeline) and runs the rounds.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import structlog

from bridge import tombstones
from bridge.clock import hlc_from_ms

if TYPE_CHECKING:
    from bridge.engine import Bridge

log = structlog.get_logger("bridge.collector")

MAX_PER_ROUND = 5000


def interval(grace: float) -> float:
    """Seconds between rounds: a fraction of the grace, between 0.5 s and a minute."""
    return min(60.0, max(0.5, grace / 8))


async def run(bridge: Bridge) -> None:
    while True:
        await asyncio.sleep(interval(bridge.settings.tombstone_grace))
        for name in bridge.stores:
            await collect_once(bridge, name)


def busy_paths(bridge: Bridge, name: str) -> set[str]:
    """Paths with a local change or an event pending in either pipeline."""
    busy = set(bridge.outbound.dirty[name])
    for unit in list(bridge.outbound.queues[name]._queue):  # type: ignore[attr-defined]
        busy.update(k.decode("utf-8", "replace") for k, _ in unit.records)
    for ready in list(bridge.inbound.queues[name]._queue):  # type: ignore[attr-defined]
        busy.update(e.path for e in ready.batch.events)
    return busy


async def collect_once(bridge: Bridge, name: str) -> int:
    """One collection round for subtree ``name``; returns tombstones collected."""
    store = bridge.stores[name]
    stab = bridge.stability[name]
    if bridge.outbound.draining[name] or bridge.overflow.unannounced(name):
        # Entries still in the outbox are not in the queue, where busy_paths
        # looks; stability alone would cover them, but wait for the feeder.
        # Changes an overflow kept from the outbox are announced by its re-announce.
        return 0
    bridge.streams.applied_report(name)  # count the heartbeats applied past so far
    cutoff_ms = int(time.time() * 1000) - int(1000 * bridge.settings.tombstone_grace)
    async with bridge.locks[name]:
        chosen = tombstones.candidates(
            store.metas, stable=stab.stable, before_ts=hlc_from_ms(cutoff_ms),
            busy=busy_paths(bridge, name))[:MAX_PER_ROUND]
        if not chosen:
            return 0
        before = store.gc_collected
        done = await bridge.retry(f"collect tombstones {name}", lambda: store.collect(chosen))
        collected = store.gc_collected - before
        # Queued under the lock, as captures are: the queue keeps the outbox's order.
        bridge.outbound.recheck_outbox(store)
        for entry in done.nulls:
            if entry.outbox_path is not None:  # always: a collection writes its entries
                bridge.outbound.enqueue_nulls(name, entry.outbox_path, entry.events)
    if collected:
        bridge.stats[f"tombstones_collected:{name}"] += collected
        log.info("tombstones_collected", subtree=name, collected=collected,
                 metadata_removed=len(done.removed), floor=store.gc_floor,
                 nulls=sum(len(e.events) for e in done.nulls))
    return collected
