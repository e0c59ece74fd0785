"""A rolling restart of a three-node Apache Kafka cluster while every region writes.

What operators do to upgrade or reconfigure Kafka: one node at a time, a
clean stop (its partition leaderships move to the others first), a start,
then wait until its replicas are back in sync before the next. Topics are
replicated three times (the broker default the bridge asks for with
``replication_factor: -1``) with ``min.insync.replicas`` 2, so ``acks=all``
producers go on while one node is down. Leaders move three times under the
bridges' producers, consumers and end-offset probes: nothing acknowledged may
be lost, and no moved leader may look like a topic that lost records (a
stream rewound to its start, an alarm in ``status``).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ZkServers
from tests.harness.cluster import REPLICATION, ClusterNode, KafkaCluster, wait_in_sync
from tests.harness.procs import free_port, wait_for
from tests.harness.sdnotify import NotifySocket
from tests.integration.federation import Federation, scrape

pytestmark = pytest.mark.integration

REGIONS = ("r1", "r2", "r3")
WRITE_INTERVAL = 0.05  # per region: about 20 acknowledged writes a second
# Events a moved leader must never cause: each means the bridge took the
# topic for one that lost records, or its own for another ensemble's.
FALSE_ALARMS = {"topic_lost_records", "own_topic_lost_records", "own_topic_reannounced",
                "clock_collision", "duplicate_region"}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[KafkaCluster]:
    c = KafkaCluster(tmp_path / "kafka")
    c.start()
    try:
        yield c
    finally:
        c.close()


class Writers:
    """A thread per region creating its own znodes and moving its own pointer, each
    write recorded once ZooKeeper acknowledged it."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self.acked: dict[str, list[int]] = {name: [] for name in fed.regions}
        self.failed: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._write, args=(name,), daemon=True)
                         for name in fed.regions]

    def _write(self, name: str) -> None:
        r = self.fed[name]
        i = 0
        try:
            while not self._stop.is_set():
                r.client.create(r.path(f"/{name}-{i:05d}"), b"%d" % i)
                r.client.set(r.path(f"/{name}-ptr"), b"%d" % i)
                self.acked[name].append(i)
                i += 1
                time.sleep(WRITE_INTERVAL)
        except BaseException as exc:  # a thread's error would otherwise only be a warning
            self.failed.append(exc)

    def __enter__(self) -> Writers:
        for name in self.fed.regions:
            r = self.fed[name]
            r.client.create(r.path(f"/{name}-ptr"), b"-1")
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def test_a_rolling_restart_of_the_kafka_cluster_under_load_loses_nothing_and_alarms_nothing(
    cluster: KafkaCluster, tmp_path: Path, token: str, zk_servers: ZkServers,
    harness_report: Callable[[str], None],
) -> None:
    fed = Federation(tmp_path, token, cluster, dict(zip(REGIONS, zk_servers.regions,
                                                        strict=True)))
    try:
        fed.start_all()
        topics = [f"{fed.prefix}.{fed.subtree}.{name}" for name in REGIONS]
        wait_in_sync(cluster, topics)
        before = cluster.replicas(topics)
        assert all(len(replicas) == REPLICATION for _, replicas, _ in before.values()), before
        took = []
        with Writers(fed) as writers:
            wait_for(lambda: min(len(a) for a in writers.acked.values()) >= 20, 30,
                     message="the writers did not get going")
            for index in range(len(cluster.nodes)):
                took.append(cluster.restart_node(index))
                wait_in_sync(cluster, topics)
                time.sleep(2)  # writes flow with every replica back before the next
            assert not writers.failed, writers.failed
        moved = {tp for tp, placed in cluster.replicas(topics).items()
                 if placed[0] != before[tp][0]}
        fed.wait_converged(timeout=120)

        for name in REGIONS:
            last = writers.acked[name][-1]
            for other in REGIONS:
                r = fed[other]
                assert r.client.get(r.path(f"/{name}-ptr"))[0] == b"%d" % last, (other, name)
                mine = {c for c in r.client.get_children(r.path()) if c.startswith(f"{name}-0")}
                missing = [i for i in writers.acked[name] if f"{name}-{i:05d}" not in mine]
                assert not missing, f"{other} lacks {len(missing)} of {name}'s: {missing[:5]}"
        alarms = [(name, e) for name in REGIONS for e in fed.events(name)
                  if e.get("event") in FALSE_ALARMS]
        assert not alarms, alarms

        said: dict[str, list[str]] = {}

        def settled() -> bool:
            # Errors noted while a node was down stay in the verdict for a minute
            # (ERRORS); nothing else may be wrong: no stream behind or stuck, no
            # topic reset, no re-announcement.
            for n in REGIONS:
                doc = json.loads(fed.cli("status", "-c", str(fed[n].config_path),
                                         "--json").stdout)
                said[n] = [p["kind"] for p in doc["verdict"]["problems"]]
            return all(set(kinds) <= {"ERRORS"} for kinds in said.values())

        wait_for(settled, 30, interval=1, message=lambda: f"status problems: {said}")
        retries = sum(1 for name in REGIONS for e in fed.events(name)
                      if e.get("event") == "retrying")
        fed.assert_clean_logs(allowed={"retrying"})
        harness_report(
            "kafka rolling restart: nodes back in "
            + ", ".join(f"{t:.1f}s" for t in took)
            + f"; {sum(len(a) for a in writers.acked.values())} acknowledged writes (+ as "
            f"many pointer moves) all in every region; leaders of {len(moved)} of "
            f"{len(before)} topics ended elsewhere; {retries} retrying lines")
    finally:
        fed.close()



