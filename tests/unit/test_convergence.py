"""Convergence of the replication model (DESIGN §2), simulated without any server.

Regions write locally, events reach the other regions in any order and any
number of times, and each receiver runs ``bridge.resolve.decide``. Once every
event has reached every region, all regions must hold the same content and
the same clock for every path, and that content must be the one the rule
predicts from the set of writes alone. A sanity check swaps in naive rules
and shows that this test does catch divergence.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.clock import HybridClock, Order, compare, hlc_from_ms, merge
from bridge.model import Event, NodeMeta, Op, VectorClock, Version, content_hash
from bridge.resolve import Action, Decision, decide, lww_key

Decide = Callable[[Version | None, Version], Decision]
Node = tuple[NodeMeta, bytes | None]

SUBTREE = "critical"
REGIONS = ["ap-south", "eu-west", "us-east", "sa-east"]
PATHS = ["/a", "/a/b", "/c"]
# Few distinct values, including empty data and repeats, so equal content
# hashes (the last LWW tie-break) and no-op writes both happen.
VALUES: list[bytes | None] = [b"", b"1", b"2", b"3", None]


@dataclass
class Region:
    name: str
    clock: HybridClock
    nodes: dict[str, Node] = field(default_factory=dict)


@dataclass
class Federation:
    """Every region's replicated state plus every event ever published."""

    names: list[str]
    wall: Callable[[str], int]
    decide: Decide = decide
    causal_ts: bool = True
    regions: dict[str, Region] = field(init=False)
    events: list[Event] = field(default_factory=list)
    conflicts: int = 0
    regressions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.regions = {n: Region(n, HybridClock(self._wall_of(n))) for n in self.names}

    def _wall_of(self, region: str) -> Callable[[], int]:
        return lambda: self.wall(region)

    def write(self, region: str, path: str, data: bytes | None) -> Event | None:
        """An application writes (``data``) or deletes (``None``) at ``region``.

        Captured as the bridge does: only if the content hash differs from the
        metadata's, with the region's own clock entry incremented and a stamp
        above the one of the version being replaced.
        """
        r = self.regions[region]
        current = r.nodes.get(path)
        meta = current[0] if current else None
        new_hash = content_hash(data)
        if new_hash == (meta.data_hash if meta else b""):
            return None  # nothing changed, nothing to announce
        vc = (meta.vc if meta else VectorClock()).incremented(region)
        if self.causal_ts:
            ts = r.clock.now(after=meta.ts if meta else 0)
        else:
            ts = hlc_from_ms(self.wall(region))  # the bug the HLC exists to prevent
        op = Op.DELETE if data is None else Op.PUT
        event = Event(region, SUBTREE, path, op, vc, ts, region, data)
        r.nodes[path] = (NodeMeta(vc, new_hash, data is None, region, ts), data)
        self.events.append(event)
        return event

    def deliver(self, event: Event, region: str) -> None:
        if region == event.origin:
            return  # a bridge consumes only its peers' topics
        r = self.regions[region]
        current = r.nodes.get(event.path)
        remote = event.version()
        d = self.decide(current[0].version() if current else None, remote)
        if d.action is Action.SKIP:
            return
        r.clock.observe(event.ts)
        if d.action is Action.CONFLICT:
            self.conflicts += 1
        if d.remote_wins or current is None:
            meta = NodeMeta(d.merged, remote.data_hash, remote.deleted, event.writer, event.ts)
            new: Node = (meta, event.data if event.op is Op.PUT else None)
        else:
            new = (replace(current[0], vc=d.merged), current[1])
        if current is not None and compare(new[0].vc, current[0].vc) not in (
            Order.AFTER,
            Order.EQUAL,
        ):
            self.regressions.append(f"{region}{event.path}: {current[0].vc} -> {new[0].vc}")
        r.nodes[event.path] = new

    def flush(self, rnd: random.Random) -> None:
        """Deliver every event to every region once, in a random order."""
        pairs = [(e, n) for e in self.events for n in self.names]
        rnd.shuffle(pairs)
        for event, name in pairs:
            self.deliver(event, name)

    def snapshot(self, region: str) -> dict[str, tuple[bytes | None, VectorClock, int, str]]:
        return {
            path: (data, meta.vc, meta.ts, meta.writer)
            for path, (meta, data) in self.regions[region].nodes.items()
        }

    def diverged(self) -> bool:
        first = self.snapshot(self.names[0])
        return any(self.snapshot(n) != first for n in self.names[1:])


def expected_state(events: Iterable[Event]) -> dict[str, tuple[bytes | None, VectorClock]]:
    """What the rule predicts from the set of writes alone, whatever the order.

    Per path: the content of the LWW-greatest write, and the join of all clocks.
    """
    best: dict[str, Event] = {}
    clocks: dict[str, VectorClock] = {}
    for e in events:
        if e.path not in best or lww_key(e.version()) > lww_key(best[e.path].version()):
            best[e.path] = e
        clocks[e.path] = merge(clocks.get(e.path, VectorClock()), e.vc)
    return {p: (best[p].data, clocks[p]) for p in best}


