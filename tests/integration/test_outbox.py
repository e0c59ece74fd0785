"""A Kafka outage fills a sharded outbox and is drained afterwards (issue 11).

Scaled down from the issue's day at 50 writes/s: ``ZKBRIDGE_OUTBOX_WRITES``
writes (default 2,000, paced at about 200/s) land while the bridge cannot reach Kafka, into
buckets of 100 entries (the production size is 10,000) so that several
buckets fill. The harness section reports the figures.

The second test stops the bridge with its outbox full and restarts it: the
outbox is read back a chunk at a time (``ZKBRIDGE_QUEUE_RECORDS`` bounds the
queue), published in capture order, and the bridge's peak RSS is reported
against the number of entries (``ZKBRIDGE_DRAIN_WRITES`` writes of 2 KB to ten
znodes; ``ZKBRIDGE_DRAIN_CODE`` runs another checkout's bridge for the restart,
to compare).

The third fills the queue's byte bound with large values during an outage:
they spill to the outbox instead of piling up in the bridge's memory.

The fourth fills the outbox's own bound (``outbox_max_mb``) during an
outage: further changes update only the metadata, and the whole state is
published again once Kafka is back, across a SIGKILL while overflowed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kazoo.client import KazooClient

from bridge import codec
from bridge.model import Op
from tests.conftest import REGION_NAMES, ZkServers
from tests.harness.broker import Broker
from tests.harness.procs import free_port, wait_for
from tests.integration.federation import REPO, Federation, scrape
from tests.integration.test_kafka import _records

pytestmark = pytest.mark.integration

WRITES = int(os.environ.get("ZKBRIDGE_OUTBOX_WRITES") or 2000)
DRAIN_WRITES = int(os.environ.get("ZKBRIDGE_DRAIN_WRITES") or 3000)
# Another checkout's code for the restarted bridge (to compare its peak RSS).
DRAIN_CODE = Path(os.environ.get("ZKBRIDGE_DRAIN_CODE") or REPO)
PACE = 0.004
BUCKET = 100


@pytest.fixture
def fed(tmp_path: Path, token: str, proxied_broker: Broker, zk_servers: ZkServers
        ) -> Iterator[Federation]:
    servers = dict(zip(REGION_NAMES[:2], zk_servers.regions[:2], strict=True))
    f = Federation(tmp_path, token, proxied_broker, servers)
    try:
        yield f
    finally:
        f.close()


def entries(client: KazooClient, outbox: str) -> dict[str, int]:
    """Bucket → entries in it."""
    return {b: len(client.get_children(f"{outbox}/{b}")) for b in client.get_children(outbox)}


def captured(fed: Federation) -> int:
    data, _ = fed["r1"].client.get(f"{fed.state_path}/status")
    return int(json.loads(data)["counters"].get(f"captured:{fed.subtree}", 0))


@pytest.mark.timeout(900)
def test_an_outage_fills_buckets_and_drains(fed: Federation,
                                            harness_report: Callable[[str], None]) -> None:
    proxy = fed.broker.proxy
    assert proxy is not None
    env = {"ZKBRIDGE_OUTBOX_BUCKET": str(BUCKET)}
    fed.start("r1", env=env, wait=False)
    fed.start("r2", env=env)
    fed.wait_ready("r1")
    r1, r2 = fed["r1"], fed["r2"]
    r1.client.create(r1.path("/q/first"), b"1", makepath=True)
    wait_for(lambda: r2.client.exists(r2.path("/q/first")), 30)
    proxy.cut(stall=True)
    began = time.monotonic()
    for j in range(WRITES):
        r1.client.create(r1.path(f"/q/n{j:06d}"), b"payload-%d" % j)
        # Paced like an application (the 50 writes/s, sped up): each
        # write is mostly captured alone, one outbox entry each, the worst case.
        time.sleep(PACE)
    wrote = time.monotonic() - began
    outbox = f"{fed.state_path}/subtrees/{fed.subtree}/outbox"
    wait_for(lambda: captured(fed) >= WRITES + 1, 300, interval=0.5,
             message=lambda: f"captured {captured(fed)} of {WRITES + 1}")
    held = entries(r1.client, outbox)
    total = sum(held.values())
    assert len(held) >= 2, f"{total} entries in {len(held)} bucket(s): expected several"
    assert max(held.values()) <= BUCKET
    assert not r2.client.exists(r2.path(f"/q/n{WRITES - 1:06d}"))
    restored = time.monotonic()
    proxy.restore()
    wait_for(lambda: r2.client.exists(r2.path(f"/q/n{WRITES - 1:06d}")), 600, interval=0.5,
             message="the backlog was not published")
    fed.wait_converged(timeout=300)
    wait_for(lambda: sum(entries(r1.client, outbox).values()) == 0, 60,
             message=lambda: f"outbox left: {entries(r1.client, outbox)}")
    drained = time.monotonic() - restored
    left = entries(r1.client, outbox)
    assert len(left) <= 1, f"emptied buckets stay behind: {left}"
    harness_report(f"outbox outage: {WRITES} writes in {wrote:.1f}s while Kafka was cut, "
                   f"{total} outbox entries in {len(held)} buckets of <= {BUCKET}; "
                   f"published, applied and converged {drained:.1f}s after Kafka returned")
    fed.assert_clean_logs(allowed={"retrying"})


def peak_rss_kb(pid: int) -> int:
    """VmHWM of a live process, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def ten_keys_replicated(fed: Federation, env: dict[str, str]) -> list[str]:
    """Both bridges started with ``env``; ten empty znodes made in r1 and seen in r2."""
    fed.start("r1", env=env, wait=False)
    fed.start("r2", env=env)
    fed.wait_ready("r1")
    r1, r2 = fed["r1"], fed["r2"]
    keys = [f"/q/k{k}" for k in range(10)]
    for rel in keys:
        r1.client.create(r1.path(rel), b"", makepath=True)
    wait_for(lambda: all(r2.client.exists(r2.path(rel)) for rel in keys), 30)
    return keys


