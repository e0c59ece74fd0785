"""The ordered log, end to end: origin order across paths, atomic batches, exactly-once apply.

A reader in another region may only ever see states the origin had at batch
boundaries: never a pointer before the data it points at, never a step back.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

from bridge.config import ZooKeeperSettings
from bridge.zk import Node, ZooKeeper
from tests.harness.procs import wait_for
from tests.integration.federation import Federation, Region

pytestmark = pytest.mark.integration


class PointerReader:
    """Polls ``/ptr`` in one region, then looks up the record it names (as applications do)."""

    def __init__(self, client: KazooClient, mount: str) -> None:
        self.client, self.mount = client, mount
        self.reads = self.dangling = self.backwards = 0
        self.last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    n = int(self.client.get(f"{self.mount}/ptr")[0])
                except NoNodeError:
                    time.sleep(0.001)
                    continue
                self.reads += 1
                if n < self.last:
                    self.backwards += 1
                self.last = max(self.last, n)
                if self.client.exists(f"{self.mount}/data/d{n}") is None:
                    self.dangling += 1
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def __enter__(self) -> PointerReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.error is not None:
            raise self.error


def in_windows(results: Iterable[Any], window: int) -> None:
    """Wait for kazoo async results ``window`` at a time: many writes in flight, not all."""
    pending: list[Any] = []
    for r in results:
        pending.append(r)
        if len(pending) >= window:
            for p in pending:
                p.get(timeout=30)
            pending = []
    for p in pending:
        p.get(timeout=30)


def _pointer_run(fed: Federation, iterations: int,
                 during: Callable[[int], None] = lambda i: None) -> PointerReader:
    r1, r2 = fed["r1"], fed["r2"]
    r1.client.ensure_path(r1.path("/data"))
    with PointerReader(r2.client, r2.mount) as reader:
        for i in range(1, iterations + 1):
            r1.client.create(r1.path(f"/data/d{i}"), str(i).encode())
            if r1.client.exists(r1.path("/ptr")) is None:
                r1.client.create(r1.path("/ptr"), str(i).encode())
            else:
                r1.client.set(r1.path("/ptr"), str(i).encode())
            during(i)
        wait_for(lambda: reader.last == iterations, 90, message="reader never saw the last ptr")
    return reader


def test_pointer_pattern_never_dangles_nor_goes_back(federation: Federation) -> None:
    fed = federation
    fed.start_all()
    reader = _pointer_run(fed, 600)
    print(f"pointer pattern: {reader.reads} reads, {reader.dangling} dangling, "
          f"{reader.backwards} backwards")
    assert reader.reads > 100
    assert reader.dangling == 0
    assert reader.backwards == 0
    fed.wait_converged()
    fed.assert_clean_logs()


def test_pointer_pattern_holds_under_pipelined_writes(federation: Federation) -> None:
    """Thousands of writes in flight at once: captures read while notifications of
    later writes keep arriving, so batches close on the notifications' frames."""
    fed = federation
    fed.start("r1")
    fed.start("r2")
    r1, r2 = fed["r1"], fed["r2"]
    r1.client.ensure_path(r1.path("/data"))
    # ptr starts at 0 and names d0: a reader that sees ptr before the first
    # write arrives must find its record (CI once counted 54 reads of ptr = 0).
    r1.client.create(r1.path("/data/d0"), b"0")
    r1.client.create(r1.path("/ptr"), b"0")
    n = 3000
    def writes() -> Iterator[Any]:
        for i in range(1, n + 1):
            # One session, so ZooKeeper applies them in this order: d_i before ptr = i.
            yield r1.client.create_async(r1.path(f"/data/d{i}"), str(i).encode())
            yield r1.client.set_async(r1.path("/ptr"), str(i).encode())

    with PointerReader(r2.client, r2.mount) as reader:
        in_windows(writes(), 400)
        wait_for(lambda: reader.last == n, 90, message="reader never saw the last ptr")
    print(f"pointer pattern, pipelined: {reader.reads} reads, {reader.dangling} dangling, "
          f"{reader.backwards} backwards")
    assert reader.reads > 100
    assert reader.dangling == 0
    assert reader.backwards == 0
    fed.wait_converged(["r1", "r2"])
    fed.assert_clean_logs()


