"""A subtree store's state, and the primitives its writes share: reads, commits, the metadata cache.

The leader is the only writer of a subtree's metadata, so its in-memory copy
is read once per leadership term (by the start-up scan) and kept current by
the writes themselves (``_commit``). A ``multi`` whose answer was lost may or
may not have committed: what it touched is marked, and read again before the
next write (``_settle``). ``bridge.capture`` and ``bridge.store`` build the
two writes that matter on these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from bridge import statecodec
from bridge.acl import AclPolicy
from bridge.clock import HybridClock
from bridge.errors import NoPermission, VersionConflict, ZooKeeperError
from bridge.layout import Change, Layout, classify, is_excluded
from bridge.model import Event, NodeMeta
from bridge.outbox import Outbox
from bridge.plan import MetaEntry, Plan, Planner
from bridge.positions import Positions
from bridge.zk import Create, Delete, Node, SetData, ZooKeeper

RETRIES = 20


class StoreCore(Planner):
    """A subtree's replication state and I/O primitives (``Capturing`` and
    ``SubtreeStore`` build the writes on it)."""

    def __init__(
        self,
        zk: ZooKeeper,
        layout: Layout,
        *,
        region: str,
        clock: HybridClock,
        max_data_bytes: int,
        exclude: Sequence[str] = (),
        acl: AclPolicy | None = None,
    ) -> None:
        self.zk = zk
        self.acl = acl or AclPolicy("copy", None)
        # A second session to the same ensemble, for a large capture's ACL
        # reads (``_pieces``); without it (or while it is down) they use ``zk``.
        self.acl_reader: ZooKeeper | None = None
        self.layout = layout
        self.region = region
        self.clock = clock
        self.max_data_bytes = max_data_bytes
        self.exclude = tuple(exclude)
        # This ensemble's incarnation (set at each term's start), stamped on
        # captured events: the outbox holds each record's value as published.
        self.incarnation: str | None = None
        self.oversized: dict[str, int] = {}  # rel → size, for status and metrics
        # rel → why it waits: "read" or "write" (the bridge's identity may not),
        # "acl" (``bridge.acl``), "quota" (a hard quota here refuses a peer's write).
        self.held_back: dict[str, str] = {}
        self.held_events: dict[str, Event] = {}  # peers' events waiting to be writable
        # While held events are tried again: why each waited (held back again
        # for the same reason, it is not reported again).
        self.retried: dict[str, str] = {}
        self.metas: dict[str, MetaEntry] = {}
        # True while a scan rebuilds ``metas``: counts over it would dip (after each
        # reconnect, on a dashboard), so the last one stands meanwhile.
        self.rebuilding = False
        self._tombstones = 0
        # Where paths go back when a batch had to be cut before closing.
        self.requeue: Callable[[set[str]], None] = lambda rels: None
        # Told the znodes an apply wrote and the frame of its reply: their
        # notifications up to that frame are of that write (``written``).
        self.settled: Callable[[set[str], int], None] = lambda rels, frame: None
        self.outbox = Outbox(zk, layout)
        # The overflow marker while the outbox is full (``bridge.overflow``):
        # captures then write no entry; and whether the marker is written yet.
        self.overflow: str | None = None
        self.overflow_marked = False
        # While the subtree joins the federation in this region (``bridge.joining``):
        # the znodes it held unrecorded, each as the scan read it (and that
        # reply's frame). The peers' versions are applied over them; whatever
        # is left is published after that. None: not joining. A recorded znode
        # deleted before the marker was made is set aside too, as None.
        self.joining: dict[str, tuple[Node, int] | None] | None = None
        # The joining marker's czxid. A znode last written before it is part of
        # the copy; one written after is an application's write, even one made
        # while a crashed join's bridge was down (the marker outlives the crash).
        self.join_zxid = 0
        self.join_scope: tuple[str, ...] | None = None  # the paths that join; None: all
        # A path of ``join_scope`` whose join began before the marker was last made
        # (widened for another): the line it has kept, instead of ``join_zxid``
        # (read only while ``join_scope`` is set).
        self.join_lines: dict[str, int] = {}
        # The record of each set-aside znode then (None: none; a path included
        # again may have one from before it was excluded).
        self.join_records: dict[str, NodeMeta | None] = {}
        # The unrecorded znodes the join's scans set aside, as listed in the region's
        # ensemble (``bridge.joinlist``); None: no list yet.
        self.join_held: frozenset[str] | None = None
        # The marker's czxid the list is whole for: not ``join_zxid`` (none yet, the
        # marker widened since, a crash while it was written), the next scan adds to it.
        self.join_list_line: int | None = None
        # The exclude list the peers' topics were read under, as the term began
        # (None: not known).
        self.read_under: tuple[str, ...] | None = None
        # The mount the state describes (``Layout.mount_record``), None: not known
        # (a release before kept none). Unlike the configured one: the mount moved.
        self.mount_before: str | None = None
        self.positions = Positions(zk, layout)
        # Tombstone collection (see bridge.tombstones): own counters of new
        # paths start above ``gc_floor``; the record's version fences its update.
        self.gc_floor = 0
        self.gc_collected = 0
        self._gc_version: int | None = None
        self._suspect: set[str] = set()  # metadata a lost multi may have changed
        self._suspect_peers: set[str] = set()

    @property
    def moved_from(self) -> str | None:
        """The mount the state describes, if the subtree's configured mount differs."""
        return self.mount_before if self.mount_before not in (None, self.layout.mount) else None

    def _replicable(self, rel: str) -> bool:
        return rel != "/" and not self.excluded(rel)

    # -- the metadata cache --------------------------------------------------
    def load_meta(self, rel: str, node: Node | None) -> None:
        """Record a metadata znode read by a scan (``None``: it does not exist)."""
        if node is None:
            self.metas.pop(rel, None)
        else:
            self.metas[rel] = MetaEntry(statecodec.decode_meta(node.data), node.stat.version)

    def live_children(self, rel: str) -> list[str]:
        prefix = "/" if rel == "/" else rel + "/"
        return [r for r, e in self.metas.items()
                if r.startswith(prefix) and "/" not in r[len(prefix):]
                and e.meta is not None and not e.meta.deleted]

    async def _multi(self, plan: Plan, peer: str | None = None) -> tuple[list[object], int]:
        """Commit a plan; when the answer is lost, what it touched is read again first.

        A ``multi`` cut off by a lost connection may or may not have committed:
        the cached metadata (and the peer's position version) of what it
        touched is unknown until read back, or the next capture would take our
        own write for an application's.
        """
        try:
            return await self.zk.commit(plan.ops)
        except (VersionConflict, NoPermission):
            raise
        except ZooKeeperError:
            self._suspect |= set(plan.metas)
            if peer is not None:
                self._suspect_peers.add(peer)
            raise

    async def _settle(self) -> None:
        if self._suspect:
            await self.refresh_meta(self._suspect)
            self._suspect.clear()
        for peer in list(self._suspect_peers):
            await self.positions.read(peer)
            self._suspect_peers.discard(peer)

    async def refresh_meta(self, rels: Iterable[str]) -> None:
        """Read metadata again after a failed multi (the cache may be behind)."""
        todo = sorted(set(rels))
        nodes, _ = await self.zk.read_all([("data", self.layout.meta(r)) for r in todo])
        for rel, node in zip(todo, nodes, strict=True):
            self.load_meta(rel, node if isinstance(node, Node) else None)

    async def _read(self, rels: Iterable[str]) -> dict[str, Node | NoPermission | None]:
        return (await self._read_framed(rels))[0]

    async def _read_framed(self, rels: Iterable[str]
                           ) -> tuple[dict[str, Node | NoPermission | None], dict[str, int]]:
        """The znodes, and the frame of the reply that read each (``ZooKeeper.read_all``:
        several replies, each a snapshot at its own zxid, answered in order)."""
        todo = sorted(set(rels))
        nodes, frames = await self.zk.read_all([("data", self.layout.znode(r)) for r in todo])
        return dict(zip(todo, nodes, strict=True)), dict(zip(todo, frames, strict=True))

    def unannounced(self, reads: Mapping[str, Node | NoPermission | None],
                    among: Iterable[str] | None = None) -> list[str]:
        """The paths of ``reads`` (or of ``among``) that the application changed and
        no capture announced yet: an apply must not write over them."""
        return [r for r in (reads if among is None else among)
                if not isinstance(n := reads[r], NoPermission)
                and not self.excluded(r) and r not in self.oversized
                and r not in self.held_back and not self.pre_join(r, n)
                and (self.join_gone(r, n)
                     or classify(n, self.meta(r)) in (Change.PUT, Change.DELETE,
                                                      Change.MAYBE_PLACEHOLDER))]

    def pre_join(self, rel: str, node: Node | None) -> bool:
        """Is this znode one the region held, unlike its record, from before it joined?

        Not an application's write: a peer's version goes over it, and it is
        published only if no peer has the path (``bridge.joining``). Told by
        the znode alone (last written before the marker: neither an application
        nor an apply wrote it since), also before a scan set it aside.
        """
        if node is None:  # still absent as the scan found it, before the marker
            return self.untouched(rel) and self._set_aside_absent(rel)
        return (self.joins(rel) and node.stat.mzxid < self.join_line(rel)
                and classify(node, self.meta(rel)) is Change.PUT)

    def gone_before(self, rel: str, bound: int | None) -> bool:
        """Was this recorded znode, missing now, deleted before the joining marker?

        ``bound``: its nearest present ancestor's pzxid, read after the listing
        that lacked it (``ScanResult.gone``), at or above the zxid of the delete.
        Such a delete was made while the path was excluded (or the subtree away):
        like a changed znode of the copy, it is published only if no peer's
        version lands over it meanwhile. Above the marker it may be an
        application's delete since, captured as usual.
        """
        return (bound is not None and bound < self.join_line(rel) and self.joins(rel)
                and (meta := self.meta(rel)) is not None and not meta.deleted)

    def join_line(self, rel: str) -> int:
        """The zxid before which a znode at ``rel`` was written before its path joined:
        the marker's czxid, or an earlier one that a joining path kept when the
        marker was widened. Of nested joining paths, the later line: the inner path
        stayed excluded until then."""
        if self.join_scope is None:
            return self.join_zxid
        return max((self.join_lines.get(s, self.join_zxid) for s in self.join_scope
                    if is_excluded(rel, (s,))), default=self.join_zxid)

    def _set_aside_absent(self, rel: str) -> bool:
        return self.joining is not None and self.joining.get(rel, False) is None

    def untouched(self, rel: str) -> bool:
        """Is ``rel`` set aside, and its record as it was then (no peer's version or
        delete applied over it, no change of it captured since)?"""
        return (self.joining is not None and rel in self.joining
                and self.meta(rel) == self.join_records.get(rel))

    def joins(self, rel: str) -> bool:
        """Is ``rel`` in what joins (``bridge.joining``): all of a joining subtree, or
        a path that an exclude list no longer holds?"""
        return self.joining is not None and (self.join_scope is None
                                             or is_excluded(rel, self.join_scope))

    def join_gone(self, rel: str, node: Node | None) -> bool:
        """Was this set-aside znode deleted here, by an application, during the join?

        No peer's version or delete was applied to it: the delete is a write
        made after the join began, published like any other (so it beats the
        versions the peers had, and the apply must not bring a peer's back first).
        """
        if node is not None or self.joining is None:
            return False
        if rel not in self.joining:  # deleted while a crashed join's bridge was down
            return rel in (self.join_held or ()) and self.meta(rel) is None
        return (self.untouched(rel) and not self._set_aside_absent(rel)
                and ((meta := self.meta(rel)) is None or not meta.deleted))

    def _commit(self, plan: Plan) -> None:
        self.metas.update(plan.metas)

    def written(self, plan: Plan) -> set[str]:
        """The replicated znodes a plan writes, each behind a check of the version it read.

        Once such a ``multi`` committed, every change to these znodes that was
        notified before its reply is accounted for: made before the apply read
        the znode (a local change then stops the apply, ``LocalChanges``), or
        by the apply itself; one in between would have failed the ``multi``.
        So the capture need not read them back for those notifications.
        """
        out = set()
        for op in plan.ops:
            if isinstance(op, Create) or (isinstance(op, SetData | Delete) and op.version >= 0):
                rel = self.layout.rel_of(op.path)
                if rel is not None and rel != "/":
                    out.add(rel)
        return out
