"""The Kafka adapter: the only package that imports aiokafka.

``client`` is the client one bridge uses (``Kafka``): topic creation
(compacted), publishing with acks=all, consuming manually assigned
partitions from positions the caller supplies, offset queries and topic ids.
aiokafka's exceptions are translated into ``bridge.errors`` inside this
package. Everything else in the bridge imports from here.
"""

from bridge.config import topic_name
from bridge.kafka.client import Kafka
from bridge.kafka.topicids import TopicIds
from bridge.kafka.values import Record

__all__ = ["Kafka", "Record", "TopicIds", "topic_name"]
