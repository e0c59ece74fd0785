"""Vector-clock order and merge laws, and the hybrid logical clock's guarantees."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.clock import (
    LOGICAL_BITS,
    HybridClock,
    Order,
    compare,
    hlc_from_ms,
    hlc_to_ms,
    merge,
)
from bridge.model import VectorClock

SETTINGS = settings(max_examples=200, deadline=None)

# Few regions and small counters, so equal and dominated pairs are common.
clocks = st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 4)).map(
    VectorClock.of
)
OPPOSITE = {
    Order.EQUAL: Order.EQUAL,
    Order.BEFORE: Order.AFTER,
    Order.AFTER: Order.BEFORE,
    Order.CONCURRENT: Order.CONCURRENT,
}


def leq(a: VectorClock, b: VectorClock) -> bool:
    return all(a.get(r) <= b.get(r) for r in a.as_dict().keys() | b.as_dict().keys())


@SETTINGS
@given(clocks, clocks)
def test_merge_is_commutative(a: VectorClock, b: VectorClock) -> None:
    assert merge(a, b) == merge(b, a)


@SETTINGS
@given(clocks, clocks, clocks)
def test_merge_is_associative(a: VectorClock, b: VectorClock, c: VectorClock) -> None:
    assert merge(merge(a, b), c) == merge(a, merge(b, c))


@SETTINGS
@given(clocks, clocks)
def test_merge_is_idempotent_and_an_upper_bound(a: VectorClock, b: VectorClock) -> None:
    assert merge(a, a) == a
    m = merge(a, b)
    assert merge(m, b) == m
    assert compare(m, a) in (Order.AFTER, Order.EQUAL)
    assert compare(m, b) in (Order.AFTER, Order.EQUAL)


@SETTINGS
@given(clocks, clocks, clocks)
def test_merge_is_the_least_upper_bound(a: VectorClock, b: VectorClock, c: VectorClock) -> None:
    if leq(a, c) and leq(b, c):
        assert leq(merge(a, b), c)


@SETTINGS
@given(clocks, clocks)
def test_compare_is_antisymmetric(a: VectorClock, b: VectorClock) -> None:
    assert compare(b, a) is OPPOSITE[compare(a, b)]
    assert (compare(a, b) is Order.EQUAL) == (a == b)


@SETTINGS
@given(clocks, clocks)
def test_compare_matches_pointwise_order(a: VectorClock, b: VectorClock) -> None:
    expected = {
        (True, True): Order.EQUAL,
        (True, False): Order.BEFORE,
        (False, True): Order.AFTER,
        (False, False): Order.CONCURRENT,
    }[(leq(a, b), leq(b, a))]
    assert compare(a, b) is expected


@SETTINGS
@given(clocks, clocks, clocks)
def test_before_is_transitive(a: VectorClock, b: VectorClock, c: VectorClock) -> None:
    if compare(a, b) is Order.BEFORE and compare(b, c) is Order.BEFORE:
        assert compare(a, c) is Order.BEFORE


@SETTINGS
@given(clocks, st.sampled_from(["a", "b", "e"]))
def test_increment_dominates(a: VectorClock, region: str) -> None:
    assert compare(a.incremented(region), a) is Order.AFTER


def test_absent_and_zero_entries_are_equal() -> None:
    assert VectorClock.of({"a": 1, "b": 0}) == VectorClock.of({"a": 1})
    assert compare(VectorClock(), VectorClock.of({"a": 0})) is Order.EQUAL


# ---------------------------------------------------------------- hybrid clock


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["now", "now_after", "observe"]),
            st.integers(0, 2**40),  # wall ms; jumps backwards as well as forwards
            st.integers(0, 2**60),
        ),
        max_size=50,
    )
)
def test_hybrid_clock_is_monotonic(steps: list[tuple[str, int, int]]) -> None:
    wall = [0]
    clock = HybridClock(lambda: wall[0])
    last = 0
    for kind, ms, x in steps:
        wall[0] = ms
        if kind == "observe":
            clock.observe(x)
            last = max(last, x)
            continue
        after = x if kind == "now_after" else 0
        ts = clock.now(after=after)
        assert ts > last
        assert ts > after
        assert ts >= hlc_from_ms(ms)
        last = ts


def test_hybrid_clock_follows_wall_time_and_ties_break_logically() -> None:
    wall = [1_000]
    clock = HybridClock(lambda: wall[0])
    first = clock.now()
    assert hlc_to_ms(first) == 1_000
    second = clock.now()
    assert second == first + 1  # same millisecond: the logical counter moves
    wall[0] = 2_000
    assert clock.now() == hlc_from_ms(2_000)
    wall[0] = 500  # the wall clock stepped back: stamps must not
    assert clock.now() == hlc_from_ms(2_000) + 1


def test_now_after_a_stamp_from_the_future() -> None:
    clock = HybridClock(lambda: 1_000)
    future = hlc_from_ms(9_000) + 7
    assert clock.now(after=future) == future + 1
    assert clock.now() == future + 2


def test_observe_moves_later_stamps_past_the_observed_one() -> None:
    clock = HybridClock(lambda: 1_000)
    clock.observe(hlc_from_ms(5_000))
    assert clock.now() > hlc_from_ms(5_000)
    clock.observe(0)  # observing the past changes nothing
    assert clock.now() > hlc_from_ms(5_000)


def test_default_wall_clock_is_real_time() -> None:
    ts = HybridClock().now()
    assert hlc_to_ms(ts) > 1_600_000_000_000
    assert ts & ((1 << LOGICAL_BITS) - 1) == 0
