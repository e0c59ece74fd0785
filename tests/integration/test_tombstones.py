"""Tombstone collection at causal stability (issue 11): never resurrects a deleted znode.

Both tests run two regions with a grace of a few seconds. The first shows
tombstones of a churned queue collected everywhere and a path written again
afterwards replicating as a new write. The second is the classic case: a
region whose bridge died holding a stale put in its outbox stays away past
the grace; the tombstone waits for it (its applied position never reached
the delete), and when it returns its stale put loses to the delete.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.harness import procs
from tests.integration.federation import Federation
from tests.integration.test_kafka import _create_compacting, _data_events, _records

pytestmark = pytest.mark.integration

GRACE = 3


def two(fed: Federation) -> None:
    """r1 and r2 only, with a short grace, both bridges started."""
    for name, peer in (("r1", "r2"), ("r2", "r1")):
        fed.write_config(name, peers=[peer], tombstone_grace=GRACE, max_clock_skew=2)
    fed.start("r1", wait=False)
    fed.start("r2")
    fed.wait_ready("r1")


def meta_path(fed: Federation, rel: str) -> str:
    return f"{fed.state_path}/subtrees/{fed.subtree}/meta{rel}"


def held(fed: Federation, name: str, rels: list[str]) -> list[str]:
    client = fed[name].client
    return [r for r in rels if client.exists(meta_path(fed, r)) is not None]


def holds_for(predicate: Callable[[], bool], seconds: float, message: str) -> None:
    """``predicate`` stays true for ``seconds`` (checked every 0.2 s)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert predicate(), message
        time.sleep(0.2)


def collected(fed: Federation, name: str) -> int:
    return sum(int(e.get("collected", 0)) for e in fed.events(name)
               if e.get("event") == "tombstones_collected")


def nulls_queued(fed: Federation, name: str) -> int:
    return sum(int(e.get("nulls", 0)) for e in fed.events(name)
               if e.get("event") == "tombstones_collected")


def keyed(fed: Federation, topic: str, rels: list[str]) -> tuple[int, int]:
    """(records with a value, null records) left on ``topic`` for the keys ``rels``."""
    keys = {r.encode() for r in rels}
    recs = [(k, v) for k, v in _records(fed.broker.bootstrap, topic) if k in keys]
    return sum(1 for _, v in recs if v is not None), sum(1 for _, v in recs if v is None)


def test_churned_paths_are_collected_everywhere_and_can_come_back(
        federation: Federation) -> None:
    fed = federation
    two(fed)
    r1, r2 = fed["r1"], fed["r2"]
    rels = [f"/q/item-{i:04d}" for i in range(40)]
    t = r1.client.transaction()
    t.create(r1.path("/q"), b"")
    for rel in rels:
        t.create(r1.path(rel), b"job")
    t.commit()
    fed.wait_converged(["r1", "r2"], timeout=60)
    for rel in rels:
        r2.client.delete(r2.path(rel))
    fed.wait_converged(["r1", "r2"], timeout=60)
    assert held(fed, "r1", rels) == rels  # tombstones right after the delete
    procs.wait_for(lambda: not held(fed, "r1", rels) and not held(fed, "r2", rels), 60,
                   message=lambda: f"tombstones left: r1 {len(held(fed, 'r1', rels))}, "
                                   f"r2 {len(held(fed, 'r2', rels))}")
    assert collected(fed, "r1") >= len(rels) and collected(fed, "r2") >= len(rels)
    for name in ("r1", "r2"):
        assert fed[name].client.get_children(fed[name].path("/q")) == []

    def status_shows() -> bool:
        out = fed.cli("status", "-c", str(r1.config_path)).stdout
        return "tombstones 0 held, 40 collected" in out and "stable prefix age: r1 " in out

    procs.wait_for(status_shows, 20, message=lambda: fed.cli(
        "status", "-c", str(r1.config_path)).stdout)
    # A path forgotten everywhere is written again in the region that did not
    # delete it: a new write, replicated like any other.
    r1.client.create(r1.path(rels[0]), b"again")
    procs.wait_for(lambda: r2.client.exists(r2.path(rels[0])) is not None, 30,
                   message=lambda: "the re-created path did not replicate")
    assert r2.client.get(r2.path(rels[0]))[0] == b"again"
    fed.wait_converged(["r1", "r2"], timeout=60)
    fed.assert_clean_logs()