def assert_converged(fed: Federation) -> None:
    assert not fed.regressions, fed.regressions[:3]
    first = fed.snapshot(fed.names[0])
    for name in fed.names[1:]:
        other = fed.snapshot(name)
        assert other.keys() == first.keys()
        for path in first:
            assert other[path] == first[path], (
                f"{path}: {fed.names[0]} has {first[path]}, {name} has {other[path]}"
            )
    expected = expected_state(fed.events)
    assert {p: (data, vc) for p, (data, vc, _, _) in first.items()} == expected


def skewed_wall(now: list[int], skew: dict[str, int]) -> Callable[[str], int]:
    return lambda region: now[0] + skew[region]


# ---------------------------------------------------------------- hypothesis

write_ops = st.tuples(
    st.just("write"), st.integers(0, 3), st.sampled_from(PATHS), st.sampled_from(VALUES)
)
deliver_ops = st.tuples(st.just("deliver"), st.integers(0, 10**6), st.integers(0, 3))
tick_ops = st.tuples(st.just("tick"), st.integers(0, 3))
Step = tuple[str, int, int] | tuple[str, int, str, bytes | None] | tuple[str, int]


def run_steps(
    n: int,
    skews: list[int],
    steps: list[Step],
    rnd: random.Random,
    decide_fn: Decide = decide,
) -> Federation:
    names = REGIONS[:n]
    now = [1_000]
    fed = Federation(names, skewed_wall(now, dict(zip(names, skews, strict=False))), decide_fn)
    for step in steps:
        if step[0] == "write":
            _, who, path, data = step  # type: ignore[misc]
            fed.write(names[who % n], path, data)
        elif step[0] == "deliver":
            _, which, to = step  # type: ignore[misc]
            if fed.events:
                fed.deliver(fed.events[which % len(fed.events)], names[to % n])
        else:
            now[0] += step[1]
    fed.flush(rnd)
    return fed


@settings(max_examples=200, deadline=None)
@given(
    st.integers(2, 4),
    st.lists(st.integers(-3, 3), min_size=4, max_size=4),
    # Short histories say little: at least 20 steps gives most examples conflicts.
    st.lists(st.one_of(write_ops, deliver_ops, tick_ops), min_size=20, max_size=80),
    st.randoms(use_true_random=False),
)
def test_regions_converge_whatever_the_delivery_order(
    n: int, skews: list[int], steps: list[Step], rnd: random.Random
) -> None:
    fed = run_steps(n, skews, steps, rnd)
    assert_converged(fed)


# ---------------------------------------------------------------- seeded stress


def stress(
    seed: int,
    *,
    decide_fn: Decide = decide,
    causal_ts: bool = True,
    writes: int = 300,
    n: int = 3,
) -> Federation:
    """Hundreds of writes on a few paths by 3 regions: most of them conflict."""
    rnd = random.Random(seed)
    names = REGIONS[:n]
    now = [1_000]
    skew = {name: rnd.randint(-5, 5) for name in names}
    fed = Federation(names, skewed_wall(now, skew), decide_fn, causal_ts)
    done = 0
    while done < writes:
        roll = rnd.random()
        if roll < 0.45:
            if fed.write(rnd.choice(names), rnd.choice(PATHS), rnd.choice(VALUES)):
                done += 1
        elif roll < 0.95 and fed.events:
            # Biased towards recent events, with duplicates and stale redeliveries.
            i = len(fed.events) - 1 - min(int(rnd.expovariate(0.2)), len(fed.events) - 1)
            fed.deliver(fed.events[i], rnd.choice(names))
        else:
            now[0] += rnd.randint(0, 2)  # often the same millisecond: stamp ties
    fed.flush(rnd)
    return fed


def test_three_regions_hundreds_of_conflicting_writes() -> None:
    total_conflicts = 0
    for seed in range(40):
        fed = stress(seed)
        assert_converged(fed)
        total_conflicts += fed.conflicts
    # The scenario must really be contentious, or it proves little.
    assert total_conflicts > 1_000


def test_four_regions_seeded() -> None:
    for seed in range(10):
        assert_converged(stress(1_000 + seed, n=4, writes=200))


# ---------------------------------------------------------------- the test has teeth


def last_received_wins(local: Version | None, remote: Version) -> Decision:
    """Apply whatever arrives, merging clocks: order-dependent by construction."""
    if local is None:
        return Decision(Action.APPLY, remote.vc, True)
    return Decision(Action.CONFLICT, merge(local.vc, remote.vc), True, "naive")


def concurrent_last_received_wins(local: Version | None, remote: Version) -> Decision:
    """Right about causality, wrong about conflicts: the subtle version of the bug."""
    d = decide(local, remote)
    if d.action is Action.CONFLICT:
        return replace(d, remote_wins=True)
    return d


def test_simulation_detects_last_received_wins() -> None:
    assert any(stress(seed, decide_fn=last_received_wins).diverged() for seed in range(20))


def test_simulation_detects_concurrent_last_received_wins() -> None:
    assert any(
        stress(seed, decide_fn=concurrent_last_received_wins).diverged() for seed in range(20)
    )


def test_oracle_detects_stamps_that_ignore_causality() -> None:
    """Without ``now(after=...)`` a causally later write can carry a smaller stamp.

    The regions may still agree with each other, but the content is then not
    the one LWW predicts, which is what the expected-state check catches.
    """

    def broken(seed: int) -> bool:
        fed = stress(seed, causal_ts=False)
        try:
            assert_converged(fed)
        except AssertionError:
            return True
        return False

    assert any(broken(seed) for seed in range(20))
