"""Real servers for integration tests: ZooKeeper, a Kafka broker, a fault-injecting TCP proxy."""

from tests.harness.broker import Broker, BrokerError
from tests.harness.procs import free_port, kill9, log_tail, spawn, stop, wait_for
from tests.harness.proxy import TcpProxy
from tests.harness.zookeeper import ZooKeeperError, ZooKeeperServer, start_all

__all__ = [
    "Broker",
    "BrokerError",
    "TcpProxy",
    "ZooKeeperError",
    "ZooKeeperServer",
    "free_port",
    "kill9",
    "log_tail",
    "spawn",
    "start_all",
    "stop",
    "wait_for",
]