def test_a_region_away_past_the_grace_cannot_resurrect_with_a_stale_put(
        federation: Federation) -> None:
    fed = federation
    two(fed)
    r1, r2 = fed["r1"], fed["r2"]
    r1.client.create(r1.path("/p"), b"v1")
    fed.wait_converged(["r1", "r2"], timeout=60)
    # r2 captures a put into its outbox and dies before publishing it.
    fed.stop("r2")
    fed.start("r2", env={"ZKBRIDGE_FAILPOINTS": "after_outbox_write=crash@1"})
    r2.client.set(r2.path("/p"), b"v2-stale")
    proc = r2.proc
    assert proc is not None
    procs.wait_for(lambda: proc.poll() is not None, 30, message=lambda: "r2 did not die")
    r2.proc = None
    # Later, r1 deletes the path: concurrent with r2's unpublished put, and newer.
    r1.client.delete(r1.path("/p"))
    procs.wait_for(lambda: held(fed, "r1", ["/p"]) == ["/p"], 10,
                   message=lambda: "no tombstone at r1")
    # Well past the grace, with r2 away, the tombstone stays: r2 has not applied it.
    holds_for(lambda: held(fed, "r1", ["/p"]) == ["/p"], 3 * GRACE,
              "r1 collected the tombstone while r2 had not applied the delete")
    assert collected(fed, "r1") == 0
    # r2 returns: its stale put is published first, then it applies the delete.
    fed.start("r2")
    fed.wait_converged(["r1", "r2"], timeout=60)
    for name in ("r1", "r2"):
        assert fed[name].client.exists(fed[name].path("/p")) is None, f"{name} resurrected /p"
    procs.wait_for(lambda: not held(fed, "r1", ["/p"]) and not held(fed, "r2", ["/p"]), 60,
                   message=lambda: "the tombstone was never collected after r2 returned")
    for name in ("r1", "r2"):
        assert fed[name].client.exists(fed[name].path("/p")) is None, f"{name} resurrected /p"
    fed.wait_converged(["r1", "r2"], timeout=60)
    fed.assert_clean_logs()


def _three_running_and_a_spare(make_federation: Callable[..., Federation]
                               ) -> tuple[Federation, list[str]]:
    """r1..r3 running on compacting topics (delete.retention.ms=100); r4 configured only."""
    fed = make_federation(spare=True)
    if fed.broker.kind != "kafka":
        pytest.skip("needs Apache Kafka started by the harness (a log cleaner that runs)")
    topics = [f"{fed.prefix}.{fed.subtree}.{n}" for n in fed.regions]
    _create_compacting(fed.broker.bootstrap, topics)
    old = ["r1", "r2", "r3"]
    for name in old:
        fed.write_config(name, peers=[n for n in old if n != name], tombstone_grace=GRACE,
                         max_clock_skew=2)
    fed.write_config("r4", peers=old, tombstone_grace=GRACE, max_clock_skew=2)
    for name in old:
        fed.start(name, wait=False)
    for name in old:
        fed.wait_ready(name)
    return fed, topics


def _queue_of_jobs(fed: Federation, regions: list[str]) -> list[str]:
    """r1 creates /q with 30 jobs in one multi; returns their paths once replicated."""
    r1 = fed["r1"]
    r1.client.create(r1.path("/q"), b"queue")
    fed.wait_converged(regions)
    rels = [f"/q/job-{i:03d}" for i in range(30)]
    t = r1.client.transaction()
    for rel in rels:
        t.create(r1.path(rel), b"work")
    t.commit()
    fed.wait_converged(regions)
    return rels


