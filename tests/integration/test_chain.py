"""A receiver's backlog applied as a chain (``bridge.chain``), against a real server.

Each group's ``multi`` goes out before the one before it answers; order,
exactly-once positions and version checks must hold as with one apply at a
time: nothing after a failed ``multi`` commits, and the caches go back to
what the committed prefix left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from bridge import statecodec
from bridge.acl import AclPolicy
from bridge.batching import MAX_BATCH_EVENTS
from bridge.clock import HybridClock
from bridge.config import ZooKeeperSettings
from bridge.layout import Layout
from bridge.model import Event, Op, VectorClock
from bridge.plan import Applied, Outcome
from bridge.store import LocalChanges, SubtreeStore
from bridge.zk import ZooKeeper
from tests.harness.procs import wait_for
from tests.harness.zookeeper import KazooFactory, ZkServers
from tests.integration.federation import Federation, Region
from tests.integration.test_ordering import PointerReader, _counters

pytestmark = [pytest.mark.integration, pytest.mark.every_zookeeper]

PEER = "r1"


class Sends:
    """Records when each ``multi`` was sent and answered (the chain's overlap)."""

    def __init__(self, zk: ZooKeeper) -> None:
        self.log: list[tuple[str, int]] = []
        self._commit = zk.commit
        zk.commit = self.commit  # type: ignore[method-assign]

    async def commit(self, ops: Sequence[Any], **kw: Any) -> tuple[list[Any], int]:
        n = sum(1 for e in self.log if e[0] == "sent")
        self.log.append(("sent", n))
        try:
            return await self._commit(ops, **kw)
        finally:
            self.log.append(("answered", n))


def put(clock: HybridClock, subtree: str, rel: str, n: int, data: bytes) -> Event:
    return Event(origin=PEER, subtree=subtree, path=rel, op=Op.PUT,
                 vc=VectorClock.of({PEER: n}), ts=clock.now(), writer=PEER, data=data)


def delete(clock: HybridClock, subtree: str, rel: str, n: int) -> Event:
    return Event(origin=PEER, subtree=subtree, path=rel, op=Op.DELETE,
                 vc=VectorClock.of({PEER: n}), ts=clock.now(), writer=PEER)


async def _store(hosts: str, token: str) -> tuple[ZooKeeper, SubtreeStore]:
    zk = ZooKeeper(ZooKeeperSettings(hosts=hosts, session_timeout=10))
    await zk.start()
    state = f"/{token}/state"
    await zk.take_epoch(f"{state}/epoch", b"test")
    store = SubtreeStore(zk, Layout(state, "s", f"/{token}/app"), region="r2",
                         clock=HybridClock(), max_data_bytes=1 << 20, exclude=(),
                         acl=AclPolicy("open", None))
    await store.setup()
    await store.positions.read(PEER)
    return zk, store


def _groups(clock: HybridClock) -> list[tuple[list[Event], dict[int, int]]]:
    """Three groups: creates; creates and an update of a path the first created; a
    delete of a path each of them created, and a put."""
    first = [put(clock, "s", f"/a/x{i}", 1, b"a%d" % i) for i in range(300)]
    second = [put(clock, "s", f"/b/y{i}", 1, b"b%d" % i) for i in range(300)]
    second.append(put(clock, "s", "/a/x0", 2, b"a0 again"))
    third = [delete(clock, "s", "/a/x1", 2), delete(clock, "s", "/b/y0", 2),
             put(clock, "s", "/ptr", 1, b"299")]
    return [(first, {0: 300}), (second, {0: 601}), (third, {0: 604})]


def test_a_chain_sends_each_multi_before_the_last_answers_and_keeps_order(
    zk_servers: ZkServers, zk: KazooFactory, token: str
) -> None:
    hosts = zk_servers.regions[0].hosts
    app = zk()

    async def run() -> tuple[list[Applied], list[tuple[str, int]], dict[str, Any]]:
        adapter, store = await _store(hosts, token)
        try:
            sends = Sends(adapter)
            done = await store.apply_chain(_groups(store.clock), PEER)
            cached = dict(store.metas)  # metadata and versions, as the chain left them
            await store.refresh_meta(r for r in cached if r != "/")
            assert store.metas == cached  # as committed
            return done, sends.log, {"positions": await store.positions.read(PEER)}
        finally:
            await adapter.stop()

    done, log, got = asyncio.run(run())
    assert len(done) == 3
    assert all(o is Outcome.APPLIED for d in done for _, o in d.outcomes)
    # The second multi went out before the first answered: they overlapped.
    assert log.index(("sent", 1)) < log.index(("answered", 0)), log
    assert got["positions"] == {0: 604}
    root = f"/{token}/app"
    assert app.get(f"{root}/a/x0")[0] == b"a0 again"
    assert app.exists(f"{root}/a/x1") is None and app.exists(f"{root}/b/y0") is None
    assert len(app.get_children(f"{root}/a")) == 299
    assert len(app.get_children(f"{root}/b")) == 299
    assert app.get(f"{root}/ptr")[0] == b"299"


def test_after_a_failed_multi_nothing_later_commits_and_the_caches_go_back(
    zk_servers: ZkServers, zk: KazooFactory, token: str
) -> None:
    hosts = zk_servers.regions[0].hosts
    app = zk()
    root = f"/{token}/app"

    async def run() -> dict[str, Any]:
        adapter, store = await _store(hosts, token)
        try:
            clock = store.clock
            seed = [put(clock, "s", "/a/x0", 1, b"seed")]
            await store.apply(seed, (PEER, {0: 1}))
            before = dict(store.metas)
            groups = [
                ([put(clock, "s", f"/a/n{i}", 1, b"n") for i in range(100)], {0: 101}),
                ([put(clock, "s", "/a/x0", 2, b"from r1")], {0: 102}),
                ([put(clock, "s", f"/c/z{i}", 1, b"z") for i in range(100)], {0: 202}),
            ]
            plan_apply = store._plan_apply
            planned = 0

            def racing(*args: Any, **kw: Any) -> Any:
                nonlocal planned
                planned += 1
                if planned == 2:  # an application writes while the chain is in flight
                    app.set(f"{root}/a/x0", b"local")
                return plan_apply(*args, **kw)

            store._plan_apply = racing  # type: ignore[method-assign]
            done = await store.apply_chain(groups, PEER)
            store._plan_apply = plan_apply  # type: ignore[method-assign]
            out: dict[str, Any] = {"done": len(done)}
            out["x0_meta"] = store.metas["/a/x0"] == before["/a/x0"]
            out["z_cached"] = [r for r in store.metas if r.startswith("/c")]
            out["suspect"] = "/a/x0" in store._suspect
            try:
                await store.apply(groups[1][0], (PEER, groups[1][1]))
                out["local"] = None
            except LocalChanges as exc:
                out["local"] = exc.rels
            out["positions"] = await store.positions.read(PEER)
            out["meta_path"] = store.layout.meta("/a/x0")
            return out
        finally:
            await adapter.stop()

    out = asyncio.run(run())
    assert out["done"] == 1  # the first group; the second failed, the third with it
    assert app.exists(f"{root}/c") is None  # never committed, though sent
    assert out["positions"] == {0: 101}
    assert out["x0_meta"] and out["z_cached"] == []  # back to what the prefix left
    assert out["suspect"]
    assert out["local"] == ["/a/x0"]  # the application's write is announced first
    assert app.get(f"{root}/a/x0")[0] == b"local"
    meta = statecodec.decode_meta(app.get(out["meta_path"])[0])
    assert meta is not None and meta.vc == VectorClock.of({PEER: 1})  # the seed's


def _published_backlog(fed: Federation, n: int) -> None:
    """r1 writes ``n`` records and flips /ptr after each, while r2 is down; until published."""
    r1 = fed["r1"]
    r1.client.ensure_path(r1.path("/data"))
    for i in range(1, n + 1):
        r1.client.create(r1.path(f"/data/d{i}"), str(i).encode())
        if i == 1:
            r1.client.create(r1.path("/ptr"), b"1")
        else:
            r1.client.set(r1.path("/ptr"), str(i).encode())
    # Published in full: each create once, the pointer as often as captures saw it move.
    key = f"published:{fed.subtree}"
    seen: list[int] = []

    def quiet() -> bool:
        seen.append(_counters(fed, "r1").get(key, 0))
        return len(seen) > 4 and seen[-1] > n and seen[-1] == seen[-5]

    wait_for(quiet, 60, message=lambda: f"r1 never published the backlog: {_counters(fed, 'r1')}")


BACKLOG = 1500  # 3,000 events: groups of 1,000 at most, so several chain


def _backlog_for_r2(fed: Federation) -> Region:
    fed.start("r1")
    _published_backlog(fed, BACKLOG)
    r2 = fed["r2"]
    r2.client.ensure_path(r2.mount)
    return r2


def _read_to_the_end(fed: Federation, reader: PointerReader) -> None:
    wait_for(lambda: reader.last == BACKLOG, 90, message="r2's reader never saw the last ptr")


def test_a_backlog_arrives_as_chains_and_the_pointer_never_dangles(
    federation: Federation,
) -> None:
    fed = federation
    r2 = _backlog_for_r2(fed)
    with PointerReader(r2.client, r2.mount) as reader:
        fed.start("r2")
        _read_to_the_end(fed, reader)
    assert reader.dangling == 0 and reader.backwards == 0, vars(reader)
    fed.wait_converged(["r1", "r2"])
    wait_for(lambda: _counters(fed, "r2").get(f"apply_chains:{fed.subtree}", 0) >= 1, 15,
             message=lambda: f"r2 applied no chain: {_counters(fed, 'r2')}")
    fed.assert_clean_logs()


def test_a_receiver_killed_inside_a_chain_resumes_exactly_after_what_committed(
    federation: Federation,
) -> None:
    fed = federation
    r2 = _backlog_for_r2(fed)
    with PointerReader(r2.client, r2.mount) as reader:
        # Dies right after the chain's first group answered, later ones in flight.
        fed.crash_at("r2", "after_apply_before_position=crash@1")
        before = {c: r2.client.exists(r2.path(f"/data/{c}")).mzxid
                  for c in r2.client.get_children(r2.path("/data"))}
        # More than one group's worth: the groups after the first were in flight.
        assert len(before) > MAX_BATCH_EVENTS, len(before)
        fed.start("r2")
        _read_to_the_end(fed, reader)
    assert reader.dangling == 0 and reader.backwards == 0, vars(reader)
    fed.wait_converged(["r1", "r2"])
    after = {c: r2.client.exists(r2.path(f"/data/{c}")).mzxid for c in before}
    assert after == before  # what committed before the crash was not applied again
    fed.assert_clean_logs()
