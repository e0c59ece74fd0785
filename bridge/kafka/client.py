"""The Kafka client one bridge uses (``Kafka``): topic administration,
producing and consuming, on one config, and stopped together.
"""

from __future__ import annotations

import asyncio

from bridge.kafka.admin import TopicAdmin
from bridge.kafka.boundary import _close
from bridge.kafka.consuming import Consuming
from bridge.kafka.producing import Producing


class Kafka(TopicAdmin, Producing, Consuming):
    """Producer, consumer and admin client for one bridge, sharing one config."""

    async def stop(self) -> None:
        """Close both clients, each within STOP_TIMEOUT seconds.

        Nothing is lost by not waiting longer: every change that matters was
        acked before its outbox entry went, and a producer's flush against an
        unreachable broker would otherwise hold a stopping process for a
        whole request timeout.
        """
        for seeking in list(self._pending_seeks):
            seeking.cancel()
        closers = [_close(what, c) for what, c in
                   (("producer", self._producer), ("consumer", self._consumer),
                    ("query consumer", self._probe)) if c is not None]
        self._producer = self._consumer = self._probe = None
        await asyncio.gather(*closers)
