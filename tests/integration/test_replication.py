"""Three regions, real ZooKeeper and broker: everything written anywhere arrives everywhere."""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from kazoo.exceptions import NodeExistsError, NoNodeError

from bridge import statecodec
from bridge.layout import Layout
from bridge.model import NodeMeta
from tests.harness.broker import Broker
from tests.harness.procs import free_port, wait_for
from tests.harness.zookeeper import ZooKeeperServer
from tests.integration.federation import Federation, scrape

pytestmark = pytest.mark.every_zookeeper


def _upsert(client: object, path: str, data: bytes) -> None:
    # The bridge applies other regions' creates and deletes between our two
    # calls, so either may race; retry until one of them lands.
    while True:
        try:
            client.create(path, data, makepath=True)  # type: ignore[attr-defined]
            return
        except NodeExistsError:
            pass
        try:
            client.set(path, data)  # type: ignore[attr-defined]
            return
        except NoNodeError:
            pass


def _delete_if_there(client: object, path: str) -> None:
    with contextlib.suppress(NoNodeError):  # a remote delete got there first
        client.delete(path)  # type: ignore[attr-defined]


def test_all_kinds_of_changes_arrive_everywhere(federation: Federation) -> None:
    fed = federation
    fed.start_all()
    r1, r2, r3 = fed["r1"], fed["r2"], fed["r3"]
    c1 = r1.client
    deep = "/d1/d2/d3/d4/d5/d6"
    c1.create(r1.path(deep), b"deep", makepath=True)
    blob = bytes(range(256)) * 64 + os.urandom(1000)
    c1.create(r1.path("/bin"), blob)
    c1.create(r1.path("/empty"), b"")
    c1.create(r1.path("/many"), b"parent")
    for i in range(120):
        c1.create(r1.path(f"/many/c{i:03d}"), f"child {i}".encode())
    c1.create(r1.path("/doomed/inner"), b"x", makepath=True)
    # Writes from the other regions too, into the same tree.
    r2.client.create(r2.path("/from-r2"), "ünïcode ✓".encode())
    wait_for(lambda: r3.client.exists(r3.path("/many")), 30, message="/many did not reach r3")
    r3.client.create(r3.path("/many/from-r3"), b"r3")
    fed.wait_converged()

    expected = fed.tree("r1")
    assert expected[deep] == b"deep"
    assert expected["/bin"] == blob
    assert expected["/empty"] == b""
    assert len([p for p in expected if p.startswith("/many/")]) == 121
    assert fed.tree("r2") == expected == fed.tree("r3")

    # Updates and deletes, including a recursive delete, from another region.
    r2.client.set(r2.path("/bin"), b"updated")
    r3.client.delete(r3.path("/doomed"), recursive=True)
    r3.client.delete(r3.path("/many/c007"))
    fed.wait_converged()
    tree = fed.tree("r1")
    assert tree["/bin"] == b"updated"
    assert "/doomed" not in tree and "/doomed/inner" not in tree
    assert "/many/c007" not in tree

    # The operator's check agrees, through the real CLI.
    out = fed.cli("verify", "-c", str(r1.config_path), "-c", str(r2.config_path),
                  "-c", str(r3.config_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "identical" in out.stdout
    fed.assert_clean_logs()


def test_large_znodes_are_read_in_replies_the_server_can_hold(
        tmp_path: Path, token: str, broker: Broker) -> None:
    """Forty znodes of 900 KB, read by the start-up scan, the capture and `verify`.

    ZooKeeper builds a reply whole in its heap. Before, the scan asked for up
    to 250 znodes per `multiRead` (captures and applies up to 500), so these
    forty came in one reply of 36 MB, and the region's server (256 MB of heap,
    as every server of these tests) ran out of memory and exited.
    """
    servers = {name: ZooKeeperServer(f"large-{name}") for name in ("r1", "r2")}
    try:
        for server in servers.values():
            server.spawn()
        for server in servers.values():
            server.wait_ready()
        fed = Federation(tmp_path, token, broker, servers)
        try:
            r1, r2 = fed["r1"], fed["r2"]
            for i in range(40):
                r1.client.create(r1.path(f"/blobs/b{i:02d}"), bytes([i]) * 900_000,
                                 makepath=True)
            fed.start_all()
            wait_for(lambda: r2.client.exists(r2.path("/blobs/b39")) is not None, 120,
                     message="the large znodes did not reach r2")
            fed.wait_converged(timeout=120)
            out = fed.cli("verify", "-c", str(r1.config_path), "-c", str(r2.config_path))
            assert out.returncode == 0 and "identical" in out.stdout, out.stdout + out.stderr
            for server in servers.values():
                assert server.running, server.name
                assert "OutOfMemoryError" not in server.log_path.read_text(), server.name
            fed.assert_clean_logs()
        finally:
            fed.close()
    finally:
        for server in servers.values():
            server.close()


def test_verify_reports_differences(federation: Federation) -> None:
    fed = federation
    r1, r2 = fed["r1"], fed["r2"]
    # No bridges: the regions drift apart and verify must say where.
    r1.client.create(r1.path("/only-in-r1"), b"a")
    r1.client.create(r1.path("/both"), b"one")
    r2.client.create(r2.path("/both"), b"two")
    out = fed.cli("verify", "-c", str(r1.config_path), "-c", str(r2.config_path))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "/only-in-r1" in out.stdout and "/both" in out.stdout


def test_concurrent_writes_converge_with_identical_clocks(federation: Federation) -> None:
    fed = federation
    fed.start_all()
    paths = [f"/conf/k{i:03d}" for i in range(200)]
    for r in fed.regions.values():
        r.client.ensure_path(r.path("/conf"))
    barrier = threading.Barrier(len(fed.regions))
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        try:
            r = fed[name]
            rnd = random.Random(name)
            barrier.wait()
            for rnd_i in range(2):
                for p in rnd.sample(paths, len(paths)):
                    _upsert(r.client, r.path(p), f"{name}:{rnd_i}:{p}".encode())
                for p in rnd.sample(paths, 20):
                    _delete_if_there(r.client, r.path(p))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in fed.regions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    fed.wait_converged(timeout=120)  # data and metadata clocks
    conflicts = sum(fed.count_events(n, "conflict_resolved") for n in fed.regions)
    assert conflicts > 0, "concurrent writes to the same paths must produce conflicts"
    # Conflicts are recorded in each region's state for `zkbridge conflicts`.
    recorded = sum(
        len(r.client.get_children(f"{fed.state_path}/subtrees/{fed.subtree}/conflicts"))
        for r in fed.regions.values()
    )
    assert recorded > 0
    fed.assert_clean_logs()


def test_delete_against_concurrent_child_create_keeps_placeholder(
    federation: Federation,
) -> None:
    fed = federation
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    r1.client.create(r1.path("/p/old"), b"old", makepath=True)
    fed.wait_converged()
    # Partition r2 from the federation, then race: r1 deletes /p, r2 adds a child.
    fed.stop("r2")
    r1.client.delete(r1.path("/p"), recursive=True)
    wait_for(lambda: not fed["r3"].client.exists(fed["r3"].path("/p")), 30,
             message="delete did not reach r3")
    r2.client.create(r2.path("/p/new"), b"new")
    fed.start("r2")
    fed.wait_converged()
    for name in fed.regions:
        tree = fed.tree(name)
        # The delete won for what it saw; the unseen child survives under an
        # empty placeholder, the same in every region.
        assert tree.get("/p") == b"", (name, tree)
        assert tree.get("/p/new") == b"new"
        assert "/p/old" not in tree
    # r2 applied the delete over a child, the others created the parent again
    # over the tombstone: the same mark everywhere all the same.
    kept = _tombstones(fed, "/p")
    assert all(m.placeholder for m in kept.values()), kept
    assert len({replace(m, placeholder_czxid=0) for m in kept.values()}) == 1, kept
    # When the last child goes, the placeholder goes with it, everywhere.
    r3 = fed["r3"]
    r3.client.delete(r3.path("/p/new"))
    fed.wait_converged()
    for name in fed.regions:
        assert "/p" not in fed.tree(name)
    gone = _tombstones(fed, "/p")
    assert len(set(gone.values())) == 1, gone  # chaos seed 6514: one region's stayed marked
    assert not next(iter(gone.values())).placeholder
    fed.assert_clean_logs()


def _tombstones(fed: Federation, rel: str) -> dict[str, NodeMeta]:
    out = {}
    for name, region in fed.regions.items():
        layout = Layout(fed.state_path, fed.subtree, region.mount)
        meta = statecodec.decode_meta(region.client.get(layout.meta(rel))[0])
        assert meta is not None and meta.deleted, (name, meta)
        out[name] = meta
    return out


def test_two_regions_sequential_znodes_with_one_name_are_reported(
        federation: Federation) -> None:
    """A queue fed in two regions: each ensemble numbers `item-` from its own counter.

    Both items get the same name; the conflict rule keeps one version
    everywhere, as for any concurrent writes, and the other item is lost. Every
    region says so once per parent (warning, incident, `status --check` exit 1),
    counts each one, and converges.
    """
    fed = federation
    port = free_port()
    fed.write_config("r3", metrics={"listen": f"127.0.0.1:{port}"})
    fed.start_all()
    r1, r2, r3 = fed["r1"], fed["r2"], fed["r3"]
    assert scrape(port)['zkbridge_sequence_collisions_total{subtree="critical"}'] == 0
    r1.client.create(r1.path("/q"), b"")
    fed.wait_converged()
    assert fed.stop("r2") == 0
    rel = [r.client.create(r.path("/q/item-"), f"from {r.name}".encode(), sequence=True
                           ).removeprefix(r.path("")) for r in (r1, r2, r1, r2)]
    assert rel[0] == rel[1] and rel[2] == rel[3], rel  # the same counters, the same names
    wait_for(lambda: r3.client.exists(r3.path(rel[2])) is not None, 30,
             message="r1's items never reached r3")
    fed.start("r2")
    fed.wait_converged()
    for name in fed.regions:
        told = [e for e in fed.events(name) if e["event"] == "sequential_name_collision"]
        assert len(told) == 1, (name, told)  # once for /q, though two names collided
        assert told[0]["path"] == rel[0] and {told[0]["kept"], told[0]["lost"]} == {"r1", "r2"}
        assert "prefix of their own" in told[0]["hint"]

        def status(n: str = name) -> dict[str, Any]:
            out = fed.cli("status", "-c", str(fed[n].config_path), "--json")
            doc: dict[str, Any] = json.loads(out.stdout)
            return doc

        # (the record is rewritten every 2 s)
        wait_for(lambda: status()["counters"].get("sequence_collisions:critical") == 2, 10,
                 message=lambda n=name: f"{n}: {status(n)['counters']}")
        assert [i["kind"] for i in status()["incidents"]] == ["SEQUENCE"]
        check = fed.cli("status", "-c", str(fed[name].config_path), "--check")
        assert check.returncode == 1 and check.stdout.startswith("SEQUENCE:"), check.stdout
    assert scrape(port)['zkbridge_sequence_collisions_total{subtree="critical"}'] == 2
    # Ordinary concurrent writes to one znode are not called a sequence collision.
    assert fed.stop("r2") == 0
    for r in (r1, r2):
        r.client.set(r.path(rel[0]), f"again from {r.name}".encode())
    fed.start("r2")
    fed.wait_converged()
    assert sum(fed.count_events(n, "sequential_name_collision") for n in fed.regions) == 3
    fed.assert_clean_logs()


def test_seen_delete_is_not_resurrected_by_replayed_events(federation: Federation) -> None:
    fed = federation
    fed.start_all()
    r1, r2, r3 = fed["r1"], fed["r2"], fed["r3"]
    r1.client.create(r1.path("/q"), b"v1")
    r1.client.set(r1.path("/q"), b"v2")
    fed.wait_converged()
    r2.client.delete(r2.path("/q"))
    fed.wait_converged()
    # Make r3 re-read every topic from the start: old puts of /q come again.
    fed.stop("r3")
    r3.client.delete(f"{fed.state_path}/subtrees/{fed.subtree}/positions", recursive=True)
    fed.start("r3")
    r1.client.create(r1.path("/marker"), b"m")
    wait_for(lambda: r3.client.exists(r3.path("/marker")), 30, message="marker not applied")
    fed.wait_converged()
    assert not r3.client.exists(r3.path("/q"))
    fed.assert_clean_logs()


def test_ephemeral_znodes_are_not_replicated(federation: Federation) -> None:
    fed = federation
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    r1.client.create(r1.path("/svc"), b"")
    r1.client.create(r1.path("/svc/member-"), b"eph", ephemeral=True, sequence=True)
    r1.client.create(r1.path("/svc/seq-"), b"persistent", sequence=True)
    r1.client.create(r1.path("/svc/marker"), b"m")
    wait_for(lambda: r2.client.exists(r2.path("/svc/marker")), 30, message="marker")
    fed.wait_converged()
    names = r2.client.get_children(r2.path("/svc"))
    assert not any(n.startswith("member-") for n in names)
    # Sequential znodes are replicated under the same name, as persistent nodes.
    seq = [n for n in r1.client.get_children(r1.path("/svc")) if n.startswith("seq-")]
    assert seq and seq[0] in names
    _, stat = r2.client.get(r2.path(f"/svc/{seq[0]}"))
    assert stat.ephemeralOwner == 0
    fed.assert_clean_logs()
