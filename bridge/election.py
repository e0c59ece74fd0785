"""Leader election among one region's bridges, in the region's own ensemble.

Each bridge owns an ephemeral sequential candidate znode; the oldest leads,
every other one watches only its predecessor (no herd on a leader change).
The candidate dies with its session, so a leader that lost its session has
lost its place; the epoch check in every multi is what makes that safe.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from bridge.zk import ZooKeeper

Retry = Callable[[str, Callable[[], Awaitable[bool]]], Awaitable[bool]]


def _sequence(name: str) -> str:
    return name.rsplit("-", 1)[-1]


class Election:
    def __init__(self, zk: ZooKeeper, path: str, identity: str, *, retry: Retry,
                 on_standby: Callable[[str], None]) -> None:
        self.zk = zk
        self.path = path
        self.identity = identity
        self._retry = retry
        self._on_standby = on_standby
        self._candidate = ""

    async def wait(self) -> None:
        """Return once this bridge's candidate is the oldest: it leads.

        A candidate that outlived the previous term (its start failed on a
        lost connection, the session went on) keeps its place: a new one
        behind it would wait for it forever.
        """
        while not await self._retry("election", self._step):
            pass

    async def _step(self) -> bool:
        """One look: True when we lead; otherwise wait for our predecessor to go.

        Retriable as a whole: the candidate name survives a retry, and a
        candidate lost with an expired session is simply created again.
        """
        await self.zk.ensure_path(self.path)
        names = await self.zk.children(self.path) or []
        if not self._candidate or self._candidate not in names:
            created = await self.zk.create(f"{self.path}/n-", self.identity.encode(),
                                           ephemeral=True, sequence=True)
            self._candidate = created.rsplit("/", 1)[1]
            return False
        ordered = sorted(names, key=_sequence)
        index = ordered.index(self._candidate)
        if index == 0:
            return True
        # Another bridge leads this region: we serve as its standby.
        self._on_standby(ordered[0])
        await self.zk.wait_deleted(f"{self.path}/{ordered[index - 1]}")
        return False