def test_a_region_bootstrapped_after_collection_converges_on_compacted_topics(
        make_federation: Callable[..., Federation],
        harness_report: Callable[[str], None]) -> None:
    fed, topics = _three_running_and_a_spare(make_federation)
    old = ["r1", "r2", "r3"]
    r1 = fed["r1"]
    rels = _queue_of_jobs(fed, old)
    for rel in rels:
        r1.client.delete(r1.path(rel))
    fed.wait_converged(old)
    procs.wait_for(lambda: not any(held(fed, n, rels) for n in old), 60,
                   message=lambda: "tombstones not collected in r1..r3")
    written = 1 + 2 * len(rels)

    def compacted() -> int | None:
        left = len(_data_events(fed.broker.bootstrap, topics[0]))
        return left if left < written else None

    left = procs.wait_for(compacted, 90, interval=1.0, message="the log cleaner never ran")
    harness_report(f"tombstones: {written} data records on r1's topic, {left} after the cleaner")
    # A new region bootstraps from the compacted topics: the deletes there make
    # tombstones of its own, which it collects like everyone else.
    fed.start("r4")
    procs.wait_for(lambda: fed.tree("r4") == fed.tree("r1"), 60,
                   message=lambda: f"r4 {sorted(fed.tree('r4'))} vs r1 {sorted(fed.tree('r1'))}")
    procs.wait_for(lambda: not held(fed, "r4", rels), 60,
                   message=lambda: f"r4 still holds {len(held(fed, 'r4', rels))} tombstones")
    assert fed.tree("r4") == {"/q": b"queue"}
    fed.wait_converged()
    fed.assert_clean_logs()


def test_null_records_leave_nothing_of_collected_paths_on_the_compacted_topics(
        make_federation: Callable[..., Federation],
        harness_report: Callable[[str], None]) -> None:
    """Each region publishes a null per collected tombstone; the cleaner then drops
    every record of those keys (puts, deletes and, after delete.retention.ms, the
    nulls), and a region bootstrapping afterwards has nothing to collect."""
    fed, topics = _three_running_and_a_spare(make_federation)
    old = ["r1", "r2", "r3"]
    r1, r2 = fed["r1"], fed["r2"]
    rels = _queue_of_jobs(fed, old)
    for rel in rels[::2]:  # churn: some paths rewritten in another region first
        r2.client.set(r2.path(rel), b"done")
    fed.wait_converged(old)
    for rel in rels:
        r1.client.delete(r1.path(rel))
    fed.wait_converged(old)
    procs.wait_for(lambda: not any(held(fed, n, rels) for n in old)
                   and all(nulls_queued(fed, n) >= len(rels) for n in old), 60,
                   message=lambda: "tombstones not collected (or nulls not queued) in r1..r3: "
                                   f"{[len(held(fed, n, rels)) for n in old]}, "
                                   f"{[nulls_queued(fed, n) for n in old]}")
    before = {t: keyed(fed, t, rels) for t in topics[:3]}

    def clean() -> dict[str, tuple[int, int]] | None:
        now = {t: keyed(fed, t, rels) for t in topics[:3]}
        return now if all(data == 0 for data, _ in now.values()) else None

    after = procs.wait_for(clean, 120, interval=1.0,
                           message=lambda: f"records of collected paths left: "
                                           f"{ {t: keyed(fed, t, rels) for t in topics[:3]} }")

    def no_nulls() -> dict[str, tuple[int, int]] | None:
        now = {t: keyed(fed, t, rels) for t in topics[:3]}
        return now if all(n == 0 for _, n in now.values()) else None

    gone = procs.wait_for(no_nulls, 120, interval=1.0,
                          message=lambda: "null records outlived delete.retention.ms: "
                                          f"{ {t: keyed(fed, t, rels) for t in topics[:3]} }")
    harness_report("null records: (data, null) records of 30 collected keys per topic "
                   f"before the cleaner {list(before.values())}, after it {list(after.values())}, "
                   f"after delete.retention.ms {list(gone.values())}")
    # A region bootstrapping now finds nothing of those paths: no tombstone to make.
    fed.start("r4")
    procs.wait_for(lambda: fed.tree("r4") == fed.tree("r1"), 60,
                   message=lambda: f"r4 {sorted(fed.tree('r4'))} vs r1 {sorted(fed.tree('r1'))}")
    assert fed.tree("r4") == {"/q": b"queue"}
    assert held(fed, "r4", rels) == []
    fed.wait_converged()
    assert fed.count_events("r4", "null_record_applied") == 0
    fed.assert_clean_logs()