def published_in_order(fed: Federation) -> list[int]:
    """The write numbers (``%08d:`` values) on r1's topic, asserted in capture order.

    They only go up: a retried publish may repeat records, never reorder them.
    """
    topic = f"{fed.prefix}.{fed.subtree}.r1"
    numbers: list[int] = []
    for _key, value in _records(fed.broker.bootstrap, topic):
        event = codec.decode(value) if value is not None else None
        if event is not None and event.op is Op.PUT and event.data and b":" in event.data:
            n = int(event.data.split(b":", 1)[0])
            if not numbers or n > numbers[-1]:
                numbers.append(n)
            else:
                assert n in numbers, f"write {n} published out of order after {numbers[-1]}"
    return numbers


@pytest.mark.timeout(1200)
def test_a_large_outbox_left_by_a_stopped_bridge_is_drained_in_order(
        fed: Federation, harness_report: Callable[[str], None]) -> None:
    """The outbox grows, the subtree does not: ten znodes rewritten over and over,
    so the bridge's peak memory reflects the outbox, not a scan of a large tree."""
    env = {"ZKBRIDGE_OUTBOX_BUCKET": str(BUCKET), "ZKBRIDGE_QUEUE_RECORDS": "1000"}
    keys = ten_keys_replicated(fed, env)
    r1, r2 = fed["r1"], fed["r2"]
    proxy = fed.broker.proxy
    assert proxy is not None
    proxy.cut(stall=True)
    pad = b"x" * 2048
    for j in range(DRAIN_WRITES):
        # Synchronous: the capture order is the write order, which the topic must
        # keep. Paced, so that most writes are captured alone (many entries).
        r1.client.set(r1.path(keys[j % 10]), b"%08d:" % j + pad)
        time.sleep(PACE)
    wait_for(lambda: captured(fed) >= DRAIN_WRITES, 600, interval=0.5,
             message=lambda: f"captured {captured(fed)} of {DRAIN_WRITES}")
    fed.stop("r1")  # its shutdown drain cannot reach Kafka: the entries stay
    outbox = f"{fed.state_path}/subtrees/{fed.subtree}/outbox"
    held = entries(r1.client, outbox)
    total = sum(held.values())
    assert len(held) >= 3, f"{total} entries in {len(held)} bucket(s): expected several"
    proxy.restore()
    began = time.monotonic()
    fed.start("r1", env=env, code=DRAIN_CODE)
    proc = r1.proc
    assert proc is not None
    final = {rel: b"%08d:" % j + pad for j, rel in
             ((j, keys[j % 10]) for j in range(DRAIN_WRITES - 10, DRAIN_WRITES))}
    wait_for(lambda: all(r2.client.get(r2.path(rel))[0] == v for rel, v in final.items()),
             600, interval=0.5, message="the outbox left by the stopped bridge was not published")
    wait_for(lambda: sum(entries(r1.client, outbox).values()) == 0, 120,
             message=lambda: f"outbox left: {entries(r1.client, outbox)}")
    drained = time.monotonic() - began
    peak = peak_rss_kb(proc.pid)
    fed.wait_converged(timeout=300)
    numbers = published_in_order(fed)
    # A capture reads each znode's current value, so a write overwritten before
    # its znode was read is legitimately never published (seen under heavy
    # load: 4 of 3,000). Every znode's final write must be there, and most.
    final_numbers = list(range(DRAIN_WRITES - 10, DRAIN_WRITES))
    assert numbers[-10:] == final_numbers, "final writes missing from the topic"
    assert len(numbers) >= DRAIN_WRITES * 0.9, f"only {len(numbers)} writes published"
    harness_report(f"outbox drain: {DRAIN_WRITES} writes of {len(pad)} bytes to 10 znodes "
                   f"({DRAIN_WRITES - len(numbers)} overwritten before capture), "
                   f"{total} entries in {len(held)} buckets left by a stopped bridge; drained "
                   f"in capture order in {drained:.1f}s after restart; peak RSS (VmHWM) of "
                   f"the restarted bridge {peak / 1024:.1f} MiB")
    fed.assert_clean_logs(allowed={"retrying", "drain_incomplete", "outbox_spilled"})


