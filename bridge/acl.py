"""How ZooKeeper ACLs cross regions, per subtree (``subtrees[].acl``).

``copy`` (the default): a put carries the znode's ACL from its origin and the
receiving region applies the same entries, plus one for the bridge's own
identity so it can keep managing the copy. Access is never widened: a
znode readable only by ``alice`` at its origin is readable only by ``alice``
(and the bridge) everywhere. ZooKeeper (>= 3.6) shows a digest entry's hash
only to identities with ADMIN on the znode, so a protected znode is copied
only where the bridge's identity holds ADMIN on it (or is a super user);
otherwise it is held back and reported, never copied with a broken ACL.

``open``: ACLs are not replicated and copies are world-accessible, so a
znode whose ACL is narrower than world-readable-and-writable at its origin is
held back instead of being published: widening it would leak it.

ZooKeeper cannot set an ACL inside a ``multi`` and a ``setACL`` fires no
watch, so an ACL travels with the next change of the znode's content (or a
resync); a receiver sets it right after the ``multi`` that wrote the content.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

import structlog

from bridge.errors import BridgeError
from bridge.zk import ACL_CHUNK, ACL_CHUNKS_IN_FLIGHT, WORLD_ALL, AclRead, ZooKeeper, gather_limited

log = structlog.get_logger("bridge.acl")

HOLD = "acl"  # held-back reason: the ACL is narrower than the policy may publish

# ZooKeeper's permission bits: READ 1, WRITE 2, CREATE 4, DELETE 8, ADMIN 16.
_OPEN_ENOUGH = 1 | 2 | 4 | 8


def _world_open(entries: tuple[str, ...]) -> bool:
    for entry in entries:
        perms, scheme, ident = entry.split(":", 2)
        if scheme == "world" and ident == "anyone" and int(perms) & _OPEN_ENOUGH == _OPEN_ENOUGH:
            return True
    return False


def _redacted(entry: str) -> bool:
    _, scheme, ident = entry.split(":", 2)
    return scheme == "digest" and ident.endswith(":x")


@dataclass
class AclPolicy:
    policy: str  # "copy" or "open"
    own: str | None  # this bridge's own ACL entry (digest auth), if it has an identity
    # rel → its ACL as last read: read once per change of the znode's ACL.
    _seen: dict[str, AclRead] = field(default_factory=dict)
    # rel → the read ahead (``prefetch``) that will fill ``_seen`` for it.
    _pending: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    _reading: set[asyncio.Task[None]] = field(default_factory=set)

    def _known(self, rel: str, czxid: int, aversion: int) -> bool:
        seen = self._seen.get(rel)
        return seen is not None and seen.czxid == czxid and seen.aversion == aversion

    def all_known(self, puts: Iterable[tuple[str, int, int]]) -> bool:
        """Whether the ACL of every put (rel, czxid, aversion) is known: none to read."""
        return all(self._known(rel, czxid, aversion) for rel, czxid, aversion in puts)

    async def announce_many(self, zk: ZooKeeper, puts: Sequence[tuple[str, str, int, int]]
                            ) -> list[tuple[str, ...] | str | None]:
        """What each captured put (path, rel, czxid, aversion) carries: entries, ``None``
        (world-open), or ``HOLD``; the ACLs not yet known are read in bulk."""
        ahead = {f for _, rel, czxid, aversion in puts
                 if not self._known(rel, czxid, aversion) and (f := self._pending.get(rel))}
        if ahead:
            await asyncio.gather(*ahead)  # they never fail: what they missed is read here
        unread = [(path, rel) for path, rel, czxid, aversion in puts
                  if not self._known(rel, czxid, aversion)]
        gone: set[str] = set()
        got = await zk.get_acls_many([path for path, _ in unread]) if unread else []
        for (_, rel), acl in zip(unread, got, strict=True):
            if acl is None:
                gone.add(rel)  # gone meanwhile: the next batch announces the delete
            else:
                self._seen[rel] = acl
        return [None if rel in gone else self._carried(self._seen[rel].entries)
                for _, rel, _, _ in puts]

    def prefetch(self, zk: ZooKeeper, znodes: Sequence[tuple[str, str]], sync_path: str) -> None:
        """Read the ACLs of ``znodes`` (path, rel) in the background, for a capture to come.

        A start-up capture of new znodes waited on their ACL reads, a
        request each (``multiRead`` cannot read ACLs): most of the origin's
        ZooKeeper work at a catch-up. A scan that lists new znodes starts
        them here, while it reads their data. ``zk`` is a session of its
        own: ``sync`` first, as its server may lag the one that listed them.
        What a read ahead missed or got wrong (a znode created again, an
        ACL set since) the capture reads itself.
        """
        todo = [(p, r) for p, r in znodes if r not in self._seen and r not in self._pending]
        if not todo:
            return
        loop = asyncio.get_running_loop()
        chunks = [todo[i:i + ACL_CHUNK] for i in range(0, len(todo), ACL_CHUNK)]
        done = [loop.create_future() for _ in chunks]
        for part, fut in zip(chunks, done, strict=True):
            for _, rel in part:
                self._pending[rel] = fut
        task = asyncio.ensure_future(self._read_ahead(zk, sync_path, chunks, done))
        self._reading.add(task)
        task.add_done_callback(self._reading.discard)

    async def _read_ahead(self, zk: ZooKeeper, sync_path: str,
                          chunks: list[list[tuple[str, str]]],
                          done: list[asyncio.Future[None]]) -> None:
        failed: list[BridgeError] = []

        async def one(part: list[tuple[str, str]], fut: asyncio.Future[None]) -> None:
            try:
                if not failed:
                    got = await zk.get_acls_many([p for p, _ in part])
                    for (_, rel), acl in zip(part, got, strict=True):
                        if acl is not None:
                            self._seen[rel] = acl
            except BridgeError as exc:
                failed.append(exc)
            finally:
                self._release(part, fut)

        try:
            await zk.sync(sync_path)
            await gather_limited([one(p, f) for p, f in zip(chunks, done, strict=True)],
                                 ACL_CHUNKS_IN_FLIGHT)
        except BridgeError as exc:
            failed.append(exc)
        finally:
            if failed:
                log.info("acl_read_ahead_failed", error=str(failed[0]),
                         action="the capture reads the ACLs itself")
            for part, fut in zip(chunks, done, strict=True):
                self._release(part, fut)

    def _release(self, part: list[tuple[str, str]], fut: asyncio.Future[None]) -> None:
        if fut.done():
            return
        for _, rel in part:
            if self._pending.get(rel) is fut:
                del self._pending[rel]
        fut.set_result(None)

    async def stop_reading_ahead(self) -> None:
        """Cancel the reads ahead (the term ended); whoever waits on them goes on."""
        tasks = list(self._reading)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _carried(self, entries: tuple[str, ...]) -> tuple[str, ...] | str | None:
        mine = tuple(e for e in entries if e != self.own)
        if self.policy == "open":
            return None if _world_open(entries) else HOLD
        if any(_redacted(e) for e in mine):
            # ZooKeeper >= 3.6 shows digest hashes only to identities with
            # ADMIN on the znode; a copy made from "user:x" would lock its
            # owner out everywhere else.
            return HOLD
        return None if mine in ((), WORLD_ALL) else mine

    def for_create(self, carried: tuple[str, ...] | None) -> tuple[str, ...] | None:
        """The ACL a copy is created with (``None``: open, as before ACLs travelled)."""
        if self.policy != "copy" or carried is None:
            return None
        return carried if self.own is None or self.own in carried else (*carried, self.own)

    async def converge(self, zk: ZooKeeper, path: str, rel: str,
                       carried: tuple[str, ...] | None) -> None:
        """After an update applied content: give the copy the origin's ACL if it differs."""
        want = self.for_create(carried)
        if want is None:
            return
        got = await zk.get_acls(path)
        if got is None or set(got.entries) == set(want):
            return
        await zk.set_acls(path, want, got.aversion)  # NoPermission: the caller holds it back
        self._seen.pop(rel, None)

    def forget(self, rel: str) -> None:
        self._seen.pop(rel, None)

    def retain(self, live: Collection[str]) -> None:
        """Keep only the ACLs of ``live`` (a scan's znodes): a cache of every path ever
        captured grew without bound under churn (a queue's sequential znodes)."""
        keep = set(live)
        for rel in [r for r in self._seen if r not in keep]:
            del self._seen[rel]

    @property
    def cached(self) -> int:
        return len(self._seen)