def test_a_topic_whose_only_replica_is_down_holds_back_its_subtree_only(
    cluster: KafkaCluster, tmp_path: Path, token: str, zk_servers: ZkServers,
) -> None:
    """r2's topic for the subtree `side` was made by hand with one replica, and the
    node holding it stops. r2's other subtree goes on reaching r1, and r1 says that
    r2 is silent on `side` only, heard elsewhere, so its bridge runs and cannot
    write that topic. Both regions name the partition without a leader, and `lag`
    measures the rest. r1, reloaded with `/later` no longer excluded, reads `side`
    again for it only once the partition has a leader, and the rest meanwhile. r1
    restarted meanwhile (`/local` no longer excluded either, so both join) applies
    r2's other subtree at once and waits for the partition only to say it is ready,
    and to publish what joins; r2 restarted meanwhile
    publishes and applies its other subtree at once, and surveys `side` (whose own
    topic it is) once the partition has a leader. With the node back, what r2
    wrote on `side` meanwhile arrives.
    Before, r2's one publisher waited on `side` with everything behind it: r1 got
    nothing more from r2 and called it silent on both subtrees; every topic check
    timed out (status: "no answer within 5s"), `lag` failed (exit 2), and a
    restarted r1 or r2 applied nothing until the node was back."""
    fed = Federation(tmp_path, token, cluster, dict(zip(REGIONS[:2], zk_servers.regions,
                                                        strict=False)))
    notify = {n: NotifySocket(tmp_path / f"{n}.notify") for n in REGIONS[:2]}
    try:
        r1, r2 = fed["r1"], fed["r2"]

        side = partial(_side, fed)

        def got(path: str) -> bool:
            return r1.client.exists(path) is not None

        port = free_port()
        node = _side_on_one_node(fed, cluster, port, r1_excludes=("/local", "/later"))
        for rel in ("/local", "/later"):  # excluded: not replicated
            r1.client.create(side("r1", rel), b"r1 only")
        r2.client.create(side("r2", "/before"), b"1")
        wait_for(lambda: got(side("r1", "/before")), 30)
        node.stop()
        try:
            # A reload takes `/later` out of r1's exclude list: `side` is read again for
            # it once r2's partition has a leader, and every other topic meanwhile
            # (r2's writes on critical below). Before, asking for that partition's
            # start held r1's fetching of every topic up until the node was back.
            fed.write_config("r1", subtrees=_side_subtrees(fed, "r1", ("/local",)))
            assert r1.proc is not None
            r1.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: fed.count_events("r1", "topic_read_again_waits") == 1, 30,
                     message="r1's re-read for /later did not wait for the partition")
            said: list[str] = []

            def shows_join() -> bool:
                said[:] = [fed.cli("status", "-c", str(r1.config_path)).stdout]
                return "joining /later: 1 znodes set aside, published once" in said[0]

            wait_for(shows_join, 15, interval=1, message=lambda: f"r1's status: {said}")
            r2.client.create(side("r2", "/while"), b"2")
            for i in range(3):
                r2.client.create(r2.path(f"/while-{i}"), b"2")
                wait_for(lambda i=i: got(r1.path(f"/while-{i}")), 60,  # type: ignore[misc]
                         message=f"r2's write {i} on {fed.subtree} never reached r1")
                time.sleep(5)
            wait_for(lambda: fed.count_events("r1", "peer_silent") > 0, 30,
                     message="r1 never said r2 was silent on side")
            [silent] = [e for e in fed.events("r1") if e["event"] == "peer_silent"]
            assert (silent["peer"], silent["subtree"]) == ("r2", "side"), silent
            assert "r2 is heard on critical, so its bridge runs" in silent["hint"], silent
            assert "cannot write that subtree's topic" in silent["hint"], silent
            status = fed.cli("status", "-c", str(r1.config_path)).stdout
            assert "SILENT: no heartbeat from r2 (side)" in status, status
            mine = json.loads(fed.cli("status", "-c", str(r2.config_path), "--json").stdout)
            depth = {n: st["outbox"] for n, st in mine["subtrees"].items()}
            assert depth["side"] >= 1 and depth[fed.subtree] == 0, depth
            assert not got(side("r1", "/while"))
            # Named where each region looks, and `lag` still measures the rest.
            topic = f"{fed.prefix}.side.r2"
            said = f"no leader for {topic} partition 0"
            assert any(said in e["error"] for e in mine["recent_errors"]), mine
            for name in fed.regions:
                [line] = [e for e in fed.events(name) if e["event"] == "partition_leaderless"]
                assert line["partitions"] == f"{topic} partition 0", line
            gauge = 'zkbridge_partitions_leaderless{{topic="{}"}}'.format
            seen = scrape(port)
            assert (seen[gauge(topic)], seen[gauge(f"{fed.prefix}.{fed.subtree}.r2")]) == (
                1, 0), seen
            lag = fed.cli("lag", "-c", str(r1.config_path))
            assert lag.returncode == 0, lag.stderr
            assert f"! side/r2: {topic}[0] has no leader" in lag.stdout, lag.stdout
            assert f"\n{fed.subtree}  r2 " in lag.stdout, lag.stdout
            # r1 restarted meanwhile applies the rest at once, and is ready once the
            # partition it reads has a leader again. Without a position for it (a
            # new region's start), nor does finding the partition's start hold it
            # up: it waited the request timeout (made longer than the wait below).
            # Its exclude list no longer holds `/local` either, which joins with `/later`:
            # published once the peers' versions are read, r2's from the partition
            # without a leader too.
            assert fed.stop("r1") == 0
            r1.client.delete(f"{fed.state_path}/subtrees/side/positions/r2")
            fed.write_config("r1", kafka={"request_timeout": 90},
                             subtrees=_side_subtrees(fed, "r1"))
            ready_before = fed.count_events("r1", "bridge_ready")
            joined_before = fed.count_events("r1", "subtree_joined")
            fed.start("r1", wait=False, env={"NOTIFY_SOCKET": notify["r1"].path})
            r2.client.create(r2.path("/r1-restarted"), b"3")
            wait_for(lambda: got(r1.path("/r1-restarted")), 60,
                     message="restarted, r1 applied nothing while a partition had no leader")
            shown: list[str] = []

            def waiting() -> bool:
                shown[:] = [fed.cli("status", "-c", str(r1.config_path)).stdout]
                return f"waiting for a leader of {topic} partition 0" in shown[0]

            wait_for(waiting, 30, interval=1, message=lambda: f"r1's status: {shown}")
            # Restarting it could not mend that: systemd hears it is ready, and is not
            # left to time the start out and restart it over and over; nor while a join
            # waits on that partition too.
            notify["r1"].wait_ready(f"waiting for a leader of {topic} partition 0")
            assert fed.count_events("r1", "bridge_ready") == ready_before
            assert fed.count_events("r1", "subtree_joined") == joined_before
            # The re-read of `side` waits again (`/r2-publishes` below arrives meanwhile).
            waits = [e for e in fed.events("r1") if e["event"] == "topic_read_again_waits"]
            assert len(waits) == 2 and waits[-1]["partitions"] == f"{topic} partition 0", waits
            assert r2.client.exists(side("r2", "/local")) is None
            # r2 restarted meanwhile, whose own partition has none: its other subtree
            # publishes and applies at once, and `side` waits for its survey.
            assert fed.stop("r2") == 0
            fed.start("r2", wait=False, env={"NOTIFY_SOCKET": notify["r2"].path})
            r1.client.create(r1.path("/r2-restarted"), b"4")
            wait_for(lambda: r2.client.exists(r2.path("/r2-restarted")) is not None, 60,
                     message="restarted, r2 applied nothing while its own partition had "
                             "no leader")
            r2.client.create(r2.path("/r2-publishes"), b"5")
            r2.client.create(side("r2", "/after"), b"6")
            wait_for(lambda: got(r1.path("/r2-publishes")), 60,
                     message="restarted, r2 published nothing while its own partition had "
                             "no leader")
            [held] = [e for e in fed.events("r2") if e["event"] == "own_topic_leaderless"]
            assert (held["subtree"], held["topic"], held["partitions"]) == (
                "side", topic, [0]), held

            def own_waiting() -> bool:
                shown[:] = [fed.cli("status", "-c", str(r2.config_path)).stdout]
                return (f"waiting for a leader of {topic} (this region's own: side "
                        "publishes nothing until then)") in shown[0]

            wait_for(own_waiting, 30, interval=1, message=lambda: f"r2's status: {shown}")
            notify["r2"].wait_ready(f"waiting for a leader of {topic} (this region's own")
            assert not got(side("r1", "/while")) and not got(side("r1", "/after"))
        finally:
            node.start()
        for rel in ("/while", "/after"):
            wait_for(lambda rel=rel: got(side("r1", rel)), 90,  # type: ignore[misc]
                     message=f"r2's write {rel} on side never arrived once the node was back")
        for rel in ("/local", "/later"):
            wait_for(lambda rel=rel: r2.client.exists(  # type: ignore[misc]
                side("r2", rel)) is not None, 60,
                message=f"r1's joined path {rel} never reached r2 once the node was back")
        joined = [e for e in fed.events("r1") if e["event"] == "subtree_joined"][-1]
        assert (joined["subtree"], joined["published"], sorted(joined["paths"])) == (
            "side", 2, ["/later", "/local"]), joined
        wait_for(lambda: fed.count_events("r2", "own_topic_surveyed") > 0, 30,
                 message="r2 never surveyed its own topic of side")
        [surveyed] = [e for e in fed.events("r2") if e["event"] == "own_topic_surveyed"]
        assert surveyed["subtrees"] == ["side"], surveyed
        for name in fed.regions:
            fed.wait_ready(name, timeout=60)
        for name, n in notify.items():
            wait_for(lambda n=n, name=name: any(  # type: ignore[misc]
                f"STATUS=leader in region {name}, caught up" in m for m in n.drain()), 10,
                message=f"{name} did not tell systemd it caught up")

        def heard() -> bool:  # r1 restarted while r2 was silent: no SILENT left
            doc = json.loads(fed.cli("status", "-c", str(r1.config_path), "--json").stdout)
            return "SILENT" not in {p["kind"] for p in doc["verdict"]["problems"]}

        wait_for(heard, 30, interval=1, message="r1 still calls r2 silent")
        wait_for(lambda: scrape(port)[gauge(topic)] == 0, 10,
                 message="the gauge still counts the partition without a leader")
        fed.wait_converged(timeout=60)
        fed.assert_clean_logs(allowed={"peer_silent", "retrying", "producer_reset",
                                       "drain_incomplete"})
    finally:
        fed.close()
        for n in notify.values():
            n.close()


