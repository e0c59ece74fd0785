"""The Kafka adapter: the only package that imports aiokafka.

``client`` is the client one bridge uses (``Kafka``), made of ``connection``
(settings, client options, the security check), ``admin`` (compacted topics),
``producing`` (acks=all) and ``consuming`` (manually assigned partitions from
positions the caller supplies, offset queries, topic ids); ``topicids`` the
Metadata v12 request aiokafka lacks, ``values`` the record and the limits,
``boundary`` aiokafka's exceptions translated into ``bridge.errors``.
Everything else in the bridge imports from here.
"""

from bridge.config import topic_name
from bridge.kafka.client import Kafka
from bridge.kafka.topicids import TopicIds
from bridge.kafka.values import Record, publish_limit

__all__ = ["Kafka", "Record", "TopicIds", "publish_limit", "topic_name"]
