"""The conflict rule: skip, apply or resolve a remote version against the local one."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.clock import merge
from bridge.model import VectorClock, Version, content_hash
from bridge.resolve import (
    RULE_COLLISION,
    RULE_LWW,
    Action,
    decide,
    independent_sequential,
    lww_key,
)


def ver(
    vc: dict[str, int],
    ts: int = 10,
    writer: str = "a",
    data: bytes | None = b"x",
) -> Version:
    return Version(VectorClock.of(vc), ts, writer, content_hash(data), data is None)


def test_no_local_metadata_applies() -> None:
    remote = ver({"a": 1})
    d = decide(None, remote)
    assert (d.action, d.merged, d.remote_wins) == (Action.APPLY, remote.vc, True)


def test_no_local_metadata_applies_a_delete_too() -> None:
    # The tombstone must be recorded, or a stale put could resurrect the node later.
    assert decide(None, ver({"a": 1}, data=None)).action is Action.APPLY


@pytest.mark.parametrize(
    ("local", "remote"),
    [
        ({"a": 2}, {"a": 1}),  # stale
        ({"a": 1, "b": 1}, {"b": 1}),
        ({"a": 3, "b": 2}, {"a": 2, "b": 2}),
    ],
)
def test_dominated_or_equal_is_skipped(local: dict[str, int], remote: dict[str, int]) -> None:
    # ts is deliberately higher on the remote: a skip must not look at it.
    lv, rv = ver(local, ts=1), ver(remote, ts=99, data=b"other")
    d = decide(lv, rv)
    assert d.action is Action.SKIP
    assert d.merged == lv.vc
    assert not d.remote_wins


def test_equal_clock_and_content_is_a_duplicate() -> None:
    lv, rv = ver({"a": 1, "b": 2}, ts=1), ver({"a": 1, "b": 2}, ts=99)
    assert decide(lv, rv).action is Action.SKIP


@pytest.mark.parametrize("remote_data", [b"other", b"", None])
def test_equal_clock_with_other_content_is_a_collision(remote_data: bytes | None) -> None:
    # Two writers with one identity: never a duplicate, never applied.
    lv, rv = ver({"a": 1}, ts=1), ver({"a": 1}, ts=99, data=remote_data)
    d = decide(lv, rv)
    assert (d.action, d.merged, d.remote_wins, d.rule) == (
        Action.COLLISION, lv.vc, False, RULE_COLLISION)


@pytest.mark.parametrize(
    ("local", "remote"),
    [({"a": 1}, {"a": 2}), ({"a": 1}, {"a": 1, "b": 1}), ({}, {"b": 1})],
)
def test_dominating_is_applied_whatever_its_stamp(
    local: dict[str, int], remote: dict[str, int]
) -> None:
    # Causally later wins even with a lower ts: causality beats clocks.
    lv, rv = ver(local, ts=99), ver(remote, ts=1, data=None)
    d = decide(lv, rv)
    assert (d.action, d.merged, d.remote_wins) == (Action.APPLY, rv.vc, True)


def test_concurrent_is_a_conflict_with_merged_clock() -> None:
    lv, rv = ver({"a": 2, "b": 1}, ts=5), ver({"a": 1, "b": 2}, ts=6, writer="b")
    d = decide(lv, rv)
    assert d.action is Action.CONFLICT
    assert d.merged == VectorClock.of({"a": 2, "b": 2})
    assert d.remote_wins
    assert d.rule == RULE_LWW
    assert not decide(rv, lv).remote_wins


@pytest.mark.parametrize(
    ("local", "remote", "remote_wins"),
    [
        # later ts wins
        (ver({"a": 1}, ts=7, writer="z"), ver({"b": 1}, ts=8, writer="a"), True),
        # equal ts: larger writer region name wins
        (ver({"a": 1}, ts=7, writer="a"), ver({"b": 1}, ts=7, writer="b"), True),
        (ver({"a": 1}, ts=7, writer="b"), ver({"b": 1}, ts=7, writer="a"), False),
        # equal ts and writer: larger content hash wins
        (
            ver({"a": 1}, ts=7, data=b"p"),
            ver({"b": 1}, ts=7, data=b"q"),
            content_hash(b"q") > content_hash(b"p"),
        ),
        # equal ts and writer: a put beats a delete (empty hash sorts first)
        (ver({"a": 1}, ts=7, data=None), ver({"b": 1}, ts=7, data=b""), True),
        (ver({"a": 1}, ts=7, data=b""), ver({"b": 1}, ts=7, data=None), False),
    ],
)
def test_lww_tie_breaks(local: Version, remote: Version, remote_wins: bool) -> None:
    d = decide(local, remote)
    assert d.action is Action.CONFLICT
    assert d.remote_wins is remote_wins


versions = st.builds(
    Version,
    vc=st.dictionaries(st.sampled_from("abc"), st.integers(0, 3)).map(VectorClock.of),
    ts=st.integers(0, 4),
    writer=st.sampled_from(["a", "b", "c"]),
    data_hash=st.sampled_from([b"", content_hash(b""), content_hash(b"1"), content_hash(b"2")]),
    deleted=st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(versions, versions)
def test_decision_is_symmetric(x: Version, y: Version) -> None:
    """Two regions holding x and y, each receiving the other, keep the same content."""
    dx, dy = decide(x, y), decide(y, x)
    assert dx.merged == dy.merged == merge(x.vc, y.vc)
    kept_by_x = y if dx.remote_wins else x
    kept_by_y = x if dy.remote_wins else y
    if dx.action is Action.CONFLICT:
        assert dy.action is Action.CONFLICT
        if lww_key(x) != lww_key(y):
            assert kept_by_x == kept_by_y
    elif dx.action is Action.COLLISION:
        assert dy.action is Action.COLLISION
        assert not dx.remote_wins and not dy.remote_wins
    elif dx.action is Action.APPLY:
        assert dy.action is Action.SKIP
        assert kept_by_x == kept_by_y == y
    else:
        assert dy.action in (Action.APPLY, Action.SKIP)


@pytest.mark.parametrize(
    ("path", "local", "remote", "expected"),
    [
        # Created in each region without seeing the other: two queue items, one name.
        ("/q/item-0000000007", ver({"a": 1}, writer="a"), ver({"b": 1}, writer="b"), True),
        ("/0000000007", ver({"a": 3}, writer="a"), ver({"b": 1}, writer="b"), True),
        # The same name written concurrently after both saw one version: one znode.
        ("/q/item-0000000007", ver({"a": 2, "b": 1}, writer="a"),
         ver({"a": 1, "b": 2}, writer="b"), False),
        # Not a sequential name (nine digits, or not at the end).
        ("/q/item-000000007", ver({"a": 1}, writer="a"), ver({"b": 1}, writer="b"), False),
        ("/q/0000000007-x", ver({"a": 1}, writer="a"), ver({"b": 1}, writer="b"), False),
        # A delete is not a second item.
        ("/q/item-0000000007", ver({"a": 1}, writer="a", data=None),
         ver({"b": 1}, writer="b"), False),
        # A version relayed by a third region keeps its writer's clock.
        ("/q/item-0000000007", ver({"c": 1}, writer="c"), ver({"b": 1}, writer="b"), True),
    ],
)
def test_independent_sequential_names(path: str, local: Version, remote: Version,
                                      expected: bool) -> None:
    assert independent_sequential(path, local, remote) is expected
    assert independent_sequential(path, remote, local) is expected