def test_order_holds_when_a_capture_reads_in_several_replies(federation: Federation) -> None:
    """A capture of many paths reads them in several multiReads (500 znodes each;
    4 here), each a snapshot at its own zxid. The application sets ``/a`` then
    ``/z``, amid writes to other paths; ``/a`` is read by an earlier reply than
    ``/z``. A batch holding a newer ``/z`` than ``/a`` is a state the origin
    never had: a reader in the other region checks that ``/a`` never lags."""
    fed = federation
    fed.start("r1", env={"ZKBRIDGE_READ_CHUNK": "4"})
    fed.start("r2")
    r1, r2 = fed["r1"], fed["r2"]
    noise = [f"/m/k{i:02d}" for i in range(40)]
    for rel in ["/a", "/z", *noise]:
        r1.client.create(r1.path(rel), b"0", makepath=True)
    fed.wait_converged(["r1", "r2"])
    reads = torn = 0
    stop = threading.Event()

    def read() -> None:
        nonlocal reads, torn
        while not stop.is_set():
            z = int(r2.client.get(r2.path("/z"))[0])
            a = int(r2.client.get(r2.path("/a"))[0])  # after /z: never older than it
            reads += 1
            torn += a < z

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        n = 1500

        def writes() -> Iterator[Any]:
            for i in range(1, n + 1):
                yield r1.client.set_async(r1.path("/a"), str(i).encode())
                for rel in noise[i % 8 :: 8]:
                    yield r1.client.set_async(r1.path(rel), str(i).encode())
                yield r1.client.set_async(r1.path("/z"), str(i).encode())

        in_windows(writes(), 300)
        wait_for(lambda: r2.client.get(r2.path("/z"))[0] == str(n).encode(), 90,
                 message="r2 never saw the last /z")
    finally:
        stop.set()
        reader.join(10)
    print(f"several replies per read: {reads} reads of /z then /a, {torn} with /a older")
    assert reads > 100
    assert torn == 0
    fed.wait_converged(["r1", "r2"])
    fed.assert_clean_logs()


@pytest.mark.parametrize("killed", ["r2", "r1"], ids=["receiver", "origin"])
def test_pointer_pattern_holds_while_a_bridge_is_killed(federation: Federation,
                                                        killed: str) -> None:
    """The receiver restarts from its positions; the origin's start-up scan finds what
    changed while it was down, with the writer still going, and its capture reads again
    what was notified since the scan read it."""
    fed = federation
    fed.start_all()

    def kill_and_restart(i: int) -> None:
        if i in (150, 350):
            fed.kill(killed)
        if i in (200, 400):
            fed.start(killed, wait=False)

    reader = _pointer_run(fed, 500, kill_and_restart)
    print(f"pointer pattern, {killed} killed: {reader.reads} reads, {reader.dangling} "
          f"dangling, {reader.backwards} backwards")
    assert reader.dangling == 0
    assert reader.backwards == 0
    fed.wait_converged()
    fed.assert_clean_logs()


def test_values_changed_during_the_origin_start_up_scan_arrive(federation: Federation) -> None:
    """The capture after a scan reads again what was notified since the scan read it:
    a value the scan read and an application changed right after must not stay behind."""
    fed = federation
    fed.start("r2")
    r1 = fed["r1"]
    n = 2000
    r1.client.ensure_path(r1.path("/s"))
    in_windows((r1.client.create_async(r1.path(f"/s/k{i:04d}"), b"0") for i in range(n)), 400)
    fed.start("r1", wait=False)
    # Every znode set once per round, until the start-up scan is done: some are set
    # after the scan read them, and the round in progress is the last change of each.
    rounds = 0
    while not any(e.get("event") == "scan_done" and e.get("znodes", 0) >= n
                  for e in fed.events("r1")):
        rounds += 1
        assert rounds < 1000, "the start-up scan never finished"
        in_windows((r1.client.set_async(r1.path(f"/s/k{i:04d}"), str(rounds).encode())
                    for i in range(n)), 400)
    print(f"{rounds} rounds of {n} sets while r1 started")
    fed.wait_ready("r1")
    fed.wait_converged(["r1", "r2"], meta=False)
    assert fed.tree("r2")["/s/k0000"] != b"0"
    fed.assert_clean_logs()


