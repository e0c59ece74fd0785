"""Apache Kafka as a cluster of three KRaft nodes: topics replicated three times, leaders that move.

Each node is a ``KafkaBroker`` (broker and controller in one process) with its
own ports and log dirs; the three form the controller quorum and share one
cluster id. Topics default to replication factor 3 with ``min.insync.replicas``
2, as production clusters are set, so one node may be down while producers
with ``acks=all`` go on. ``restart_node`` is one step of a rolling restart.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from tests.harness import procs
from tests.harness.broker import Broker, KafkaBroker, _kafka_uuid

REPLICATION = 3
MIN_INSYNC = 2
# A partition's leader, its replicas and those in sync, as the metadata says.
Placement = tuple[int, list[int], list[int]]


class ClusterNode(KafkaBroker):
    """One node of a ``KafkaCluster``: its id, and the quorum it votes in."""

    def __init__(self, base_dir: Path, node_id: int, cluster_id: str) -> None:
        super().__init__(base_dir)
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.voters = ""  # set by the cluster once every node has its ports

    def server_properties(self) -> dict[str, str]:
        props = super().server_properties()
        props.update({
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.voters,
            "default.replication.factor": str(REPLICATION),
            "min.insync.replicas": str(MIN_INSYNC),
            "offsets.topic.replication.factor": str(REPLICATION),
            "transaction.state.log.replication.factor": str(REPLICATION),
            "transaction.state.log.min.isr": str(MIN_INSYNC),
            "share.coordinator.state.topic.replication.factor": str(REPLICATION),
            "share.coordinator.state.topic.min.isr": str(MIN_INSYNC),
        })
        return props


class KafkaCluster(Broker):
    """Three ``ClusterNode``s; clients bootstrap from all of them."""

    kind = "kafka"

    def __init__(self, base_dir: Path | None = None, size: int = 3,
                 start_timeout: float = 120.0) -> None:
        own = base_dir is None
        base = base_dir or Path(tempfile.mkdtemp(prefix="zkbridge-kafka-cluster-"))
        cluster_id = _kafka_uuid()
        self.nodes = [ClusterNode(base / f"node{i}", i, cluster_id) for i in range(1, size + 1)]
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        for n in self.nodes:
            n.voters = voters
            n.start_timeout = start_timeout
        super().__init__(base, self.nodes[0].port, start_timeout=start_timeout)
        self._own_dir = own

    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.nodes)

    @property
    def internal_bootstrap(self) -> str:
        return ",".join(n.internal_bootstrap for n in self.nodes)

    @property
    def running(self) -> bool:
        return all(n.running for n in self.nodes)

    def start(self) -> KafkaCluster:
        # Together: a node waits for a quorum of controllers before it serves.
        t0 = time.monotonic()
        for n in self.nodes:
            n.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(n.log_path, "a") as log:
                log.write(f"==== {time.strftime('%H:%M:%S')} starting node {n.node_id}\n")
            n._proc = n._launch()
        try:
            for n in self.nodes:
                n._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def restart_node(self, index: int) -> float:
        """Stop one node cleanly (its leaderships move first) and start it again; the
        seconds that took."""
        t0 = time.monotonic()
        node = self.nodes[index]
        node.stop()
        node.start()
        return time.monotonic() - t0

    def stop(self, deadline: float = 60.0) -> None:
        for n in self.nodes:
            n.stop(deadline)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def replicas(self, topics: list[str]) -> dict[tuple[str, int], Placement]:
        """(topic, partition) → (leader, replicas, in-sync replicas), from the metadata."""
        from aiokafka.admin import AIOKafkaAdminClient

        async def go() -> dict[tuple[str, int], Placement]:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.internal_bootstrap)
            await admin.start()
            try:
                return {(t["topic"], p["partition"]): (p["leader"], p["replicas"], p["isr"])
                        for t in await admin.describe_topics(topics)
                        for p in t["partitions"]}
            finally:
                await admin.close()

        return asyncio.run(go())

    def create_topic(self, name: str, replicas: list[int], configs: dict[str, str]) -> None:
        """One partition of ``name`` placed on ``replicas`` (node ids), as an operator
        who makes a topic by hand might."""
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        async def go() -> None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.internal_bootstrap)
            await admin.start()
            try:
                resp = await admin.create_topics([NewTopic(
                    name=name, num_partitions=-1, replication_factor=-1,
                    replica_assignments={0: replicas}, topic_configs=configs)])
                assert all(err[1] == 0 for err in resp.topic_errors), resp.topic_errors
            finally:
                await admin.close()

        asyncio.run(go())

    def __repr__(self) -> str:
        pids = ", ".join(str(n.pid) for n in self.nodes)
        return f"KafkaCluster({self.bootstrap}, pids {pids})"


def wait_in_sync(cluster: KafkaCluster, topics: list[str], timeout: float = 60.0) -> None:
    """Until every partition of ``topics`` has all its replicas in sync again."""
    seen: dict[tuple[str, int], Placement] = {}

    def full() -> bool:
        seen.clear()
        seen.update(cluster.replicas(topics))
        return bool(seen) and all(len(isr) == REPLICATION for _, _, isr in seen.values())

    procs.wait_for(full, timeout, interval=0.5,
                   message=lambda: f"replicas not back in sync: {seen}")
