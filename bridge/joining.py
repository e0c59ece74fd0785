"""A subtree's first start in a region, or a path taken out of ``exclude``: the peers'
versions first, then what only this region held.

A region whose ensemble already holds the subtree when its bridge first
starts (a copy made before, by hand or by another tool; every region when a
subtree is added to the configuration) has no record of those znodes. Captured
at once, each would be published as a write made now: concurrent with every
peer's version and later than all of them, so the copy won every conflict
and an old value replaced the federation's newest in every region, and
paths the federation had deleted came back. Instead the start-up scan sets
those znodes aside; the peers' topics are applied over them (a path with no
record takes the peer's version, a delete removes it); once the bridge has
caught up, what is left (the paths no peer has) is captured and published
like any write. A marker znode (``Layout.joining``), made before the
subtree's state, keeps a crash in between from publishing the copy; its
czxid tells the copy (last written before it) from an application's writes
made since, also across such a crash.

A path an exclude list no longer holds joins the same way: what the region
wrote there while it was excluded has no record, or one older than its
content, and the peers' topics are read again for it (``TopicCheck.read_again``).
The marker then holds the paths that join. A recorded znode missing there,
deleted before the marker (its nearest present ancestor's pzxid says so), is
set aside too: a peer's later version goes over its absence, and the delete is
published only if none does. A subtree configured again after starts without
it (``mark_away``) joins whole in the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import structlog

from bridge import failpoints, joinlist, startup
from bridge.errors import MissingNode, VersionConflict
from bridge.layout import Layout, subtrees_root
from bridge.zk import Create, Delete

if TYPE_CHECKING:
    from bridge.engine import Bridge
    from bridge.scan import ScanResult
    from bridge.store import SubtreeStore

log = structlog.get_logger("bridge.joining")


def set_aside(store: SubtreeStore, result: ScanResult) -> set[str]:
    """The paths of a scan to capture now; the rest wait for the subtree to have joined.

    Set aside: every znode in what joins that differs from its record (none,
    mostly) and was last written before the joining marker was made. Any other
    is an application's write, captured as usual, whether this term's scan, a
    rescan after a reconnect or a scan after a crash found it.
    """
    joining = store.joining
    if joining is None:
        return set(result.changed)
    now: set[str] = set()
    for rel in result.changed:
        read = result.reads.get(rel)
        # (A missing one set aside before stays so: a later scan's bound may have
        # moved past the marker with its siblings' changes.)
        if (read is not None and store.pre_join(rel, read[0])) or (read is None and (
                store.pre_join(rel, None) or store.gone_before(rel, result.gone.get(rel)))):
            joining[rel] = read
            store.join_records[rel] = store.meta(rel)
        else:
            joining.pop(rel, None)
            store.join_records.pop(rel, None)
            now.add(rel)
    if store.join_held:
        # Set aside by an earlier run of the join and gone, no peer's version
        # recorded: an application deleted it since, maybe while the bridge was down.
        found = set(result.present)
        now.update(r for r in store.join_held - found - joining.keys()
                   if not store.excluded(r) and store.join_gone(r, None))
    log.info("subtree_joining", subtree=store.layout.name, set_aside=len(joining),
             since_zxid=hex(store.join_zxid), paths=list(store.join_scope or ("/",)),
             action="applying the peers' versions first; then publishing what no peer has")
    return now


async def mark_away(b: Bridge) -> None:
    """Mark each subtree replicated here before and missing from the configuration now.

    Its state stays. Its znodes are the applications' alone until it is
    configured again; then what they changed there joins like a copy
    (``SubtreeStore.setup``): captured as writes made then, each older value
    and delete would win over the peers' later writes in every region.
    """
    state = b.settings.state_path
    for name in sorted(set(await b.zk.children(subtrees_root(state)) or ()) - set(b.stores)):
        lay = Layout(state, name, "")
        if (await b.zk.exists(lay.meta_root) is None
                or await b.zk.exists(lay.away) is not None):
            continue
        with contextlib.suppress(VersionConflict):  # made by a start that lost its answer
            await b.zk.multi([Create(lay.away, b"")])
        log.info("subtree_away", subtree=name,
                 action="its state stays; configured again, what this region changed "
                        "there meanwhile takes the peers' versions first")


def start(b: Bridge, name: str) -> asyncio.Task[None]:
    """The task finishing ``name``'s join, started if none runs (one per term)."""
    task = b.joins.get(name)
    if task is None or task.done():
        task = b.joins[name] = asyncio.create_task(b.guarded(f"join[{name}]", finish, b, name))
    return task


async def include(b: Bridge, name: str, exclude: tuple[str, ...],
                  included: tuple[str, ...]) -> None:
    """A reload that no longer excludes ``included``, in a term: once the term has
    started, mark them joining, then take them in and finish the join."""
    await b.ready.wait()
    marked = False

    async def mark() -> None:
        nonlocal marked
        if not marked:
            await b.retry(f"mark {name}'s included paths",
                          lambda: b.stores[name].mark_joining(included))
            marked = True
            b.exclude(name, exclude, included, rescan=False)

    try:
        # The marker, the exclude list and the rescan that sets the paths aside, in
        # one hold of the subtree's lock: no apply of a re-read event and no capture
        # meets what joins before (a missing znode does not tell when it went).
        await b.retry(f"rescan {name}", lambda: b.watching.scan(name, watched=True, first=mark))
    finally:
        if not marked:
            # The term ended first: its successor compares the exclude list the
            # topics were read under with this one, and marks them.
            b.exclude(name, exclude, included)
    start(b, name)


async def finish(b: Bridge, name: str) -> None:
    """Once caught up with the peers: publish what is left, then remove the marker.

    Before the bridge reports ready, so a region's first start is over only
    when its own znodes are on its topic.
    """
    store = b.stores[name]
    if store.joining is None:
        return
    await b.inbound.caught_up.wait()
    while not b.inbound.reread_done(name):  # the peers' events for included paths
        await b.inbound.went_round.wait()
    async with b.locks[name]:
        assert store.joining is not None
        # The rest took a peer's version (or were changed and captured meanwhile).
        left = {r: read for r, read in store.joining.items() if store.untouched(r)}
        scope, store.joining, store.join_scope = store.join_scope, None, None
        store.join_records.clear()
        # As the scan read them: one notified since is read again (``Outbound.flush``).
        # Per-node watches were armed after that read: all are read again.
        read = {r: v for r, v in left.items() if v is not None}
        await b.start_up.during(
            f"join:{name}", startup.capturing(b, name, lambda: len(left),
                                              "changes the scan found that no peer has"),
            b.outbound.flush(name, set(left),
                             prefetched=read if b.watching.tree_watch else None))
        failpoints.hit(failpoints.JOIN_ENDING)
        # The list first: it never outlives its marker.
        await b.retry("forget the join's list", lambda: joinlist.drop(b.zk, store.layout))
        store.join_held, store.join_list_line = None, None
        # Fenced: a deposed leader must not end the next one's join. Refused: a
        # retry after a lost answer, which committed.
        with contextlib.suppress(VersionConflict, MissingNode):
            await b.retry("end joining", lambda: b.zk.multi([Delete(store.layout.joining)]))
    log.info("subtree_joined", subtree=name, published=len(left),
             paths=list(scope or ("/",)),
             action="published the znodes no peer had; the others took the peers' versions")