# Scaled to the harness's ZooKeeper (256 MB heap, which also keeps its last
# 500 transactions): 120 writes of 400 KB lost its clients' connections.
LARGE_WRITES = 80
LARGE_VALUE = 200_000
QUEUE_BYTES = 2 << 20


@pytest.mark.timeout(900)
def test_large_values_in_an_outage_wait_in_the_outbox_not_in_memory(
        fed: Federation, harness_report: Callable[[str], None]) -> None:
    """The publish queue is bounded in bytes too, not only in records.

    Before, only 20,000 records bounded it: with values of 200 KB, a Kafka
    outage held every capture of it in the bridge's memory (4 GB at the
    bound). Here 80 writes of 200 KB (16 MB) meet a 2 MiB bound.
    """
    port = free_port()
    fed.write_config("r1", metrics={"listen": f"127.0.0.1:{port}"})
    keys = ten_keys_replicated(fed, {"ZKBRIDGE_QUEUE_BYTES": str(QUEUE_BYTES)})
    r1, r2 = fed["r1"], fed["r2"]
    proxy = fed.broker.proxy
    assert proxy is not None
    proc = r1.proc
    assert proc is not None
    before, base = captured(fed), peak_rss_kb(proc.pid)
    proxy.cut(stall=True)
    pad = b"x" * LARGE_VALUE
    for j in range(LARGE_WRITES):
        r1.client.set(r1.path(keys[j % 10]), b"%08d:" % j + pad)
        time.sleep(0.05)  # mostly one capture each
    wait_for(lambda: captured(fed) >= before + LARGE_WRITES * 0.9, 300, interval=0.5,
             message=lambda: f"captured {captured(fed) - before} of {LARGE_WRITES}")
    time.sleep(2)
    grew = (peak_rss_kb(proc.pid) - base) / 1024
    # Written: 16 MB. Held before the bound: all of it.
    assert grew < LARGE_WRITES * LARGE_VALUE / 2**20 / 2, f"peak RSS grew {grew:.1f} MiB"
    [spilled] = [e for e in fed.events("r1") if e["event"] == "outbox_spilled"][:1]
    assert spilled["queued_bytes"] >= QUEUE_BYTES
    assert spilled["queued_bytes"] < QUEUE_BYTES + 2 * LARGE_VALUE, spilled
    # The backlog gauge counts the outbox while spilled, not only the ~10
    # records queued: its alert (over 1,000 for 5 minutes) still sees a backlog.
    depth = f'zkbridge_outbox_depth{{subtree="{fed.subtree}"}}'
    wait_for(lambda: scrape(port)[depth] >= LARGE_WRITES * 0.8, 30,
             message=lambda: f"outbox depth gauge {scrape(port)[depth]}")
    proxy.restore()
    final = {rel: b"%08d:" % j + pad for j, rel in
             ((j, keys[j % 10]) for j in range(LARGE_WRITES - 10, LARGE_WRITES))}
    wait_for(lambda: all(r2.client.get(r2.path(rel))[0] == v for rel, v in final.items()),
             300, interval=0.5, message="the outage's writes were not published")
    fed.wait_converged(timeout=300)
    numbers = published_in_order(fed)
    assert numbers[-10:] == list(range(LARGE_WRITES - 10, LARGE_WRITES))
    harness_report(f"large values: {LARGE_WRITES} writes of {LARGE_VALUE // 1000} KB while "
                   f"Kafka was cut; spilled at {spilled['queued_bytes'] / 2**20:.1f} MiB queued "
                   f"(bound {QUEUE_BYTES >> 20} MiB); the bridge's peak RSS grew {grew:.1f} MiB; "
                   f"{len(numbers)} writes published in capture order after the cut")
    fed.assert_clean_logs(allowed={"retrying", "outbox_spilled"})


