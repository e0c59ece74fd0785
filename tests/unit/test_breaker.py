"""The scan's breaker: what a start refuses to announce (mass deletes, a moved mount)."""

from __future__ import annotations

import pytest

from bridge.clock import HybridClock
from bridge.config import MassDeleteSettings
from bridge.errors import MassDeleteError
from bridge.layout import Layout
from bridge.scan import Scanner, ScanResult
from bridge.store import SubtreeStore


def scanner(before: str | None, mount: str = "/app") -> Scanner:
    store = SubtreeStore(None, Layout("/zkbridge", "s", mount),  # type: ignore[arg-type]
                         region="r1", clock=HybridClock(lambda: 1), max_data_bytes=1 << 20)
    store.mount_before = before
    return Scanner(store, MassDeleteSettings())


def result(replicated: int, deletes: int = 0, older: tuple[str, ...] = (),
           missing: tuple[str, ...] = ()) -> ScanResult:
    return ScanResult((), replicated, replicated, deletes, 0.1, older=older, missing=missing)


def test_a_mass_delete_is_refused_unless_allowed() -> None:
    s = scanner("/app")
    s._breaker(result(100, deletes=19), allow=False)  # below min_nodes
    s._breaker(result(100, deletes=50), allow=False)  # not more than half
    with pytest.raises(MassDeleteError, match="--allow-mass-delete"):
        s._breaker(result(100, deletes=51), allow=False)
    s._breaker(result(100, deletes=51), allow=True)


def test_a_moved_mount_refuses_older_znodes_whatever_is_allowed() -> None:
    """A copy made while the bridge still wrote at the old mount: no override, the
    older values would go over the federation's newer ones everywhere."""
    s = scanner("/old")
    older = ("/a", "/b", "/c", "/d")
    for allow in (False, True):
        with pytest.raises(MassDeleteError) as info:
            s._breaker(result(100, older=older), allow=allow)
        text = str(info.value)
        assert "its mount here was /old and is /app now, and 4 znodes there were written " \
               "before the versions the state records (/a, /b, /c and 1 more)" in text
        assert "Copy the tree from /old to /app with this bridge stopped" in text
        assert "--allow-mass-delete" not in text


def test_a_moved_mount_refuses_any_missing_znode_and_offers_the_override_below_the_ratio(
) -> None:
    s = scanner("/old")
    s._breaker(result(100), allow=False)  # the copy matches: goes on
    with pytest.raises(MassDeleteError) as info:
        s._breaker(result(100, deletes=1, missing=("/m40",)), allow=False)
    assert "1 of its 100 replicated znodes are missing there (/m40)" in str(info.value)
    assert "--allow-mass-delete" in str(info.value)
    s._breaker(result(100, deletes=1, missing=("/m40",)), allow=True)
    gone = tuple(f"/m{i}" for i in range(60))
    for allow in (False, True):  # most of it: no override offered, none taken
        with pytest.raises(MassDeleteError) as info:
            s._breaker(result(100, deletes=60, missing=gone), allow=allow)
        text = str(info.value)
        assert "60 of its 100 replicated znodes are missing there (/m0, /m1, /m2 and 57 " \
            "more)" in text
        assert "`--allow-mass-delete` does not apply at a moved mount: to delete most of " \
            "the subtree, do it at /old before the move." in text
        assert "start once with" not in text


def test_an_unmoved_or_unknown_mount_is_not_held_to_the_copy_s_rules() -> None:
    for before in ("/app", None):
        scanner(before)._breaker(result(100, deletes=1, older=("/a",), missing=("/b",)),
                                 allow=False)