def _side(fed: Federation, name: str, rel: str = "") -> str:
    return f"/{fed.token}/{name}-side{rel}"


def _side_subtrees(fed: Federation, name: str, exclude: tuple[str, ...] = ()
                   ) -> list[dict[str, Any]]:
    return [{"name": fed.subtree, "path": fed[name].mount},
            {"name": "side", "path": _side(fed, name), "exclude": list(exclude)}]


def _side_on_one_node(fed: Federation, cluster: KafkaCluster, metrics_port: int = 0,
                      r1_excludes: tuple[str, ...] = ()) -> ClusterNode:
    """Two subtrees, `critical` and `side` (r1's excluding ``r1_excludes``), r2's topic
    for `side` made by hand with one replica, on the cluster's third node (returned);
    the bridges started and ready."""
    node = cluster.nodes[2]
    cluster.create_topic(f"{fed.prefix}.side.r2", [node.node_id], {"cleanup.policy": "compact"})
    for name in fed.regions:
        fed[name].client.ensure_path(_side(fed, name))
        fed.write_config(name, subtrees=_side_subtrees(
                             fed, name, r1_excludes if name == "r1" else ()),
                         **({"metrics": {"listen": f"127.0.0.1:{metrics_port}"}}
                            if name == "r1" and metrics_port else {}))
        fed.start(name, wait=False)
    for name in fed.regions:
        fed.wait_ready(name)
    return node