def test_an_application_multi_arrives_whole(federation: Federation) -> None:
    fed = federation
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    paths = [f"/m/k{i}" for i in range(10)]
    for p in paths:
        r1.client.create(r1.path(p), b"0", makepath=True)
    fed.wait_converged(["r1", "r2"])
    rounds = 150
    torn = reads = 0
    stop = threading.Event()

    async def poll() -> None:
        nonlocal torn, reads
        zk = ZooKeeper(ZooKeeperSettings(hosts=r2.hosts))
        await zk.start()
        try:
            while not stop.is_set():
                nodes = await zk.read_many([("data", r2.path(p)) for p in paths])
                values = {n.data for n in nodes if isinstance(n, Node)}
                reads += 1
                torn += len(values) > 1
                await asyncio.sleep(0.001)
        finally:
            await zk.stop()

    thread = threading.Thread(target=lambda: asyncio.run(poll()))
    thread.start()
    try:
        for k in range(1, rounds + 1):
            t = r1.client.transaction()
            for p in paths:
                t.set_data(r1.path(p), str(k).encode())
            assert all(r is True or not isinstance(r, Exception) for r in t.commit())
        wait_for(lambda: r2.client.get(r2.path(paths[-1]))[0] == str(rounds).encode(), 60)
    finally:
        stop.set()
        thread.join(10)
    print(f"application multi: {reads} snapshot reads in r2, {torn} torn")
    assert reads > 50
    assert torn == 0
    fed.assert_clean_logs()


def _counters(fed: Federation, name: str) -> dict[str, int]:
    data, _ = fed[name].client.get(f"{fed.state_path}/status")
    return dict(json.loads(data)["counters"])


def test_a_receiver_does_not_read_back_what_it_applied(federation: Federation) -> None:
    fed = federation
    fed.start("r1")
    fed.start("r2")
    r1, r2 = fed["r1"], fed["r2"]
    applied = f"applied:{fed.subtree}:applied"
    reads = f"capture_reads:{fed.subtree}"
    before = _counters(fed, "r2")
    for i in range(40):
        r1.client.create(r1.path(f"/s{i}"), b"0")
    for round_ in range(1, 6):
        for i in range(40):
            r1.client.set(r1.path(f"/s{i}"), str(round_).encode())
        time.sleep(0.05)  # several batches, not one
    fed.wait_converged(["r1", "r2"])
    wait_for(lambda: _counters(fed, "r2").get(applied, 0) - before.get(applied, 0) >= 40, 30,
             message="r2's status never counted the applies")
    time.sleep(0.5)  # any read-back of the last applies would have happened by now
    after = _counters(fed, "r2")
    # Its persistent watch reported every znode it wrote; before, each apply
    # was followed by a capture reading those znodes back, to find nothing.
    settled = after.get(f"own_notifications_settled:{fed.subtree}", 0)
    assert settled >= 40, after
    assert after.get(reads, 0) - before.get(reads, 0) <= 2, (before, after)
    # An application write in r2 is still captured and reaches r1.
    r2.client.set(r2.path("/s0"), b"from r2")
    wait_for(lambda: r1.client.get(r1.path("/s0"))[0] == b"from r2", 30,
             message="r2's own write never reached r1")
    fed.assert_clean_logs()