def test_a_stale_put_read_by_a_bootstrapping_region_is_undone_by_its_topics_null(
        make_federation: Callable[..., Federation],
        harness_report: Callable[[str], None]) -> None:
    """The case null records exist for. r3 wrote /k, r1 deleted it; r1 and r2
    collected the tombstone and the cleaner removed every record of /k from
    their topics, while r3 (a long grace) has not collected yet, so its topic
    still holds its put. r4 bootstraps: nothing tells it /k was deleted, and it
    takes the put. When r3 collects, its null (carrying the delete) removes it."""
    fed = make_federation(spare=True)
    if fed.broker.kind != "kafka":
        pytest.skip("needs Apache Kafka started by the harness (a log cleaner that runs)")
    topics = {n: f"{fed.prefix}.{fed.subtree}.{n}" for n in fed.regions}
    _create_compacting(fed.broker.bootstrap, list(topics.values()))
    old = ["r1", "r2", "r3"]
    for name in old:
        fed.write_config(name, peers=[n for n in old if n != name], max_clock_skew=2,
                         tombstone_grace=600 if name == "r3" else GRACE)
    fed.write_config("r4", peers=old, tombstone_grace=GRACE, max_clock_skew=2)
    for name in old:
        fed.start(name, wait=False)
    for name in old:
        fed.wait_ready(name)
    r1, r3, r4 = fed["r1"], fed["r3"], fed["r4"]
    r3.client.create(r3.path("/k"), b"stale")
    r3.client.create(r3.path("/kept"), b"yes")
    fed.wait_converged(old)
    r1.client.delete(r1.path("/k"))
    fed.wait_converged(old)
    procs.wait_for(lambda: not held(fed, "r1", ["/k"]) and not held(fed, "r2", ["/k"]), 60,
                   message=lambda: "r1 and r2 did not collect /k")
    assert held(fed, "r3", ["/k"]) == ["/k"]
    procs.wait_for(lambda: keyed(fed, topics["r1"], ["/k"]) == (0, 0)
                   and keyed(fed, topics["r2"], ["/k"]) == (0, 0), 120, interval=1.0,
                   message=lambda: f"r1's topic {keyed(fed, topics['r1'], ['/k'])}, "
                                   f"r2's {keyed(fed, topics['r2'], ['/k'])}")
    assert keyed(fed, topics["r3"], ["/k"]) == (1, 0)
    fed.start("r4")
    # Resurrected: the only record of /k left anywhere is r3's put.
    procs.wait_for(lambda: r4.client.exists(r4.path("/k")) is not None, 30,
                   message=lambda: f"r4 did not take r3's put: {sorted(fed.tree('r4'))}")
    assert r4.client.get(r4.path("/k"))[0] == b"stale"
    # r3 collects now (a short grace after a restart) and publishes its null.
    fed.stop("r3")
    fed.write_config("r3", peers=["r1", "r2"], tombstone_grace=GRACE, max_clock_skew=2)
    fed.start("r3")
    procs.wait_for(lambda: r4.client.exists(r4.path("/k")) is None, 60,
                   message=lambda: "r3's null did not remove the resurrected /k at r4")
    # The bridge logs the apply once its multi returned: the test may see /k
    # gone first.
    procs.wait_for(lambda: fed.count_events("r4", "null_record_applied") >= 1, 10,
                   message="r4 removed /k but never logged null_record_applied")
    assert fed.count_events("r4", "null_record_applied") == 1
    procs.wait_for(lambda: not held(fed, "r4", ["/k"]) and not held(fed, "r3", ["/k"]), 60,
                   message=lambda: "the tombstone the null left at r4 was never collected")
    fed.wait_converged()
    assert fed.tree("r4") == fed.tree("r1") == {"/kept": b"yes"}
    harness_report("null records: r4 took r3's stale put of /k while bootstrapping, and "
                   "r3's null removed it")
    fed.assert_clean_logs()
