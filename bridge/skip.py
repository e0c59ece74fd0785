"""An operator's skip of one batch a peer's stream waits on (clock skew), by znode.

The stream of a peer whose events are stamped too far ahead waits rather
than poison this region's clock. When an operator decides the record is bad
(a broken clock, a hostile writer), ``zkbridge skip`` names it by topic,
partition and offset; the waiting bridge finds the request under the state
path, leaves that batch out, logs and reports who skipped what, and removes
the request. A request is refused unless the bridge reports waiting on that
very record, so no request can lie in wait for a later one.
"""

from __future__ import annotations

import getpass
import json
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bridge.zk import ZooKeeper


def skips_path(state_path: str) -> str:
    return f"{state_path}/skips"


def where(topic: str, partition: int, offset: int) -> str:
    """How logs, status and the CLI name a waiting record."""
    return f"{topic}[{partition}]@{offset}"


@dataclass(frozen=True, slots=True)
class SkipRequest:
    topic: str
    partition: int
    offset: int
    by: str
    at_ms: int

    @property
    def name(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"

    def encode(self) -> bytes:
        return json.dumps({"by": self.by, "at_ms": self.at_ms}).encode()

    @staticmethod
    def parse(name: str, raw: bytes) -> SkipRequest | None:
        try:
            topic, part, off = name.rsplit(":", 2)
            doc = json.loads(raw)
            return SkipRequest(topic, int(part), int(off), str(doc["by"]), int(doc["at_ms"]))
        except (ValueError, KeyError, TypeError):
            return None


def new_request(topic: str, partition: int, offset: int) -> SkipRequest:
    return SkipRequest(topic, partition, offset, f"{getpass.getuser()}@{socket.gethostname()}",
                       int(time.time() * 1000))


async def find(zk: ZooKeeper, state_path: str, topic: str, partition: int, first: int,
               last: int) -> SkipRequest | None:
    """A request naming any record from ``first`` to ``last`` of that partition."""
    root = skips_path(state_path)
    for name in await zk.children(root) or []:
        node = await zk.get(f"{root}/{name}")
        req = SkipRequest.parse(name, node.data) if node is not None else None
        if (req is not None and req.topic == topic and req.partition == partition
                and first <= req.offset <= last):
            return req
    return None


async def remove(zk: ZooKeeper, state_path: str, req: SkipRequest) -> None:
    await zk.delete(f"{skips_path(state_path)}/{req.name}")


async def request(zk: ZooKeeper, state_path: str, req: SkipRequest) -> None:
    await zk.ensure_path(skips_path(state_path))
    await zk.create(f"{skips_path(state_path)}/{req.name}", req.encode())


def waiting_on(waiting: Mapping[str, Mapping[str, Any]], topic: str, partition: int,
               offset: int) -> bool:
    """Does a status record's ``waiting`` name the batch holding that record?"""
    for w in waiting.values():
        first, last = w.get("first_offset"), w.get("offset")
        if (w.get("topic") == topic and w.get("partition") == partition
                and isinstance(first, int) and isinstance(last, int) and first <= offset <= last):
            return True
    return False