def test_exactly_once_apply_across_a_crash_after_the_multi(federation: Federation) -> None:
    fed = federation
    fed.start("r1")
    r1, r2 = fed["r1"], fed["r2"]
    for i in range(30):
        r1.client.create(r1.path(f"/x{i}"), b"v")
    # r2 dies right after its first apply multi committed (content and position).
    fed.crash_at("r2", "after_apply_before_position=crash@1")
    before = {}
    for i in range(30):
        stat = r2.client.exists(r2.path(f"/x{i}"))
        if stat is not None:
            before[i] = stat.mzxid
    assert before, "the first batch was not applied before the crash"
    fed.start("r2")
    fed.wait_converged(["r1", "r2"])
    after = {i: r2.client.exists(r2.path(f"/x{i}")).mzxid for i in before}
    assert after == before  # nothing applied twice
    skipped = [e for e in fed.events("r2")[-2000:] if e.get("event") == "conflict_resolved"]
    assert not skipped
    fed.assert_clean_logs()


def write_large_records(region: Region, count: int) -> None:
    """``count`` records of 300 KB under /data, then /ptr naming the last."""
    region.client.ensure_path(region.path("/data"))
    big = b"z" * 300_000
    for i in range(1, count + 1):
        region.client.create(region.path(f"/data/d{i}"), big + str(i).encode())
    region.client.create(region.path("/ptr"), str(count).encode())


def test_a_batch_over_a_megabyte_is_split_in_order(federation: Federation) -> None:
    fed = federation
    r1, r2 = fed["r1"], fed["r2"]
    fed.start("r2")
    # Written while r1's bridge is down: its start-up scan captures them as one
    # change set of about 1.5 MB, more than one ZooKeeper request carries.
    write_large_records(r1, 5)
    with PointerReader(r2.client, r2.mount) as reader:
        fed.start("r1")
        wait_for(lambda: reader.last == 5, 60, message="ptr never arrived")
    assert reader.dangling == 0
    assert fed.count_events("r1", "batch_split") >= 1
    fed.wait_converged(["r1", "r2"])
    fed.assert_clean_logs()


def test_a_split_batch_whose_middle_piece_lost_its_answer_keeps_order(
        federation: Federation) -> None:
    # Each piece of a split batch is built while the one before it is
    # written: here the second piece commits but its answer is lost, with the
    # third already built over what the second wrote. That one must be
    # dropped, the second published from the outbox, the rest captured again.
    fed = federation
    r1, r2 = fed["r1"], fed["r2"]
    fed.start("r2")
    write_large_records(r1, 7)
    with PointerReader(r2.client, r2.mount) as reader:
        fed.start("r1", env={"ZKBRIDGE_FAILPOINTS": "capture_committed=lose@2"})
        wait_for(lambda: reader.last == 7, 60, message="ptr never arrived")
    assert reader.dangling == 0
    assert fed.count_events("r1", "batch_split") >= 1
    assert fed.count_events("r1", "outbox_reread") >= 1
    fed.wait_converged(["r1", "r2"])
    fed.assert_clean_logs()


def test_per_node_watches_when_the_server_refuses_add_watch(federation: Federation) -> None:
    fed = federation
    for name in fed.regions:
        fed.start(name, env={"ZKBRIDGE_REFUSE_ADDWATCH": "1"}, wait=False)
    for name in fed.regions:
        fed.wait_ready(name)
    assert fed.count_events("r1", "persistent_watch_unsupported") >= 1
    r1, r2 = fed["r1"], fed["r2"]
    r1.client.create(r1.path("/a/b/c"), b"1", makepath=True)
    r2.client.create(r2.path("/z"), b"2")
    fed.wait_converged()
    r1.client.set(r1.path("/a/b"), b"changed")
    r1.client.create(r1.path("/a/b/d"), b"new")
    r2.client.delete(r2.path("/z"))
    fed.wait_converged()
    r2.client.delete(r2.path("/a"), recursive=True)
    fed.wait_converged()
    assert fed.tree("r1") == {}
    fed.assert_clean_logs()
