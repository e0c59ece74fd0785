"""The ACL cache of a subtree (``AclPolicy``): which reads a capture makes, and when.

A stand-in session counts and answers getACLs; ``release`` holds answers back
so a test can see who waits for what.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from bridge.acl import HOLD, AclPolicy
from bridge.errors import ZooKeeperError
from bridge.zk import WORLD_ALL, AclRead

NARROW = ("31:digest:alice:hash",)
Carried = tuple[str, ...] | str | None


class Acls:
    def __init__(self, acls: dict[str, AclRead | None]) -> None:
        self.acls = acls
        self.asked: list[str] = []
        self.synced = 0
        self.release = asyncio.Event()
        self.release.set()
        self.fail = False

    async def sync(self, path: str) -> None:
        self.synced += 1

    async def get_acls_many(self, paths: Sequence[str]) -> list[AclRead | None]:
        await self.release.wait()
        if self.fail:
            raise ZooKeeperError("connection loss")
        self.asked += paths
        return [self.acls[p] for p in paths]


def _policy(policy: str = "open") -> AclPolicy:
    return AclPolicy(policy, None)


def test_a_znode_created_again_is_read_again_though_its_aversion_is_the_same() -> None:
    async def run() -> list[object]:
        zk = Acls({"/a/x": AclRead(WORLD_ALL, 0, 10)})
        acl = _policy()
        first = await acl.announce_many(zk, [("/a/x", "/x", 10, 0)])  # type: ignore[arg-type]
        again = await acl.announce_many(zk, [("/a/x", "/x", 10, 0)])  # type: ignore[arg-type]
        asked = len(zk.asked)
        zk.acls["/a/x"] = AclRead(NARROW, 0, 20)  # deleted, created again narrower
        recreated = await acl.announce_many(zk, [("/a/x", "/x", 20, 0)])  # type: ignore[arg-type]
        return [first, again, asked, recreated, len(zk.asked)]

    first, again, asked, recreated, total = asyncio.run(run())
    assert first == again == [None] and asked == 1  # read once while it stays the same
    assert recreated == [HOLD] and total == 2  # open policy: never widened


def test_a_capture_takes_what_a_scan_read_ahead_and_waits_for_what_is_under_way() -> None:
    async def run() -> tuple[list[Carried], list[str], int]:
        zk = Acls({f"/a/n{i}": AclRead(WORLD_ALL if i % 2 else NARROW, 0, i) for i in range(6)})
        zk.release.clear()
        acl = _policy("copy")
        acl.prefetch(zk, [(f"/a/n{i}", f"/n{i}") for i in range(6)], "/a")  # type: ignore[arg-type]
        puts = [(f"/a/n{i}", f"/n{i}", i, 0) for i in range(6)]
        announcing = asyncio.ensure_future(acl.announce_many(zk, puts))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        assert not announcing.done()  # waits for the read ahead, does not read again
        zk.release.set()
        got = await announcing
        return got, zk.asked, zk.synced

    got, asked, synced = asyncio.run(run())
    assert got == [NARROW, None, NARROW, None, NARROW, None]
    assert sorted(asked) == sorted(f"/a/n{i}" for i in range(6))  # each once, ahead
    assert synced == 1  # its session may lag the scan's: synced first


def test_what_a_read_ahead_missed_or_got_stale_the_capture_reads_itself() -> None:
    async def run() -> tuple[list[Carried], list[str], list[Carried], list[str]]:
        zk = Acls({"/a/x": AclRead(WORLD_ALL, 0, 1), "/a/y": AclRead(WORLD_ALL, 0, 2)})
        acl = _policy()
        acl.prefetch(zk, [("/a/x", "/x"), ("/a/y", "/y")], "/a")  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        zk.asked.clear()
        # /y had its ACL set since the read ahead: aversion 1 now.
        zk.acls["/a/y"] = AclRead(NARROW, 1, 2)
        got = await acl.announce_many(zk, [("/a/x", "/x", 1, 0),  # type: ignore[arg-type]
                                           ("/a/y", "/y", 2, 1)])
        asked = list(zk.asked)
        # A read ahead that failed leaves it to the capture, which is not held up.
        zk.fail, zk.asked = True, []
        acl.prefetch(zk, [("/a/z", "/z")], "/a")  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        zk.fail = False
        zk.acls["/a/z"] = AclRead(WORLD_ALL, 0, 3)
        after = await acl.announce_many(zk, [("/a/z", "/z", 3, 0)])  # type: ignore[arg-type]
        return got, asked, after, zk.asked

    got, asked, after, asked_after = asyncio.run(run())
    assert got == [None, HOLD] and asked == ["/a/y"]
    assert after == [None] and asked_after == ["/a/z"]


def test_stopping_the_reads_ahead_lets_a_waiting_capture_go_on() -> None:
    async def run() -> tuple[list[Carried], list[str]]:
        zk = Acls({"/a/x": AclRead(WORLD_ALL, 0, 1)})
        zk.release.clear()
        acl = _policy()
        acl.prefetch(zk, [("/a/x", "/x")], "/a")  # type: ignore[arg-type]
        announcing = asyncio.ensure_future(
            acl.announce_many(zk, [("/a/x", "/x", 1, 0)]))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        await acl.stop_reading_ahead()  # the term ended
        zk.release.set()
        return await asyncio.wait_for(announcing, 1), zk.asked

    got, asked = asyncio.run(run())
    assert got == [None] and asked == ["/a/x"]  # read by the capture itself


def test_a_scan_keeps_only_the_acls_of_the_znodes_it_found() -> None:
    async def run() -> tuple[int, int, int]:
        zk = Acls({f"/a/{n}": AclRead(WORLD_ALL, 0, 1) for n in ("x", "y", "z")})
        acl = _policy()
        await acl.announce_many(zk, [(f"/a/{n}", f"/{n}", 1, 0)  # type: ignore[arg-type]
                                     for n in ("x", "y", "z")])
        full = acl.cached
        acl.forget("/z")  # a captured delete
        after_delete = acl.cached
        acl.retain(["/x"])  # a scan found only /x
        return full, after_delete, acl.cached

    assert asyncio.run(run()) == (3, 2, 1)
