"""How far behind is a region? Computed from ZooKeeper and Kafka directly.

Works with the bridge stopped: positions come from the region's ensemble,
end offsets and the timestamp of the oldest unapplied event from Kafka, and
heartbeat times from the last status record the leader wrote.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass

from bridge import stateaccess
from bridge.config import Settings
from bridge.kafka import Kafka, topic_name
from bridge.outbox import outbox_depth
from bridge.positions import read_positions
from bridge.reporter import read_status
from bridge.status import Status, now_ms, unheard_ms
from bridge.store import Layout
from bridge.zk import ZooKeeper


@dataclass(frozen=True, slots=True)
class LagRow:
    subtree: str
    peer: str
    events_behind: int
    seconds_behind: float | None  # None: never heard from the peer
    heartbeat_age: float | None
    outbox: int  # this region's own changes not yet published
    outbox_overflowed: bool = False  # its changes since are not in the outbox (outbox_max_mb)
    # Set when the peer topic lost records (a stored position above its end):
    # the whole topic is then counted as behind, since the bridge rewinds.
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class LagProbe:
    """Connected once, sampled many times (``lag --watch`` re-measures every few seconds)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.zk = ZooKeeper(settings.zookeeper, read_only=True)
        self.kafka = Kafka(settings.kafka, client_id=f"zkbridge-{settings.region}-lag")

    async def __aenter__(self) -> LagProbe:
        await stateaccess.start_checked(self.zk, self.settings)
        try:
            await self.kafka.start_consumer(None)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            await self.kafka.stop()
        finally:
            await self.zk.stop()

    async def sample(self) -> list[LagRow]:
        settings, zk, kafka = self.settings, self.zk, self.kafka
        status = await read_status(zk, settings)
        rows = []
        now = now_ms()
        # Offsets of a partition without a leader are asked in vain until the
        # request times out, which took every row with it.
        leaderless = (await kafka.topic_ids([
            topic_name(settings.kafka.topic_prefix, st.name, peer)
            for st in settings.subtrees for peer in settings.peers])).leaderless
        for st in settings.subtrees:
            layout = Layout(settings.state_path, st.name, st.path)
            outbox = await outbox_depth(zk, layout)
            overflowed = await self._overflowed(layout, status)
            for peer in settings.peers:
                topic = topic_name(settings.kafka.topic_prefix, st.name, peer)
                positions = await read_positions(zk, layout, peer)
                parts = await kafka.partitions(topic)
                down = [p for p in parts if (topic, p) in leaderless]
                asked = [(topic, p) for p in parts if p not in down]
                ends = await kafka.readable_ends(asked) if asked else {}
                begins = await kafka.beginning_offsets(list(ends)) if ends else {}
                notes = [f"{topic}[{p}] has no leader (every node holding a replica is "
                         "down): its backlog is unknown" for p in down]
                for (t, p), end in ends.items():
                    if positions.get(p, 0) > end:
                        # Never a negative backlog, nor a clamped 0: all of
                        # the current topic is still to be read.
                        notes.append(f"{t}[{p}] lost records: position {positions[p]} above "
                                     f"end {end}; the bridge rewinds to {begins.get((t, p), 0)}")
                        positions = {**positions, p: begins.get((t, p), 0)}
                behind = {tp: end - positions.get(tp[1], 0) for tp, end in ends.items()
                          if end > positions.get(tp[1], 0)}
                peer_status = status.peer(st.name, peer) if status else None
                hb_ms = peer_status.last_heartbeat_ms if peer_status else 0
                # Never heard and nothing published: no heartbeat since the bridge
                # started, as its metric counts it (a lower bound).
                started = status.started_ms if status is not None and not behind else 0
                quiet = unheard_ms(hb_ms, started, now)
                hb_age = None if quiet is None else quiet / 1000
                if behind:
                    oldest = await kafka.timestamps_at(
                        {tp: positions.get(tp[1], 0) for tp in behind})
                    ts = min(oldest.values()) if oldest else now
                    seconds: float | None = max(0.0, (now - ts) / 1000)
                else:
                    seconds = hb_age
                if overflowed and peer == settings.peers[0]:
                    notes.append(OVERFLOW_NOTE)
                rows.append(LagRow(st.name, peer, sum(behind.values()), seconds, hb_age, outbox,
                                   overflowed, "; ".join(notes)))
        return rows

    async def _overflowed(self, layout: Layout, status: Status | None) -> bool:
        # The marker is written by the first capture the overflow keeps out of
        # the outbox; until then only the leader's status record knows.
        if status is not None and status.state.get(layout.name, {}).get("outbox_overflowed"):
            return True
        return await self.zk.exists(layout.overflow_marker) is not None


async def measure(settings: Settings) -> list[LagRow]:
    async with LagProbe(settings) as probe:
        return await probe.sample()


OVERFLOW_NOTE = ("this region's outbox overflowed (outbox_max_mb): the paths it changes "
                 "meanwhile are published again once Kafka has taken the outbox below half; "
                 "`zkbridge status` shows how far")


def attention(rows: list[LagRow], max_seconds: float) -> list[str]:
    """What ``--max-seconds`` exits 1 for: a lag or heartbeat age above it, an overflow."""
    out = [f"lag above {max_seconds:g}s"] if worst_seconds(rows) > max_seconds else []
    return out + overflow_reason(rows)


def overflow_reason(rows: list[LagRow]) -> list[str]:
    """"outbox overflowed: <subtrees>", if any overflowed (``--max-seconds``, ``--watch``)."""
    overflowed = sorted({r.subtree for r in rows if r.outbox_overflowed})
    return [f"outbox overflowed: {', '.join(overflowed)}"] if overflowed else []


def worst_seconds(rows: list[LagRow]) -> float:
    values = [v for r in rows for v in (r.seconds_behind, r.heartbeat_age) if v is not None]
    return max(values, default=0.0)


HEADINGS = ("SUBTREE", "PEER", "EVENTS BEHIND", "SECONDS BEHIND", "HEARTBEAT AGE", "OUTBOX")


def cells(r: LagRow) -> tuple[str, ...]:
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    outbox = f"{r.outbox} OVERFLOWED" if r.outbox_overflowed else str(r.outbox)
    return (r.subtree, r.peer, str(r.events_behind), fmt(r.seconds_behind),
            fmt(r.heartbeat_age), outbox)


def table(rows: list[LagRow], extra: tuple[str, list[str]] | None = None) -> str:
    """Plain aligned columns; ``extra`` appends one more (heading, one cell per row).

    Rows with a note (a topic that lost records, an overflow) are followed by it, marked ``!``.
    """
    head = HEADINGS + ((extra[0],) if extra else ())
    body = [cells(r) + ((extra[1][i],) if extra else ()) for i, r in enumerate(rows)]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in (head, *body)]
    lines += [f"! {r.subtree}/{r.peer}: {r.note}" for r in rows if r.note]
    return "\n".join(lines)


def run_measure(settings: Settings, timeout: float) -> list[LagRow]:
    return asyncio.run(asyncio.wait_for(measure(settings), timeout))
