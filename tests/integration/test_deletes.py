"""Deletes converge: recursive deletes and a structural race between three regions (issue 15).

Rounds are few in the regular suite; ``ZKBRIDGE_ROUNDS=N`` runs each test N
rounds (the acceptance runs used 100 and 200).
"""

from __future__ import annotations

import contextlib
import os
import threading

import pytest
from kazoo.exceptions import KazooException

from tests.integration.federation import Federation

pytestmark = pytest.mark.integration

ROUNDS = int(os.environ.get("ZKBRIDGE_ROUNDS") or "0")
# Long runs outlast the suite's per-test timeout.
LONG = pytest.mark.timeout(max(300, 60 * ROUNDS))


@LONG
def test_recursive_delete_leaves_nothing_behind(federation: Federation) -> None:
    fed = federation
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    for n in range(ROUNDS or 6):
        base = f"/w{n}"
        r1.client.create(r1.path(base), b"parent")
        t = r1.client.transaction()
        for i in range(120):
            t.create(r1.path(f"{base}/c{i}"), b"x")
        t.commit()
        fed.wait_converged(timeout=60)
        r2.client.delete(r2.path(base), recursive=True)
        fed.wait_converged(timeout=60)
        for name in fed.regions:
            region = fed[name]
            assert region.client.exists(region.path(base)) is None, f"round {n}: {name} kept it"
    fed.assert_clean_logs()


def _quiet(fn: object, *args: object, **kwargs: object) -> None:
    # The application's own race (NoNode, NotEmpty) is part of the scenario.
    with contextlib.suppress(KazooException):
        fn(*args, **kwargs)  # type: ignore[operator]


@LONG
def test_structural_race_between_three_regions_converges(federation: Federation) -> None:
    fed = federation
    fed.start_all()
    r1, r2, r3 = fed["r1"], fed["r2"], fed["r3"]
    for n in range(ROUNDS or 12):
        base = f"/t{n}"
        r1.client.create(r1.path(f"{base}/a"), b"a", makepath=True)
        r1.client.create(r1.path(f"{base}/b"), b"b")
        fed.wait_converged(timeout=60)
        go = threading.Barrier(3)

        def one(go: threading.Barrier, steps: list[tuple[object, tuple[object, ...],
                                                         dict[str, object]]]) -> None:
            go.wait()
            for fn, args, kwargs in steps:
                _quiet(fn, *args, **kwargs)

        c1, c2, c3 = r1.client, r2.client, r3.client
        threads = [
            threading.Thread(target=one, args=(go, [
                (c1.delete, (r1.path(base),), {"recursive": True})])),
            threading.Thread(target=one, args=(go, [
                (c2.create, (r2.path(f"{base}/c/d"), b"d"), {"makepath": True}),
                (c2.set, (r2.path(f"{base}/a"), b"a2"), {})])),
            threading.Thread(target=one, args=(go, [
                (c3.set, (r3.path(base), b"v3"), {}),
                (c3.delete, (r3.path(f"{base}/b"),), {})])),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        fed.wait_converged(timeout=60)
    fed.assert_clean_logs()