def test_a_region_wiped_while_its_own_partition_has_no_leader_replays_it_once_led(
    cluster: KafkaCluster, tmp_path: Path, token: str, zk_servers: ZkServers,
) -> None:
    """r2's ensemble loses everything (a lost disk) while its topic for `side` has no
    leader, and r2 starts again. `critical` is rebuilt at once: r2's own writes are
    replayed from its own topic, r1's applied. `side` applies r1's writes, but r2's
    own, which only its own topic still has, wait for the survey; once the partition
    has a leader they are replayed in the middle of the term, under way for the rest."""
    fed = Federation(tmp_path, token, cluster, dict(zip(REGIONS[:2], zk_servers.regions,
                                                        strict=False)))
    try:
        r1, r2 = fed["r1"], fed["r2"]
        side = partial(_side, fed)
        node = _side_on_one_node(fed, cluster)
        r2.client.create(side("r2", "/mine"), b"side of r2")
        r2.client.create(r2.path("/mine"), b"critical of r2")
        r1.client.create(side("r1", "/theirs"), b"side of r1")
        r1.client.create(r1.path("/theirs"), b"critical of r1")
        for path in (side("r1", "/mine"), r1.path("/mine")):
            wait_for(lambda path=path: r1.client.exists(path) is not None,  # type: ignore[misc]
                     30, message=f"{path} never reached r1")
        assert fed.stop("r2") == 0
        node.stop()
        try:
            r2.server.wipe()
            r2.client.restart()  # one that saw later zxids is refused by the wiped server
            wait_for(lambda: r2.client.connected and r2.client.exists("/") is not None, 30)
            r2.client.ensure_path(r2.mount)
            r2.client.ensure_path(side("r2"))
            fed.start("r2", wait=False)

            def has(path: str, data: bytes) -> bool:
                return r2.client.exists(path) is not None and r2.client.get(path)[0] == data

            for path, data in ((r2.path("/mine"), b"critical of r2"),
                               (r2.path("/theirs"), b"critical of r1"),
                               (side("r2", "/theirs"), b"side of r1")):
                wait_for(lambda p=path, d=data: has(p, d), 90,  # type: ignore[misc]
                         message=f"r2 never got {path} back while its side topic had no leader")
            wait_for(lambda: fed.count_events("r2", "own_topic_leaderless") > 0, 10)
            assert not r2.client.exists(side("r2", "/mine"))  # only the held topic has it
            assert fed.count_events("r2", "own_topic_surveyed") == 0
        finally:
            node.start()
        wait_for(lambda: has(side("r2", "/mine"), b"side of r2"), 90,
                 message="r2's own write on side was not replayed once the node was back")
        [surveyed] = [e for e in fed.events("r2") if e["event"] == "own_topic_surveyed"]
        assert surveyed["subtrees"] == ["side"] and surveyed["replayed"] >= 1, surveyed
        for name in fed.regions:
            fed.wait_ready(name, timeout=60)
        fed.wait_converged(timeout=60)
        fed.assert_clean_logs(allowed={"peer_silent", "retrying", "producer_reset"})
    finally:
        fed.close()
