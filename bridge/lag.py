"""How far behind is a region? Computed from ZooKeeper and Kafka directly.

Works with the bridge stopped: positions come from the region's ensemble,
end offsets and the timestamp of the oldest unapplied event from Kafka, and
heartbeat times from the last status record the leader wrote.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass

from bridge.config import Settings
from bridge.kafka import Kafka, topic_name
from bridge.status import Status, now_ms
from bridge.store import Layout, outbox_depth, read_positions
from bridge.zk import ZooKeeper


@dataclass(frozen=True, slots=True)
class LagRow:
    subtree: str
    peer: str
    events_behind: int
    seconds_behind: float | None  # None: never heard from the peer
    heartbeat_age: float | None
    outbox: int  # this region's own changes not yet published

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


async def read_status(zk: ZooKeeper, settings: Settings) -> Status | None:
    node = await zk.get(f"{settings.state_path}/status")
    return Status.decode(node.data) if node and node.data else None


async def measure(settings: Settings) -> list[LagRow]:
    zk = ZooKeeper(settings.zookeeper, read_only=True)
    kafka = Kafka(settings.kafka, client_id=f"zkbridge-{settings.region}-lag")
    await zk.start()
    try:
        status = await read_status(zk, settings)
        await kafka.start_consumer(None)
        rows = []
        now = now_ms()
        for st in settings.subtrees:
            layout = Layout(settings.state_path, st.name, st.path)
            outbox = await outbox_depth(zk, layout)
            for peer in settings.peers:
                topic = topic_name(settings.kafka.topic_prefix, st.name, peer)
                positions = await read_positions(zk, layout, peer)
                parts = await kafka.partitions(topic)
                ends = await kafka.end_offsets([(topic, p) for p in parts])
                behind = {tp: end - positions.get(tp[1], 0) for tp, end in ends.items()
                          if end > positions.get(tp[1], 0)}
                peer_status = status.peer(st.name, peer) if status else None
                hb_ms = peer_status.last_heartbeat_ms if peer_status else 0
                hb_age = (now - hb_ms) / 1000 if hb_ms else None
                if behind:
                    oldest = await kafka.timestamps_at(
                        {tp: positions.get(tp[1], 0) for tp in behind})
                    ts = min(oldest.values()) if oldest else now
                    seconds: float | None = max(0.0, (now - ts) / 1000)
                else:
                    seconds = hb_age
                rows.append(LagRow(st.name, peer, sum(behind.values()), seconds, hb_age, outbox))
        return rows
    finally:
        await kafka.stop()
        await zk.stop()


def worst_seconds(rows: list[LagRow]) -> float:
    values = [v for r in rows for v in (r.seconds_behind, r.heartbeat_age) if v is not None]
    return max(values, default=0.0)


def table(rows: list[LagRow]) -> str:
    head = ("SUBTREE", "PEER", "EVENTS BEHIND", "SECONDS BEHIND", "HEARTBEAT AGE", "OUTBOX")

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    body = [(r.subtree, r.peer, str(r.events_behind), fmt(r.seconds_behind),
             fmt(r.heartbeat_age), str(r.outbox)) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in (head, *body))


def run_measure(settings: Settings, timeout: float) -> list[LagRow]:
    return asyncio.run(asyncio.wait_for(measure(settings), timeout))
