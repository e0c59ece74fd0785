"""Re-announce a region's full replicated state (recovery after topic loss).

Every metadata record, tombstones included, is published on the region's own
topic with the clock, timestamp and writer it holds, and the current bytes.
Receivers treat these like any event: equal or dominated clocks are skipped,
so a resync is idempotent and cannot move anything backwards.
"""

from __future__ import annotations

from bridge import codec
from bridge.config import Settings
from bridge.kafka import Kafka, topic_name
from bridge.layout import Layout
from bridge.model import Event, Op, content_hash
from bridge.progress import QUIET, Progress
from bridge.verify import read_meta
from bridge.zk import ZooKeeper, gather_limited

BATCH = 500


async def resync(settings: Settings, progress: Progress = QUIET) -> dict[str, int]:
    """Publish everything; returns counts (published, skipped as not yet captured)."""
    zk = ZooKeeper(settings.zookeeper, read_only=True)
    kafka = Kafka(settings.kafka, client_id=f"zkbridge-{settings.region}-resync")
    counts = {"published": 0, "uncaptured": 0}
    await zk.start()
    try:
        topics = [topic_name(settings.kafka.topic_prefix, st.name, settings.region)
                  for st in settings.subtrees]
        await kafka.ensure_topics(topics)
        await kafka.start_producer()
        for st, topic in zip(settings.subtrees, topics, strict=True):
            layout = Layout(settings.state_path, st.name, st.path)
            reading = progress.task(f"{st.name}: reading metadata")
            metas = await read_meta(zk, layout, reading.advance)
            reading.done()
            rels = sorted(metas)
            sending = progress.task(f"{st.name}: re-announcing on {topic}", len(rels))
            for i in range(0, len(rels), BATCH):
                chunk = rels[i : i + BATCH]
                nodes = await gather_limited([zk.get(layout.znode(r)) for r in chunk], 64)
                records = []
                for rel, node in zip(chunk, nodes, strict=True):
                    meta = metas[rel]
                    if not meta.vc.entries:
                        continue  # a bare placeholder parent: nothing was ever written
                    data = None if meta.deleted else (node.data if node else None)
                    if content_hash(data) != meta.data_hash:
                        # Changed locally and not captured yet: the bridge announces it.
                        counts["uncaptured"] += 1
                        continue
                    event = Event(origin=settings.region, subtree=st.name, path=rel,
                                  op=Op.DELETE if meta.deleted else Op.PUT, vc=meta.vc,
                                  ts=meta.ts, writer=meta.writer or settings.region, data=data)
                    records.append((topic, event.key, codec.encode(event)))
                await kafka.send_all(records)
                counts["published"] += len(records)
                sending.advance(len(chunk))
        return counts
    finally:
        await kafka.stop()
        await zk.stop()
