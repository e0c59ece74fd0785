"""A peer's backlog applied as a chain: each group's ``multi`` sent before the last answers.

One group at a time, the receiver's server sat idle while the bridge read
and planned the next group, and the bridge while the server ran the
``multi`` (at a start-up catch-up, both about as long). A chain reads the
paths of every group at once, then plans each group over the state the
groups before it leave (their views and metadata, as if committed) and
sends its ``multi`` at once: the server runs one while the next is planned.

Order and atomicity are those of single applies, on one session:

* ZooKeeper runs a session's requests in the order sent, so group k commits
  before group k+1 or not at all;
* every ``multi`` also writes the peer's position znode, at the version the
  one before it leaves: if a ``multi`` fails, every later one of the chain
  fails on that check, and nothing after a gap commits;
* a path written by an application meanwhile fails its ``multi``'s version
  check, as in a single apply.

A chain stops before any group that needs more than a plain apply (local
changes to capture first, more reads, held events, ACLs to converge after
the ``multi``): the caller applies it and the rest one by one. After a
failed ``multi`` the caches go back to what the committed prefix left, and
what the failed ones touched is read again before the next write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from bridge.capture import Capturing
from bridge.errors import NoPermission
from bridge.layout import parent
from bridge.model import Event
from bridge.plan import Applied, MetaEntry, NeedRead, Plan, View, view_of
from bridge.zk import Node


class Chaining(Capturing):
    async def apply_chain(self, parts: Sequence[tuple[Sequence[Event], dict[int, int]]],
                          peer: str) -> list[Applied]:
        """Apply consecutive groups of ``peer``'s events, each with its new positions.

        Returns what each group of the committed prefix did; the caller
        applies the others one by one (``SubtreeStore.apply``). Raises what
        a read raises (what was sent is then read again before the next
        write, as after a failed ``multi``), or a cancellation.
        """
        await self._settle()
        if self.held_events and any(e.path in self.held_events for events, _ in parts
                                    for e in events):
            return []  # their records ride on the apply that settles them
        wanted = [({e.path for e in events} | {parent(e.path) for e in events}) - {"/"}
                  for events, _ in parts]
        # Every group's read is queued at once; the first group is planned as
        # soon as its own answer is in. A read answered after a multi of the
        # chain shows what that multi wrote: a view already held is kept.
        reading = [asyncio.ensure_future(self._read(rels)) for rels in wanted]
        reads: dict[str, Node | NoPermission | None] = {}
        views: dict[str, View | None] = {}
        written: set[str] = set()  # znodes the planned groups write: not as read any more
        sent: list[tuple[Plan, Applied, asyncio.Future[tuple[list[object], int]]]] = []
        undo: list[dict[str, MetaEntry | None]] = []
        try:
            for (events, positions), rels, read in zip(parts, wanted, reading, strict=True):
                for r, n in (await read).items():
                    if r not in written:
                        reads[r] = n
                    if r not in views and not isinstance(n, NoPermission):
                        views[r] = view_of(n)
                if self.unannounced(reads, rels - written):
                    break
                try:
                    plan, result = self._plan_apply(events, reads, views=views)
                except NeedRead:
                    break
                if plan.held or plan.acls:
                    break
                plan.ops.append(self.positions.op(peer, positions))
                sent.append((plan, result, asyncio.ensure_future(self.zk.commit(plan.ops))))
                undo.append({r: self.metas.get(r) for r in plan.metas})
                self._commit(plan)
                self.positions.written(peer)
                written |= self.written(plan)
                await asyncio.sleep(0)  # sent: the next group is planned meanwhile
            for task in reading:  # of groups after a stop
                task.cancel()
            await asyncio.gather(*reading, return_exceptions=True)
            return await self._confirm(sent, undo, peer)
        except BaseException:
            self._doubt([p for p, _, _ in sent], undo, peer)
            dropped: list[asyncio.Future[Any]] = [*reading, *(f for _, _, f in sent)]
            for left in dropped:
                left.add_done_callback(_retrieved)
                left.cancel()
            raise

    async def _confirm(self, sent: list[tuple[Plan, Applied,
                                               asyncio.Future[tuple[list[object], int]]]],
                       undo: list[dict[str, MetaEntry | None]], peer: str) -> list[Applied]:
        """The answers, in order: the committed prefix's results; the rest undone."""
        done: list[Applied] = []
        for i, (plan, result, fut) in enumerate(sent):
            try:
                _, frame = await fut
            except Exception:
                # The later ones fail on the position's version; their
                # answers are awaited so nothing of the chain is left in flight.
                await asyncio.gather(*(f for _, _, f in sent[i + 1:]), return_exceptions=True)
                self._doubt([p for p, _, _ in sent[i:]], undo[i:], peer)
                return done
            self.settled(self.written(plan), frame)
            done.append(result)
        return done

    def _doubt(self, plans: Sequence[Plan], undo: Sequence[dict[str, MetaEntry | None]],
               peer: str) -> None:
        """Forget what ``plans`` assumed, latest first; read it again before the next write.

        A ``multi`` whose answer was lost may have committed: the metadata it
        touched and the peer's position are read back (``_settle``).
        """
        for before in reversed(undo):
            for rel, entry in before.items():
                if entry is None:
                    self.metas.pop(rel, None)
                else:
                    self.metas[rel] = entry
        for plan in plans:
            self._suspect |= set(plan.metas)
        self._suspect_peers.add(peer)


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Take a dropped task's outcome, so that asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()
