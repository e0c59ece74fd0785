"""``zkbridge check-config --connect``: whether the servers take this configuration.

Renewing a certificate, rotating a password or moving to new servers is
checked before the bridge restarts on it: one ZooKeeper session with the
bridge's own TLS and auth settings (and a read of its state's ACL, as
``status`` makes), and the one connection the bridge's Kafka clients make
first (TLS handshake, client certificate, SASL). Each side's answer is one
line; a refusal is worded as the bridge words it at start, naming the key to
fix.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from bridge import stateaccess
from bridge.config import Settings
from bridge.errors import BridgeError
from bridge.kafka import Kafka
from bridge.zk import ZooKeeper

KAFKA_TIMEOUT = 30.0  # seconds for the Kafka check, each broker's connection included


@dataclass(frozen=True, slots=True)
class Answer:
    side: str  # "zookeeper" or "kafka"
    ok: bool
    text: str


async def _zookeeper(settings: Settings) -> Answer:
    zk = ZooKeeper(settings.zookeeper, read_only=True)
    how = "TLS" if settings.zookeeper.tls else "plain"
    try:
        await stateaccess.start_checked(zk, settings)
    except BridgeError as exc:
        return Answer("zookeeper", False, str(exc))
    try:
        state = settings.state_path
        made = await zk.exists(state) is not None
        return Answer("zookeeper", True,
                      f"{settings.zookeeper.hosts}: connected ({how}), session "
                      f"{zk.session_id or 0:#x}; " + (f"{state} readable" if made else
                      f"{state} not made yet (the bridge's first start makes it)"))
    except BridgeError as exc:
        return Answer("zookeeper", False, str(exc))
    finally:
        await zk.stop()


async def _kafka(settings: Settings) -> Answer:
    kafka = Kafka(settings.kafka, client_id=f"zkbridge-{settings.region}-check")
    protocol = settings.kafka.security_protocol
    try:
        async with asyncio.timeout(KAFKA_TIMEOUT):
            await kafka.check_identity()
    except TimeoutError:
        return Answer("kafka", False, f"{settings.kafka.bootstrap_servers}: no answer within "
                      f"{KAFKA_TIMEOUT:g}s; check kafka.bootstrap_servers")
    except BridgeError as exc:
        return Answer("kafka", False, str(exc))
    finally:
        await kafka.stop()
    taken = "this bridge's identity accepted" if protocol != "PLAINTEXT" else "reachable"
    return Answer("kafka", True,
                  f"{settings.kafka.bootstrap_servers}: connected ({protocol}), {taken}")


async def preflight(settings: Settings) -> tuple[Answer, Answer]:
    """Both sides at once: a slow one does not hold the other's answer back."""
    zk, kafka = await asyncio.gather(_zookeeper(settings), _kafka(settings))
    return zk, kafka
