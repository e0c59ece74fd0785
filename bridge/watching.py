"""Knowing what changed: the subtree watches, the scans, and what a dropped connection hid.

One persistent recursive watch per mount (ZooKeeper ≥ 3.6) marks every
changed path for the outbound pipeline; a server without ``addWatch`` gets
one-shot watches per znode instead, re-armed after each capture. A scan
reads the whole subtree and captures what changed unseen: at a term's start,
and after every reconnect, since nothing is delivered while away and the
persistent watch is gone with the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog

from bridge import joining
from bridge.errors import BridgeError
from bridge.model import Event
from bridge.plan import Applied, Outcome
from bridge.zk import Watch

if TYPE_CHECKING:
    from bridge.engine import Bridge

log = structlog.get_logger("bridge.watching")

# Held events are tried again by themselves this long after they were held,
# doubling while they stay held: a quota raised or an ACL opened is seen
# within a minute, not at the next audit (every 10 minutes by default).
HELD_RETRY_FIRST = 5.0
HELD_RETRY_MAX = 60.0
HELD_RETRY_PROBE = 16  # held events tried first; the rest only once one of them applied


class Watching:
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self._wake = asyncio.Event()
        self._requested = False
        # Bumped when the ZooKeeper connection drops; subtrees not rescanned since.
        self.session_gen = 0
        self.unseen: set[str] = set()
        self.tree_watch = True  # False: the server lacks addWatch, per-node watches instead
        self._watched: dict[str, dict[str, set[str]]] = {n: {} for n in bridge.stores}
        self._held_turn = 0  # where the next probe of held events starts

    def reset(self) -> None:
        for seen in self._watched.values():
            seen.clear()

    def disconnected(self) -> None:
        """Changes made from now until the rescan after the reconnect are never notified:
        no capture may close a batch over them (``Outbound.flush``; chaos seed 705621 saw a
        retried capture publish a pointer whose record was written during the gap)."""
        self.session_gen += 1
        self.unseen = set(self.bridge.stores)

    def request(self) -> None:
        """Rescan every subtree now: after a reconnect, or a reload that includes new
        paths or may have made held-back ones accessible."""
        self._requested = True
        self._wake.set()

    def retime(self) -> None:
        """A reload may have changed ``audit_interval``: the next audit is due that
        long after the last audit or scan, not after the wait already begun."""
        self._wake.set()

    async def rescanner(self) -> None:
        """Rescan when asked (a reconnect, a reload), and audit every
        ``audit_interval`` seconds: a persistent watch is not told of a znode the
        bridge may not read (servers with the CVE-2024-23944 fix)."""
        b = self.bridge
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            interval = b.settings.audit_interval
            due = last + interval if interval > 0 else None
            if not self._requested and (due is None or loop.time() < due):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(),
                                           None if due is None else due - loop.time())
                self._wake.clear()
                continue
            periodic, self._requested = not self._requested, False
            for name in b.stores:
                if periodic:
                    await self.audit(name)
                else:
                    await b.retry(f"rescan {name}",
                                  lambda n=name: self.scan(n, watched=True))  # type: ignore[misc]
            last = loop.time()

    async def held_retrier(self) -> None:
        """Try held events again, backing off from ``HELD_RETRY_FIRST`` to
        ``HELD_RETRY_MAX`` while any stay held (a scan, an audit and SIGHUP try them too)."""
        b = self.bridge
        delay = waited = 0.0
        while True:
            await asyncio.sleep(HELD_RETRY_FIRST)
            held = [name for name, store in b.stores.items() if store.held_events]
            if not held:
                delay = waited = 0.0
                continue
            waited += HELD_RETRY_FIRST
            if waited < delay:
                continue
            waited, delay = 0.0, min(max(delay * 2, HELD_RETRY_FIRST), HELD_RETRY_MAX)
            for name in held:
                async with b.locks[name]:
                    await self._apply_held(name, probe=HELD_RETRY_PROBE)

    async def audit(self, name: str) -> None:
        """The periodic check: the tree's listings against the metadata cache
        (``Scanner.audit``), and a capture of the paths where they differ. Unlike a
        scan it holds the subtree's lock only for that capture, if any."""
        b = self.bridge
        gen = self.session_gen
        result = await b.retry(f"audit {name}", b.scanners[name].audit)
        b.stats[f"audits:{name}"] += 1
        log.info("audit_done", subtree=name, znodes=result.listed,
                 suspects=len(result.suspects), seconds=round(result.seconds, 3))
        if name in self.unseen or self.session_gen != gen:
            # The connection dropped: the cache may miss what a lost answer
            # committed, and the rescan after the reconnect reads everything (a
            # capture's may have run meanwhile, rebuilding the cache compared with).
            return
        if result.suspects or b.stores[name].held_events:
            async with b.locks[name]:
                if result.suspects:
                    await b.outbound.flush(name, set(result.suspects))
                await self._apply_held(name)

    async def scan(self, name: str, *, watched: bool = False,
                   first: Callable[[], Awaitable[None]] | None = None) -> None:
        """Watch the mount, read everything, capture what changed unseen (one batch or more).

        ``watched``: the subtree was watched since its last scan (a rescan a
        reload asks for), so the deletes this one finds were notified, or made
        to znodes the bridge may not read. The mass-delete breaker guards
        against an ensemble restored or wiped while nobody watched; here it
        would stop the bridge for an application's own large delete whose
        notifications are still being captured. It applies again if the
        connection dropped since the last scan.
        """
        async with self.bridge.locks[name]:
            if first is not None:  # (in the same hold of the lock)
                await first()
            await self._rescan_locked(name, breaker=not watched or name in self.unseen)
            await self._apply_held(name)

    async def _apply_held(self, name: str, probe: int | None = None) -> None:
        """Peers' events held back for want of permission to write, tried again (the
        subtree's lock held): their records go once they apply, in the same multi.

        ``probe``: try that many first, and the rest only if one of them applied. Each
        event still refused costs a read and a ``multi``; a thousand held events tried
        every minute would keep the ensemble busy for nothing.
        """
        store = self.bridge.stores[name]
        events = list(store.held_events.values())
        if probe is not None and len(events) > probe:
            # A different window each time: a few events held for good must not hide
            # the others' cause going away.
            start = self._held_turn % len(events)
            self._held_turn = start + probe
            before = len(store.held_events)
            await self._try_held(name, (events[start:] + events[:start])[:probe])
            if len(store.held_events) >= before:
                return
            events = list(store.held_events.values())
        if events:
            await self._try_held(name, events)

    async def _try_held(self, name: str, events: list[Event]) -> None:
        b = self.bridge
        store = b.stores[name]
        # Still listed as held while tried (``status`` may look meanwhile).
        store.retried = {e.path: store.held_back.get(e.path, "") for e in events}
        try:
            applied = await b.applier.apply_events(store, events, peer=None, positions=None)
        finally:
            store.retried = {}
        # Held again, an event was counted when it first came: not at each try.
        b.applier.record(store, Applied(
            tuple(o for o in applied.outcomes if o[1] is not Outcome.HELD_BACK),
            applied.conflicts))

    async def ensure_seen(self, name: str) -> None:
        """Before a capture (the subtree's lock held): rescan if the connection dropped since
        the last scan, until one scan ran without a drop (``Outbound.flush``)."""
        while name in self.unseen:
            await self._rescan_locked(name)

    async def _rescan_locked(self, name: str, *, breaker: bool = True) -> None:
        """The scan proper, the subtree's lock held (it keeps applies out while the
        metadata cache is rebuilt).

        The watch goes first, so a change during the scan is either read by
        it or notified after.
        """
        b = self.bridge
        store, scanner = b.stores[name], b.scanners[name]
        gen = self.session_gen
        if self.tree_watch:
            self.tree_watch = await b.retry(
                f"watch {name}", lambda: b.zk.add_recursive_watch(store.layout.mount))
            if not self.tree_watch:
                log.warning("persistent_watch_unsupported", subtree=name,
                            hint="ZooKeeper < 3.6: falling back to a watch per znode")
        result = await b.retry(
            f"scan {name}",
            lambda: scanner.scan(allow_mass_delete=b.allow_mass_delete or not breaker))
        b.stats[f"scans:{name}"] += 1
        b.scan_seconds[name] = result.seconds
        log.info("scan_done", subtree=name, znodes=result.znodes,
                 changes=len(result.changed), seconds=round(result.seconds, 3))
        b.stores[name].acl.retain(result.present)
        if not self.tree_watch:
            self._watched[name].clear()
            await self._arm(name, ["/", *result.present])
        await b.outbound.publishing.wait()  # at a term's start: until the checks pass
        # Per-node watches were armed after the scan read: a change in between
        # was notified to nobody, so the capture must read everything again.
        now = joining.set_aside(store, result)
        await store.save_join_held()  # before any apply: the lock is held
        await b.outbound.flush(name, now, since=gen,
                               prefetched=result.reads if self.tree_watch else None)
        if self.session_gen == gen:
            self.unseen.discard(name)

    # -- change notification -------------------------------------------------
    def _subtree_of(self, path: str) -> tuple[str, str] | None:
        for name, store in self.bridge.stores.items():
            rel = store.layout.rel_of(path)
            if rel is not None:
                return name, rel
        return None

    def on_tree(self, path: str, frame: int) -> None:
        found = self._subtree_of(path)
        if (found is not None and found[1] != "/"
                and not self.bridge.stores[found[0]].excluded(found[1])):
            self.bridge.outbound.mark(*found, frame)

    def on_watch(self, kind: Watch, path: str, deleted: bool) -> None:
        """Fallback one-shot watches (no addWatch): where to look, then re-armed."""
        if self.tree_watch:
            return
        found = self._subtree_of(path)
        if found is None:
            return
        name, rel = found
        if kind is Watch.CHILDREN:
            self.bridge.background(self._relist(name, rel))
        elif rel != "/":
            self.bridge.outbound.mark(name, rel)

    async def _relist(self, name: str, rel: str) -> None:
        with contextlib.suppress(BridgeError):
            async with self.bridge.locks[name]:
                self._watched[name].pop(rel, None)
                await self._arm(name, [rel])

    async def after_capture(self, name: str, rels: set[str]) -> None:
        if not self.tree_watch:
            await self._arm(name, sorted(rels))

    async def _arm(self, name: str, rels: list[str]) -> None:
        """Per-node watches: data on each, children on each present one (new children marked)."""
        b = self.bridge
        store, seen = b.stores[name], self._watched[name]
        for rel in rels:
            path = store.layout.znode(rel)
            stat = await b.zk.exists(path, watch=True)
            if stat is None or stat.ephemeral:
                seen.pop(rel, None)
                continue
            if rel in seen:
                continue
            names = await b.zk.children(path, watch=True) or []
            seen[rel] = set(names)
            for child in names:
                child_rel = f"/{child}" if rel == "/" else f"{rel}/{child}"
                if child_rel not in seen and not store.excluded(child_rel):
                    b.outbound.mark(name, child_rel)
