"""zkbridge: keep ZooKeeper subtrees identical across regions through Kafka."""

__version__ = "0.1.0"
