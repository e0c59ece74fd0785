"""The request types bridge.zk adds to kazoo (multiRead, addWatch), against a real server.

Batch closure rests on two server facts checked here: a read-only multi is
answered as one snapshot (never half before and half after a write), and a
persistent recursive watch reports every change below its root, in order,
before the reply to any later request on the same session. The receiver's
capture leaves out its own applies on the same fact, through frame numbers.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from kazoo.exceptions import NoNodeError

from bridge.config import ZooKeeperSettings
from bridge.errors import NoPermission, VersionConflict
from bridge.zk import Create, Node, SetData, Stat, ZooKeeper
from tests.conftest import ZkServers
from tests.harness.zookeeper import KazooFactory

pytestmark = [pytest.mark.integration, pytest.mark.every_zookeeper]


def _adapter(zk_servers: ZkServers) -> ZooKeeper:
    return ZooKeeper(ZooKeeperSettings(hosts=zk_servers.regions[0].hosts, session_timeout=10))


def test_multi_read_returns_data_listings_and_per_op_errors(
    zk_servers: ZkServers, zk: KazooFactory, token: str
) -> None:
    from kazoo.security import make_digest_acl

    client = zk()
    root = f"/{token}"
    client.create(f"{root}/a", b"A", makepath=True)
    client.create(f"{root}/b", b"", makepath=True)
    secret_acl = [make_digest_acl("alice", "s3cret", all=True)]
    client.create(f"{root}/secret", b"hidden", acl=secret_acl)

    async def run() -> list[object]:
        adapter = _adapter(zk_servers)
        await adapter.start()
        try:
            return await adapter.read_many([
                ("data", f"{root}/a"), ("data", f"{root}/missing"),
                ("children", root), ("data", f"{root}/secret"), ("data", f"{root}/b"),
            ])
        finally:
            await adapter.stop()

    a, missing, names, secret, b = asyncio.run(run())
    assert isinstance(a, Node) and a.data == b"A" and a.stat.version == 0
    assert missing is None
    assert sorted(names) == ["a", "b", "secret"]  # type: ignore[arg-type]
    assert isinstance(secret, NoPermission)
    assert isinstance(b, Node) and b.data == b""


def test_multi_read_is_one_snapshot_under_concurrent_multis(
    zk_servers: ZkServers, zk: KazooFactory, token: str
) -> None:
    """A writer bumps two znodes together in one multi; no read may see them differ."""
    writer = zk()
    root = f"/{token}"
    writer.create(f"{root}/x", b"0", makepath=True)
    writer.create(f"{root}/y", b"0")
    stop = threading.Event()

    def write() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            t = writer.transaction()
            t.set_data(f"{root}/x", str(n).encode())
            t.set_data(f"{root}/y", str(n).encode())
            t.commit()

    thread = threading.Thread(target=write)
    thread.start()

    async def read() -> tuple[int, int]:
        adapter = _adapter(zk_servers)
        await adapter.start()
        torn = reads = 0
        try:
            for _ in range(1500):
                x, y = await adapter.read_many([("data", f"{root}/x"), ("data", f"{root}/y")])
                reads += 1
                torn += x.data != y.data
        finally:
            await adapter.stop()
        return torn, reads

    try:
        torn, reads = asyncio.run(read())
    finally:
        stop.set()
        thread.join()
    assert reads == 1500
    assert torn == 0
    assert int(writer.get(f"{root}/x")[0]) > 100  # the writer really raced the reads


def test_recursive_watch_reports_every_change_before_a_later_reply(
    zk_servers: ZkServers, zk: KazooFactory, token: str
) -> None:
    app = zk()
    root = f"/{token}"
    app.create(root, b"")

    async def run() -> tuple[list[str], bool]:
        adapter = _adapter(zk_servers)
        seen: list[str] = []
        adapter.on_tree(lambda path, _frame: seen.append(path))
        await adapter.start()
        try:
            ok = await adapter.add_recursive_watch(root)
            # Writes by another session; one read on ours afterwards must
            # find every notification already delivered (FIFO per session).
            await asyncio.to_thread(app.create, f"{root}/a/b/c", b"1", makepath=True)
            await asyncio.to_thread(app.set, f"{root}/a", b"2")
            await asyncio.to_thread(app.delete, f"{root}/a/b/c")
            await adapter.read_many([("data", root)])
            await asyncio.sleep(0)  # callbacks are queued with call_soon_threadsafe
            return seen, ok
        finally:
            await adapter.stop()

    seen, ok = asyncio.run(run())
    assert ok
    assert seen == [f"{root}/a", f"{root}/a/b", f"{root}/a/b/c", f"{root}/a", f"{root}/a/b/c"]


def _set_once_created(client: Any, path: str) -> None:
    while True:
        try:
            client.set(path, b"app")
            return
        except NoNodeError:
            time.sleep(0.001)


def test_notifications_of_a_multi_are_numbered_below_its_reply_and_later_ones_above(
    zk_servers: ZkServers, zk: KazooFactory, token: str
) -> None:
    app = zk()
    root = f"/{token}"
    app.create(f"{root}/y", b"0", makepath=True)

    async def run() -> tuple[list[tuple[str, int]], int, int]:
        adapter = _adapter(zk_servers)
        seen: list[tuple[str, int]] = []
        adapter.on_tree(lambda path, frame: seen.append((path, frame)))
        await adapter.start()
        try:
            assert await adapter.add_recursive_watch(root)
            # Another session writes right behind our multi, as an application would.
            later = asyncio.create_task(asyncio.to_thread(_set_once_created, app, f"{root}/x"))
            _, frame = await adapter.commit(
                [Create(f"{root}/x", b"1"), SetData(f"{root}/y", b"1", 0)], fenced=False)
            await later
            await adapter.read_many([("data", root)])  # every notification is in by its reply
            await asyncio.sleep(0)
            second = await adapter.commit([SetData(f"{root}/y", b"2", 1)], fenced=False)
            await asyncio.sleep(0)
            return seen, frame, second[1]
        finally:
            await adapter.stop()

    seen, frame, second = asyncio.run(run())
    # Ours: created x, set y, both below the reply; the application's set of x after it.
    assert [(p, f < frame) for p, f in seen[:3]] == [
        (f"{root}/x", True), (f"{root}/y", True), (f"{root}/x", False)]
    assert frame < seen[2][1] < second
    assert seen[3][0] == f"{root}/y" and seen[2][1] < seen[3][1] < second
    assert len(seen) == 4


def test_a_read_sent_behind_a_multi_sees_its_outcome(
    zk_servers: ZkServers, zk: KazooFactory, token: str
) -> None:
    """Sent on the session right after a ``multi``, not waiting for its reply, a
    read is answered after it: never older than the multi, and it waits for the
    commit (why a large capture reads its ACLs on a second session)."""
    app = zk()
    root = f"/{token}"
    paths = [f"{root}/n{i:03}" for i in range(300)]
    for p in paths:
        app.create(p, b"0", makepath=True)

    async def run() -> list[tuple[list[bytes], bool]]:
        adapter = _adapter(zk_servers)
        await adapter.start()
        out: list[tuple[list[bytes], bool]] = []
        try:
            for k in range(1, 41):
                # Every fourth multi fails on its last check, so changes nothing.
                fails = k % 4 == 0
                version = -1 if not fails else 10_000
                ops = [SetData(p, str(k).encode(), -1) for p in paths[:-1]]
                ops.append(SetData(paths[-1], str(k).encode(), version))
                sending = asyncio.ensure_future(adapter.commit(ops, fenced=False))
                await asyncio.sleep(0)
                reading = asyncio.ensure_future(adapter.read_many([("data", p) for p in paths]))
                committed = True
                try:
                    await sending
                except VersionConflict:
                    committed = False
                nodes = await reading
                out.append(([n.data for n in nodes], committed))
        finally:
            await adapter.stop()
        return out

    last = b"0"
    for k, (values, committed) in enumerate(asyncio.run(run()), start=1):
        assert committed == (k % 4 != 0)
        if committed:
            last = str(k).encode()
        assert values == [last] * len(paths), (k, sorted(set(values)))


def test_refused_add_watch_is_reported_as_unsupported(zk_servers: ZkServers, token: str) -> None:
    async def run() -> bool:
        adapter = _adapter(zk_servers)
        adapter.refuse_add_watch = True
        await adapter.start()
        try:
            return await adapter.add_recursive_watch(f"/{token}")
        finally:
            await adapter.stop()

    assert asyncio.run(run()) is False


def _perms(i: int) -> int:
    return 1 | ((i % 16) << 1)  # READ, plus any of WRITE, CREATE, DELETE, ADMIN


def test_batched_socket_io_matches_thousands_of_pipelined_replies(
    zk_servers: ZkServers, zk: KazooFactory, token: str
) -> None:
    """Requests leave in one write and replies arrive many per read: each still meets its own."""
    from kazoo.security import ACL, Id

    client = zk()
    root = f"/{token}"
    n = 3000
    tx = client.transaction()
    client.ensure_path(root)
    for i in range(n):
        # Readable permissions that differ from one znode to the next, so a
        # reply matched to the wrong request shows.
        acl = [ACL(_perms(i), Id("world", "anyone"))]
        tx.create(f"{root}/n{i}", f"v{i}".encode() * (i % 50), acl=acl)
        if len(tx.operations) == 500:
            tx.commit()
            tx = client.transaction()
    tx.commit()
    paths = [f"{root}/n{i}" for i in range(n)] + [f"{root}/missing{i}" for i in range(200)]

    async def run() -> tuple[list[object], list[object], list[Stat | None]]:
        adapter = _adapter(zk_servers)
        await adapter.start()
        try:
            acls = adapter.get_acls_many(paths)
            stats = adapter.stats_many(paths)
            nodes = asyncio.gather(*(adapter.get(p) for p in paths))
            return list(await acls), list(await nodes), await stats
        finally:
            await adapter.stop()

    acls, nodes, stats = asyncio.run(run())
    for i in range(n):
        entry = acls[i]
        assert entry is not None and entry.entries == (f"{_perms(i)}:world:anyone",)
        node = nodes[i]
        assert isinstance(node, Node) and node.data == f"v{i}".encode() * (i % 50)
        stat = stats[i]
        assert stat is not None and stat.data_length == len(node.data)
    assert acls[n:] == [None] * 200 and nodes[n:] == [None] * 200 and stats[n:] == [None] * 200


BURST = 2000


def test_a_connection_reset_in_a_burst_fails_what_was_pending_and_the_session_goes_on(
    zk_servers: ZkServers, zk: KazooFactory, token: str
) -> None:
    from tests.harness.proxy import TcpProxy

    root = f"/{token}"
    big = b"x" * 200_000  # replies take a while: the reset lands amid them
    zk().create(root, big)
    server = zk_servers.regions[0]
    with TcpProxy(server.host, server.port) as proxy:
        async def run() -> tuple[int, int, Node | None]:
            adapter = ZooKeeper(ZooKeeperSettings(hosts=proxy.address, session_timeout=10))
            await adapter.start()
            try:
                burst = [asyncio.ensure_future(adapter.get(root)) for _ in range(BURST)]
                answered = asyncio.Event()
                done = [0]

                def count(_: object) -> None:
                    done[0] += 1
                    if done[0] == BURST // 20:
                        answered.set()

                for f in burst:
                    f.add_done_callback(count)
                await answered.wait()  # well under way: many requests in flight
                proxy.cut(refuse=True)
                await asyncio.sleep(0.5)
                proxy.restore()
                # Every request ends (answered or failed), none hangs to the timeout.
                async with asyncio.timeout(8):
                    got = await asyncio.gather(*burst, return_exceptions=True)
                ok = sum(isinstance(g, Node) and g.data == big for g in got)
                failed = sum(isinstance(g, Exception) for g in got)
                return ok, failed, await adapter.get(root)
            finally:
                await adapter.stop()

        ok, failed, after = asyncio.run(run())
    assert ok + failed == BURST and ok > 0 and failed > 0, (ok, failed)
    assert isinstance(after, Node) and after.data == big
