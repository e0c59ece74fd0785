"""Re-announce a region's full replicated state (recovery after topic loss).

Every metadata record, tombstones included, is published on the region's own
topic with the clock, timestamp and writer it holds, and the current bytes.
Receivers treat these like any event: equal or dominated clocks are skipped,
so a resync is idempotent and cannot move anything backwards.

Two callers share ``state_events``: ``zkbridge resync`` (an operator, for
losses nobody can detect) and the running bridge itself when it finds that
its own topic lost records it had published (it queues them behind its
publisher, so they never land inside one of its batches).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable

from bridge import codec, stateaccess
from bridge.config import Settings
from bridge.kafka import Kafka, topic_name
from bridge.layout import Layout
from bridge.model import Event, NodeMeta, Op, content_hash
from bridge.progress import QUIET, Progress
from bridge.verify import read_meta
from bridge.zk import ZooKeeper, gather_limited

BATCH = 500
_INC = re.compile(r"[0-9a-f]{1,64}")


def _ignore(_n: int) -> None:
    return None


async def read_incarnation(zk: ZooKeeper, state_path: str) -> str | None:
    """The ensemble's incarnation marker (stamped on what it publishes), if it has one."""
    node = await zk.get(f"{state_path}/incarnation")
    text = node.data.decode("ascii", "replace") if node is not None else ""
    return text if _INC.fullmatch(text) else None


async def state_events(
    zk: ZooKeeper, layout: Layout, region: str, metas: dict[str, NodeMeta],
    counts: dict[str, int], *, inc: str | None = None,
    advance: Callable[[int], None] = _ignore,
) -> AsyncIterator[list[Event]]:
    """The subtree's whole state as events, BATCH paths at a time, each a batch of one.

    A path whose znode no longer matches its metadata was changed locally and
    is not captured yet: the bridge announces it itself (counted as
    ``uncaptured``).
    """
    rels = sorted(metas)
    for i in range(0, len(rels), BATCH):
        chunk = rels[i : i + BATCH]
        nodes = await gather_limited([zk.get(layout.znode(r)) for r in chunk], 64)
        events = []
        for rel, node in zip(chunk, nodes, strict=True):
            meta = metas[rel]
            if not meta.vc.entries:
                continue  # a bare placeholder parent: nothing was ever written
            data = None if meta.deleted else (node.data if node else None)
            if content_hash(data) != meta.data_hash:
                counts["uncaptured"] = counts.get("uncaptured", 0) + 1
                continue
            events.append(Event(origin=region, subtree=layout.name, path=rel,
                                op=Op.DELETE if meta.deleted else Op.PUT, vc=meta.vc,
                                ts=meta.ts, writer=meta.writer or region, data=data, inc=inc))
        yield events
        advance(len(chunk))


async def resync(settings: Settings, progress: Progress = QUIET) -> dict[str, int]:
    """Publish everything; returns counts (published, skipped as not yet captured)."""
    zk = ZooKeeper(settings.zookeeper, read_only=True)
    kafka = Kafka(settings.kafka, client_id=f"zkbridge-{settings.region}-resync")
    counts = {"published": 0, "uncaptured": 0}
    await stateaccess.start_checked(zk, settings)
    try:
        topics = [topic_name(settings.kafka.topic_prefix, st.name, settings.region)
                  for st in settings.subtrees]
        await kafka.ensure_topics(topics)
        await kafka.start_producer()
        inc = await read_incarnation(zk, settings.state_path)
        for st, topic in zip(settings.subtrees, topics, strict=True):
            layout = Layout(settings.state_path, st.name, st.path)
            reading = progress.task(f"{st.name}: reading metadata")
            metas = await read_meta(zk, layout, reading.advance)
            reading.done()
            sending = progress.task(f"{st.name}: re-announcing on {topic}", len(metas))
            async for events in state_events(zk, layout, settings.region, metas, counts,
                                             inc=inc, advance=sending.advance):
                await kafka.send_all([(topic, e.key, codec.encode(e)) for e in events])
                counts["published"] += len(events)
        return counts
    finally:
        await kafka.stop()
        await zk.stop()
