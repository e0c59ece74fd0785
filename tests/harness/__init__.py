"""Real servers for integration tests: ZooKeeper, a Kafka broker, a fault-injecting TCP proxy."""

from tests.harness.broker import (
    Broker,
    BrokerError,
    KafkaBroker,
    KafkaSecurity,
    TansuBroker,
    make_broker,
)
from tests.harness.procs import free_port, kill9, log_tail, spawn, stop, wait_for
from tests.harness.proxy import TcpProxy
from tests.harness.zookeeper import ZooKeeperError, ZooKeeperServer, start_all

__all__ = [
    "Broker",
    "BrokerError",
    "KafkaBroker",
    "KafkaSecurity",
    "TansuBroker",
    "TcpProxy",
    "ZooKeeperError",
    "ZooKeeperServer",
    "free_port",
    "kill9",
    "log_tail",
    "make_broker",
    "spawn",
    "start_all",
    "stop",
    "wait_for",
]
