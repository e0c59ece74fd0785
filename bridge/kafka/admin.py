"""Topic administration: creating the bridge's compacted topics, deleting topics."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError

from bridge.errors import FatalKafkaError
from bridge.kafka.boundary import _guard
from bridge.kafka.connection import Connection
from bridge.kafka.values import DELETE_RETENTION_MS


class TopicAdmin(Connection):
    """The admin part of ``Kafka``: a short-lived admin client per call."""

    async def ensure_topics(self, names: Iterable[str]) -> list[str]:
        """Create missing topics, compacted, one partition (keeps each origin's order)."""
        await self._check_security()
        admin = AIOKafkaAdminClient(**self._common())
        created = []
        try:
            await _guard("connect admin", admin.start())
            existing = set(await _guard("list topics", admin.list_topics()))
            for name in names:
                if name in existing:
                    continue
                rf = self.settings.replication_factor
                topic = NewTopic(
                    name=name,
                    num_partitions=1,
                    replication_factor=rf,
                    # aiokafka only lets -1 (broker default) through with an
                    # assignment mapping present; an empty one assigns nothing.
                    replica_assignments={} if rf == -1 else None,
                    topic_configs={"cleanup.policy": "compact",
                                   "delete.retention.ms": str(DELETE_RETENTION_MS)},
                )
                resp = await _guard(f"create topic {name}", admin.create_topics([topic]))
                for err in resp.topic_errors:
                    # The admin client reports per-topic failures in the response
                    # instead of raising; 36 is TOPIC_ALREADY_EXISTS (a racing peer).
                    code = err[1]
                    if code == TopicAlreadyExistsError.errno:
                        continue
                    if code:
                        message = err[2] if len(err) > 2 else ""
                        raise FatalKafkaError(
                            f"cannot create topic {name}: error {code} {message}; check "
                            "kafka.replication_factor and the broker's topic ACLs, or create "
                            "it yourself with cleanup.policy=compact"
                        )
                created.append(name)
        finally:
            await admin.close()
        return created

    async def topic_configs(self, names: Sequence[str]) -> dict[str, dict[str, str]]:
        """Each topic's ``cleanup.policy`` and ``max.message.bytes`` as the broker reports
        them (DescribeConfigs)."""
        admin = AIOKafkaAdminClient(**self._common())
        try:
            await _guard("connect admin", admin.start())
            answers = await _guard("describe topic configs", admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]))
        finally:
            await admin.close()
        out: dict[str, dict[str, str]] = {}
        for answer in answers:
            # (error code, message, type, name, entries): entries (name, value, ...).
            for resource in answer.resources:
                if resource[0] == 0:
                    out[resource[3]] = {e[0]: e[1] for e in resource[4]
                                        if e[0] in ("cleanup.policy", "max.message.bytes")
                                        and e[1] is not None}
        return out

    async def delete_topics(self, names: Sequence[str]) -> None:
        admin = AIOKafkaAdminClient(**self._common())
        try:
            await _guard("connect admin", admin.start())
            await _guard("delete topics", admin.delete_topics(list(names)))
        finally:
            await admin.close()