OVERFLOW_WRITES = 60
OVERFLOW_VALUE = 50_000  # 3 MB written against a 1 MB outbox


def outbox_data_bytes(client: KazooClient, outbox: str) -> int:
    """The bytes of data every outbox entry holds (what sits in the ensemble's heap)."""
    total = 0
    for bucket in client.get_children(outbox):
        for name in client.get_children(f"{outbox}/{bucket}"):
            stat = client.exists(f"{outbox}/{bucket}/{name}")
            total += stat.dataLength if stat is not None else 0
    return total


# Where the restarted bridge is killed once more as the overflow ends: after the
# re-announce marker is written (both markers left), or after the overflow's
# marker is removed (the re-announce's left, to finish). The last may also
# overflow again at the next start: the entries Kafka acknowledged just before
# the kill may not have been deleted yet (they go every 0.1 s), and that start
# counts them; its overflow's end then does the re-announce.
UNTOUCHED = 40  # paths replicated before the outage and left alone during it
ENDINGS = {None: {"outbox overflowed"}, "overflow_ending": {"outbox overflowed"},
           "overflow_ended": {"left unfinished by an earlier term", "outbox overflowed"}}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("crash", list(ENDINGS))
def test_an_outage_past_outbox_max_mb_keeps_changes_in_the_metadata_then_republishes(
        fed: Federation, harness_report: Callable[[str], None], crash: str | None) -> None:
    """The outbox is bounded in the local ensemble too (``outbox_max_mb``).

    Before, every change of a Kafka outage was an outbox entry in ZooKeeper's
    heap, however long it lasted: a long enough outage would run the
    ensemble out of memory. Here 3 MB of writes (and a create and a delete)
    meet a 1 MB bound; the bridge is killed while overflowed and started again
    once Kafka is back: the marker carries the overflow over, and what changed
    since it was written is published again once the outbox has drained; the
    paths the overflow did not touch are not.
    """
    port = free_port()
    fed.write_config("r1", metrics={"listen": f"127.0.0.1:{port}"}, outbox_max_mb=1)
    keys = ten_keys_replicated(fed, {"ZKBRIDGE_QUEUE_BYTES": str(256 << 10)})
    r1, r2 = fed["r1"], fed["r2"]
    untouched = [f"/still/n{k:02d}" for k in range(UNTOUCHED)]
    for rel in untouched:
        r1.client.create(r1.path(rel), b"before", makepath=True)
    wait_for(lambda: all(r2.client.exists(r2.path(rel)) for rel in untouched), 30)
    proxy = fed.broker.proxy
    assert proxy is not None
    outbox = f"{fed.state_path}/subtrees/{fed.subtree}/outbox"
    marker = f"{fed.state_path}/overflow/{fed.subtree}"
    before = captured(fed)
    proxy.cut(stall=True)
    pad = b"x" * OVERFLOW_VALUE
    for j in range(OVERFLOW_WRITES):
        r1.client.set(r1.path(keys[j % 10]), b"%08d:" % j + pad)
        time.sleep(0.05)
    r1.client.create(r1.path("/q/born"), b"during the overflow")
    r1.client.delete(r1.path(keys[0]))
    wait_for(lambda: captured(fed) >= before + OVERFLOW_WRITES + 2, 120, interval=0.5,
             message=lambda: f"captured {captured(fed) - before}")
    [over] = [e for e in fed.events("r1") if e["event"] == "outbox_overflowed"]
    held = outbox_data_bytes(r1.client, outbox)
    # At most the bound and the entry that crossed it; the rest is in the metadata only.
    assert held <= (1 << 20) + OVERFLOW_VALUE + 1000, held
    assert r1.client.exists(marker) is not None
    series = f'{{subtree="{fed.subtree}"}}'
    assert scrape(port)[f"zkbridge_outbox_overflowed{series}"] == 1
    assert scrape(port)[f"zkbridge_outbox_bytes{series}"] >= 1 << 20
    status = json.loads(r1.client.get(f"{fed.state_path}/status")[0])
    skipped = status["counters"].get(f"captured_without_outbox:{fed.subtree}", 0)
    assert skipped > 0
    # `status` says so for as long as it lasts (its first line, and the subtree's).
    said = fed.cli("status", "-c", str(r1.config_path)).stdout
    assert "OVERFLOWED: the outbox of" in said and "outbox OVERFLOWED" in said, said
    # Killed while overflowed; Kafka back; started again (and killed as the overflow ends).
    fed.kill("r1")
    proxy.restore()
    # So does `lag`, with the bridge stopped (from the marker), and --max-seconds exits 1.
    lag = fed.cli("lag", "-c", str(r1.config_path), "--max-seconds", "86400")
    assert lag.returncode == 1 and lag.stderr.strip() == "outbox overflowed: critical", lag
    assert "OVERFLOWED" in lag.stdout and "outbox overflowed (outbox_max_mb)" in lag.stdout, lag
    if crash is not None:
        fed.crash_at("r1", f"{crash}=crash@1", timeout=120)
    fed.start("r1", wait=False)
    final = {keys[j % 10]: b"%08d:" % j + pad
             for j in range(OVERFLOW_WRITES - 10, OVERFLOW_WRITES) if j % 10}
    final["/q/born"] = b"during the overflow"

    def arrived() -> bool:
        return (all(r2.client.exists(r2.path(rel)) is not None
                    and r2.client.get(r2.path(rel))[0] == v for rel, v in final.items())
                and r2.client.exists(r2.path(keys[0])) is None)

    wait_for(arrived, 300, interval=0.5, message="the overflow's changes did not arrive")
    fed.wait_ready("r1", timeout=120)
    fed.wait_converged(timeout=300)
    wait_for(lambda: scrape(port)[f"zkbridge_outbox_overflowed{series}"] == 0, 60,
             message="still overflowed")
    assert r1.client.exists(marker) is None
    events = fed.events("r1")
    names = [e["event"] for e in events]
    again = [e for e in events if e["event"] == "outbox_overflowed"][1:]
    assert again and again[0]["reason"] == "left by an earlier term", again
    assert "outbox_measured" in names and "outbox_overflow_ended" in names
    [done] = [e for e in events if e["event"] == "own_topic_reannounced"]
    assert done["cause"] in ENDINGS[crash], done
    # Only what the overflow changed (the ten keys, /q/born, /q), not the untouched.
    assert done["since_zxid"] > 0 and done["records"] <= 12, done
    assert r1.client.exists(f"{fed.state_path}/reannounce/{fed.subtree}") is None
    harness_report(f"outbox overflow (killed at {crash or 'no failpoint'}): {OVERFLOW_WRITES} "
                   f"writes of {OVERFLOW_VALUE // 1000} KB while Kafka was cut, bound 1 MB: "
                   f"overflowed at "
                   f"{over['megabytes']} MB, the outbox held {held / 2**20:.2f} MB of data; "
                   f"{skipped} changes kept in the metadata only; after the kill and restart "
                   f"{done['records']} records of {UNTOUCHED + 12} paths, those the overflow "
                   f"changed, were published again ({done['cause']})")
    fed.assert_clean_logs(allowed={"retrying", "outbox_spilled", "outbox_overflowed"})
