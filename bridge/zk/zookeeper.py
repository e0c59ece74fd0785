"""The ZooKeeper operations over one session: reads, ACLs, writes, and the fenced multi.

``Session`` (``bridge.zk.session``) connects and hands kazoo's results to the
event loop; ``ZooKeeper`` adds what the bridge asks of the ensemble, each
answer and error already in the bridge's terms.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from kazoo.exceptions import (
    NoAuthError,
    NoNodeError,
    RolledBackError,
)
from kazoo.protocol.paths import _prefix_root
from kazoo.protocol.serialization import Exists, GetACL, SetACL
from kazoo.security import ACL, OPEN_ACL_UNSAFE

from bridge.config import ZooKeeperSettings
from bridge.errors import (
    FencedError,
    MissingNode,
    NoPermission,
    UnsupportedServerError,
    VersionConflict,
    ZooKeeperError,
)
from bridge.zk.errors import refusal
from bridge.zk.session import Session
from bridge.zk.sizing import ReplySizer
from bridge.zk.values import (
    AclRead,
    Check,
    Create,
    Delete,
    Node,
    Op,
    Stat,
    acl_entries,
    acl_text,
    stat_of,
)
from bridge.zk.wire import PERSISTENT_RECURSIVE, Multi

# A bulk getACL: requests per wait, and waits in flight. A start-up capture of
# 100,000 new znodes once sent them all at once and the last answers came after
# the adapter's timeout, so every attempt failed and started over.
ACL_CHUNK = 1000
ACL_CHUNKS_IN_FLIGHT = 4
READS_IN_FLIGHT = 4  # multiReads of ``read_all`` in flight

T = TypeVar("T")


class ZooKeeper(Session):
    """One session with one region's ensemble.

    ``fence`` (set after the bridge takes its epoch) is a ``Check`` prepended
    to every multi: if another bridge has bumped the epoch since, the multi
    fails and ``FencedError`` is raised instead of writing.
    """

    def __init__(self, settings: ZooKeeperSettings, *, read_only: bool = False,
                 private_root: str | None = None) -> None:
        super().__init__(settings, read_only=read_only, private_root=private_root)
        # How many reads a multiRead of ``read_all`` carries (``bridge.zk.sizing``).
        self.sizer = ReplySizer()

    def _create_acl(self, op: Create) -> list[ACL]:
        """The ACL a ``multi``'s create is sent with, as kazoo's ``create`` picks it."""
        acl = self._acl_for(op.path, op.acl)
        if acl is None:
            acl = self._client.default_acl or OPEN_ACL_UNSAFE
        return list(acl)

    def _acl_for(self, path: str, entries: Sequence[str] | None) -> list[ACL] | None:
        if entries is not None or self._private is None:
            return acl_entries(entries)
        root, acl = self._private
        return acl if path == root or path.startswith(root + "/") else None

    # -- reads ---------------------------------------------------------
    async def get(self, path: str, *, watch: bool = False) -> Node | None:
        w = self._kazoo_watch if watch else None
        while True:
            try:
                data, stat = await self._await(
                    self._call(self._client.get_async, path, w, what=f"get {path}"),
                    f"get {path}",
                )
                return Node(data or b"", stat_of(stat))
            except MissingNode:
                # Arm a creation watch so a node created later is seen; if it
                # was created in between, read it again instead of missing it.
                if not watch or await self.exists(path, watch=True) is None:
                    return None

    async def exists(self, path: str, *, watch: bool = False) -> Stat | None:
        w = self._kazoo_watch if watch else None
        stat = await self._await(
            self._call(self._client.exists_async, path, w, what=f"exists {path}"),
            f"exists {path}",
        )
        return stat_of(stat) if stat is not None else None

    async def children(self, path: str, *, watch: bool = False) -> list[str] | None:
        w = self._kazoo_watch if watch else None
        try:
            names = await self._await(
                self._call(self._client.get_children_async, path, w, what=f"ls {path}"),
                f"ls {path}",
            )
        except MissingNode:
            return None
        return list(names)

    async def read_many(self, ops: Sequence[tuple[str, str]]) -> list[Any]:
        """Read many znodes (``("data", path)``) and listings (``("children", path)``) at once.

        One request, one consistent snapshot. Per op: a ``Node`` or a list of
        names; ``None`` if the znode does not exist; a ``NoPermission``
        instance where the ACL forbids reading (a per-path condition).
        """
        return (await self.read_many_framed(ops))[0]

    async def read_many_framed(self, ops: Sequence[tuple[str, str]]) -> tuple[list[Any], int]:
        """``read_many``, also returning the frame number of its reply (``Connection``):
        a notification numbered below it is of a change the read saw."""
        if not ops:
            return [], 0
        pending = self._call(self._client.multi_read_async, list(ops), what="multiRead")
        raw = await self._await(pending, f"multiRead of {len(ops)}")
        frame = int(getattr(pending, "zkb_frame", 0))
        out: list[Any] = []
        for (_kind, path), res in zip(ops, raw, strict=True):
            if isinstance(res, NoNodeError):
                out.append(None)
            elif isinstance(res, NoAuthError):
                out.append(NoPermission(f"read {path}: not allowed by the znode's ACL"))
            elif isinstance(res, Exception):
                raise ZooKeeperError(f"read {path}: {type(res).__name__}")
            elif isinstance(res, tuple):
                out.append(Node(res[0] or b"", stat_of(res[1])))
            else:
                out.append(list(res))
        return out, frame

    async def read_all(self, ops: Sequence[tuple[str, str]],
                       progress: Callable[[int], None] | None = None
                       ) -> tuple[list[Any], list[int]]:
        """``read_many_framed`` for any number of ops: per op its answer and its reply's frame.

        As many reads per request as the answers seen so far allow for a reply
        of about 2 MB (``sizing``), a few requests in flight: a whole level of
        a tree costs a few round trips, and a subtree of large znodes does not
        make replies the server cannot hold. ``progress(n)`` as each request's
        ``n`` answers arrive.
        """
        answers: list[Any] = [None] * len(ops)
        frames = [0] * len(ops)
        pending: set[asyncio.Future[tuple[int, list[Any], int]]] = set()

        async def part(start: int, chunk: Sequence[tuple[str, str]]
                       ) -> tuple[int, list[Any], int]:
            got, frame = await self.read_many_framed(chunk)
            return start, got, frame

        sent = 0
        try:
            while sent < len(ops) or pending:
                while sent < len(ops) and len(pending) < READS_IN_FLIGHT:
                    chunk = ops[sent:sent + self.sizer.take(ops, sent)]
                    pending.add(asyncio.ensure_future(part(sent, chunk)))
                    sent += len(chunk)
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: t.exception() is None):
                    start, got, frame = task.result()  # a failed one first: raised
                    answers[start:start + len(got)] = got
                    frames[start:start + len(got)] = [frame] * len(got)
                    self.sizer.saw(ops[start:start + len(got)], got)
                    if progress is not None:
                        progress(len(got))
        finally:
            for task in pending:
                task.cancel()
            # Their outcome is of no use now, but must be taken (asyncio warns otherwise).
            await asyncio.gather(*pending, return_exceptions=True)
        return answers, frames

    async def add_recursive_watch(self, path: str) -> bool:
        """One persistent recursive watch on ``path``; False if the server lacks addWatch.

        Events for ``path`` and everything below reach the ``on_tree``
        callback until the session ends or the connection drops (kazoo does
        not restore persistent watches on reconnect: callers re-add and rescan).
        """
        if self.refuse_add_watch:
            return False
        try:
            await self._await(
                self._call(self._client.add_watch_async, path, PERSISTENT_RECURSIVE,
                           what=f"addWatch {path}"),
                f"addWatch {path}",
            )
        except UnsupportedServerError:
            return False
        if path not in self._tree_roots:
            self._tree_roots = (*self._tree_roots, path)
        return True

    async def get_acls(self, path: str) -> AclRead | None:
        """The znode's ACL as "perms:scheme:id" entries, with its versions; None if absent."""
        try:
            acls, stat = await self._await(
                self._call(self._client.get_acls_async, path, what=f"getACL {path}"),
                f"getACL {path}",
            )
        except MissingNode:
            return None
        return AclRead(tuple(acl_text(a) for a in acls), stat.aversion, stat.czxid)

    async def get_acls_many(self, paths: Sequence[str]) -> list[AclRead | None]:
        """``get_acls`` of every path, pipelined (``multiRead`` cannot read ACLs).

        Each chunk's answers become plain tuples as they arrive, equal ACLs
        shared: kazoo's objects for 100,000 znodes, held until the last chunk,
        were tens of MB of a start-up capture's peak.
        """
        shared: dict[tuple[str, ...], tuple[str, ...]] = {}

        def read(item: Any) -> AclRead | None:
            if isinstance(item, MissingNode):
                return None
            acls, stat = _answer(item)
            entries = tuple(acl_text(a) for a in acls)
            return AclRead(shared.setdefault(entries, entries), stat.aversion, stat.czxid)

        return await self._each(paths, GetACL, read, "getACL")

    async def stats_many(self, paths: Sequence[str]) -> list[Stat | None]:
        """``exists`` of every path, pipelined as ``get_acls_many`` (None: gone)."""
        def read(item: Any) -> Stat | None:
            if item is None or isinstance(item, MissingNode):
                return None
            return stat_of(_answer(item))

        return await self._each(paths, lambda path: Exists(path, None), read, "exists")

    async def set_acls_many(self, paths: Sequence[str], entries: Sequence[str]) -> None:
        """``set_acls`` of every path to ``entries``, pipelined; a path gone is passed over."""
        acl = acl_entries(entries)
        await self._each(paths, lambda path: SetACL(path, acl, -1),
                         lambda item: item if isinstance(item, MissingNode) else _answer(item),
                         "setACL")

    async def _each(self, paths: Sequence[str], request: Callable[[str], Any],
                    answer: Callable[[Any], T], what: str) -> list[T]:
        """One request per path, ``ACL_CHUNK`` per wait and ``ACL_CHUNKS_IN_FLIGHT`` waits
        at once; each chunk's answers through ``answer`` as they arrive."""
        async def chunk(part: Sequence[str]) -> list[T]:
            got = await self._many([request(_prefix_root(self._client.chroot, p)) for p in part],
                                   f"{what} of {len(part)} from {part[0]}")
            return [answer(item) for item in got]

        parts = [paths[i:i + ACL_CHUNK] for i in range(0, len(paths), ACL_CHUNK)]
        return [item for got in await gather_limited([chunk(p) for p in parts],
                                                     ACL_CHUNKS_IN_FLIGHT) for item in got]

    async def set_acls(self, path: str, entries: Sequence[str], version: int = -1) -> None:
        await self._await(
            self._call(self._client.set_acls_async, path, acl_entries(entries), version,
                       what=f"setACL {path}"),
            f"setACL {path}",
        )

    async def sync(self, path: str) -> None:
        await self._await(self._call(self._client.sync_async, path, what="sync"), "sync")

    # -- writes --------------------------------------------------------
    async def ensure_path(self, path: str) -> None:
        """Create ``path`` and its ancestors if missing.

        Looks up from the deepest level first: in the common case (the
        parent exists) this is one or two requests, not one per level.
        """
        missing: list[str] = []
        cur = path
        while cur and cur != "/" and await self.exists(cur) is None:
            missing.append(cur)
            cur = cur.rsplit("/", 1)[0]
        for p in reversed(missing):
            # NodeExists (VersionConflict here): someone made it meanwhile.
            with contextlib.suppress(VersionConflict):
                await self._await(
                    self._call(self._client.create_async, p, b"", self._acl_for(p, None),
                               what=f"create {p}"),
                    f"create {p}",
                )

    async def set_data(self, path: str, data: bytes, version: int = -1) -> Stat:
        stat = await self._await(
            self._call(self._client.set_async, path, data, version, what=f"set {path}"),
            f"set {path}",
        )
        return stat_of(stat)

    async def create(
        self, path: str, data: bytes = b"", *, ephemeral: bool = False, sequence: bool = False
    ) -> str:
        created: str = await self._await(
            self._call(
                self._client.create_async, path, data, self._acl_for(path, None), ephemeral,
                sequence,
                what=f"create {path}",
            ),
            f"create {path}",
        )
        return created

    async def wait_deleted(self, path: str, recheck: float = 2.0) -> None:
        """Return once ``path`` does not exist.

        A private one-shot watch wakes us; the periodic re-check covers a
        session lost meanwhile, when ZooKeeper drops the watch silently.
        """
        loop = self._loop or asyncio.get_running_loop()
        while True:
            fired = asyncio.Event()

            def wake(_event: Any, fired: asyncio.Event = fired) -> None:
                if not loop.is_closed():
                    loop.call_soon_threadsafe(fired.set)

            stat = await self._await(
                self._call(self._client.exists_async, path, wake, what=f"exists {path}"),
                f"exists {path}",
            )
            if stat is None:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(recheck):
                    await fired.wait()

    async def delete(self, path: str, version: int = -1) -> None:
        with contextlib.suppress(MissingNode):
            await self._await(
                self._call(self._client.delete_async, path, version, what=f"delete {path}"),
                f"delete {path}",
            )

    async def delete_many(self, paths: Sequence[str]) -> None:
        """Delete znodes (already gone is fine): one request in the common case."""
        try:
            await self.multi([Delete(p) for p in paths], fenced=False)
        except VersionConflict:
            for p in paths:
                await self.delete(p)

    async def multi(self, ops: Sequence[Op], *, fenced: bool = True) -> list[Any]:
        """Commit ``ops`` atomically, behind the epoch check when ``fenced``.

        Returns kazoo's per-op results (created paths for creates). Raises
        ``FencedError`` when the epoch moved, ``VersionConflict`` when another
        check or create/delete precondition failed (re-read and retry).
        """
        results, _ = await self.commit(ops, fenced=fenced)
        return results

    async def commit(self, ops: Sequence[Op], *, fenced: bool = True) -> tuple[list[Any], int]:
        """``multi``, also returning the frame number of its reply (``Connection``).

        A persistent-watch notification of a path this ``multi`` wrote, numbered
        below that frame, is of a change at or before it.
        """
        all_ops: list[Op] = list(ops)
        if fenced:
            if self.fence is None:
                raise FencedError("no epoch taken: this bridge does not lead its region")
            all_ops.insert(0, self.fence)
        request = Multi([(op, self._create_acl(op) if isinstance(op, Create) else None)
                          for op in all_ops], self._client.chroot)
        pending = self._call(self._client.submit, request, what="multi")
        results = await self._await(pending, "multi")
        frame = int(getattr(pending, "zkb_frame", 0))
        failed = [
            (op, r)
            for op, r in zip(all_ops, results, strict=False)
            if isinstance(r, Exception) and not isinstance(r, RolledBackError)
        ]
        if failed:
            op, err = failed[0]
            if fenced and op is all_ops[0]:
                raise FencedError(
                    f"epoch {self.fence.path if self.fence else ''} moved: another bridge "
                    "now leads this region"
                )
            refused = refusal(err, f"{type(op).__name__} {op.path}", op.path)
            if refused is not None:
                raise refused
            raise VersionConflict(f"multi failed at {type(op).__name__} {op.path}: "
                                  f"{type(err).__name__}")
        return list(results), frame

    async def take_epoch(self, epoch_path: str, holder: bytes) -> int:
        """Bump the epoch znode and fence every later multi on the new version."""
        await self.ensure_path(epoch_path)
        stat = await self.set_data(epoch_path, holder)
        self.fence = Check(epoch_path, stat.version)
        return stat.version


def _answer(item: Any) -> Any:
    """A pipelined answer, or its error raised."""
    if isinstance(item, BaseException):
        raise item
    return item


async def gather_limited(coros: Sequence[Any], limit: int) -> list[Any]:
    """Run awaitables with at most ``limit`` in flight (pipelining ZooKeeper calls)."""
    sem = asyncio.Semaphore(limit)

    async def one(c: Any) -> Any:
        async with sem:
            return await c

    return list(await asyncio.gather(*(one(c) for c in coros)))

