"""Writes a receiving region's server refuses are held back, never a stall.

Before, each of these failed the peer's whole batch as if a version check
had: "kept changing, will retry", for ever, and nothing after it was applied.
(ACL refusals are in ``test_acl.py``.)

- Hard quotas: ZooKeeper (3.7+, with ``zookeeper.enforceQuota``, as the
  harness's servers run) refuses a create or set that would take a subtree
  past one (``setquota -N`` count, ``-B`` bytes).
- An ephemeral znode here where the origin has a persistent one: ZooKeeper
  refuses children under it (NoChildrenForEphemerals). The znode's own
  event used to be dropped, which left an empty placeholder here for good.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator

import pytest
from kazoo.client import KazooClient

from tests.harness.procs import wait_for
from tests.harness.zookeeper import version as zookeeper_version
from tests.harness.zookeeper import zk_cli
from tests.integration.federation import Federation
from tests.integration.test_chain import _published_backlog
from tests.integration.test_ordering import _counters

pytestmark = [pytest.mark.integration, pytest.mark.every_zookeeper]


def _held(fed: Federation, name: str) -> list[str]:
    out = fed.cli("status", "-c", str(fed[name].config_path), "--json")
    assert out.returncode in (0, 1), out.stderr
    held = json.loads(out.stdout).get("held_back", {})
    return list(held.get("critical", []))


def test_a_hard_quota_here_holds_back_what_it_refuses_and_the_rest_flows(
    federation: Federation,
) -> None:
    if zookeeper_version() == "3.6":
        pytest.skip("hard quotas (setquota -N/-B, enforced) came with ZooKeeper 3.7")
    fed = federation
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    r1.client.create(r1.path("/q"), b"count")
    r1.client.create(r1.path("/b"), b"")
    r1.client.create(r1.path("/b/v"), b"small")
    for i in range(4):
        r1.client.create(r1.path(f"/q/n{i}"), b"x")
    wait_for(lambda: r2.client.exists(r2.path("/b/v")) is not None
             and len(r2.client.get_children(r2.path("/q"))) == 4, 20)
    # Full from the start: ZooKeeper checks each request against what is
    # committed, so one multi of several creates could pass a quota not yet full.
    zk_cli(r2.hosts, "setquota", "-N", "5", r2.path("/q"))  # /q and 4 children
    zk_cli(r2.hosts, "setquota", "-B", "40", r2.path("/b"))
    for i in range(4, 10):
        r1.client.create(r1.path(f"/q/n{i}"), b"x")
    # Its parents are refused too: their creates stand for the events below them.
    r1.client.create(r1.path("/q/deep/a/b"), b"leaf", makepath=True)
    r1.client.set(r1.path("/b/v"), b"y" * 100)  # over 40 bytes
    r1.client.create(r1.path("/after"), b"flows")
    wait_for(lambda: r2.client.exists(r2.path("/after")) is not None, 30,
             message="replication stalled behind writes a quota refuses")
    assert len(r2.client.get_children(r2.path("/q"))) == 4
    assert r2.client.get(r2.path("/b/v"))[0] == b"small"
    refused = {"/b/v", "/q/deep", "/q/deep/a", "/q/deep/a/b",
               *(f"/q/n{i}" for i in range(4, 10))}
    wait_for(lambda: {h.rsplit(" ", 1)[0] for h in _held(fed, "r2")} == refused, 20,
             message=lambda: f"status lists {_held(fed, 'r2')}")
    assert all(h.endswith("(quota)") for h in _held(fed, "r2"))
    reported = [e for e in fed.events("r2") if e.get("event") == "znode_held_back"]
    assert sorted(e["path"] for e in reported) == sorted(refused)  # once each
    assert all(e["operation"] == "quota" and "quota" in e["hint"] for e in reported)
    stuck = [e for e in fed.events("r2") if e.get("event") == "retrying"]
    assert not stuck, stuck[:3]
    # Later writes to a held path wait with it, the newest kept.
    r1.client.set(r1.path("/q/n9"), b"newer")
    r1.client.create(r1.path("/after2"), b"flows")
    wait_for(lambda: r2.client.exists(r2.path("/after2")) is not None, 30)

    # The operator lifts the quotas; a SIGHUP (or the next audit) applies what waited.
    zk_cli(r2.hosts, "delquota", r2.path("/q"))
    zk_cli(r2.hosts, "delquota", r2.path("/b"))
    assert r2.proc is not None
    r2.proc.send_signal(signal.SIGHUP)
    fed.wait_converged(timeout=60)
    assert r2.client.get(r2.path("/q/n9"))[0] == b"newer"
    assert r2.client.get(r2.path("/q/deep/a/b"))[0] == b"leaf"
    assert r2.client.get(r2.path("/b/v"))[0] == b"y" * 100
    wait_for(lambda: not _held(fed, "r2"), 20, message=lambda: f"still {_held(fed, 'r2')}")
    fed.assert_clean_logs()


@contextlib.contextmanager
def _registered_in_r2(fed: Federation) -> Iterator[None]:
    """/svc: an application's ephemeral znode in r2 while inside, persistent in r1;
    r2 audits every 2 s."""
    fed.write_config("r2", audit_interval=2)
    r1, r2 = fed["r1"], fed["r2"]
    app = KazooClient(hosts=r2.hosts)
    app.start(timeout=15)
    try:
        app.create(r2.path("/svc"), b"registered here", ephemeral=True)
        r1.client.create(r1.path("/svc"), b"origin")
        yield
    finally:
        app.stop()
        app.close()


def test_a_znode_ephemeral_here_and_its_children_wait_until_it_is_gone(
    federation: Federation,
) -> None:
    fed = federation
    r1, r2 = fed["r1"], fed["r2"]
    with _registered_in_r2(fed):
        fed.start_all()
        r1.client.create(r1.path("/svc/child"), b"x")
        r1.client.create(r1.path("/after"), b"flows")
        wait_for(lambda: r2.client.exists(r2.path("/after")) is not None, 20,
                 message="r1's later writes were stalled behind a child r2 cannot create")
        assert r2.client.get_children(r2.path("/svc")) == []
        wait_for(lambda: sorted(_held(fed, "r2")) == [
            "/svc (ephemeral)", "/svc/child (ephemeral-parent)"], 20,
                 message=lambda: f"status lists {_held(fed, 'r2')}")
        time.sleep(5)  # audits every 2 s try it again: it is not reported again
        reported = [e for e in fed.events("r2") if e.get("event") == "znode_held_back"]
        assert [(e["path"], e["operation"]) for e in reported] == [
            ("/svc", "ephemeral"), ("/svc/child", "ephemeral-parent")]
        assert not [e for e in fed.events("r2") if e.get("event") == "retrying"]
        held = _counters(fed, "r2").get(f"applied:{fed.subtree}:held_back", 0)
        assert held == 2, "counted at each audit's try, not once"
    # The ephemeral znode went with its session: the next audit applies the child.
    wait_for(lambda: r2.client.exists(r2.path("/svc/child")) is not None, 30,
             message="the held child was not applied once its parent's ephemeral was gone")
    assert r2.client.get(r2.path("/svc/child"))[0] == b"x"
    assert r2.client.get(r2.path("/svc"))[0] == b"origin"  # r1's own, not a placeholder
    fed.wait_converged(["r1", "r2"])
    wait_for(lambda: not _held(fed, "r2"), 20, message=lambda: f"still {_held(fed, 'r2')}")
    fed.assert_clean_logs()


def test_a_held_event_does_not_keep_a_backlog_of_other_paths_from_chaining(
    federation: Federation,
) -> None:
    # Held events used to turn the chain off for the whole subtree: with an
    # ephemeral znode that stays (a live service's registration), for good.
    fed = federation
    r2 = fed["r2"]
    with _registered_in_r2(fed):
        fed.start("r2")
        fed.start("r1")
        wait_for(lambda: _held(fed, "r2") == ["/svc (ephemeral)"], 30,
                 message=lambda: f"status lists {_held(fed, 'r2')}")
        fed.stop("r2")
        _published_backlog(fed, 1500)  # 3,000 events: several groups of 1,000
        fed.start("r2")
        wait_for(lambda: r2.client.exists(r2.path("/data/d1500")) is not None, 90)
        key = f"apply_chains:{fed.subtree}"
        wait_for(lambda: _counters(fed, "r2").get(key, 0) >= 1, 15,
                 message=lambda: f"r2 applied no chain: {_counters(fed, 'r2')}")
        assert _held(fed, "r2") == ["/svc (ephemeral)"]
    fed.wait_converged(["r1", "r2"])  # the next audit applies r1's /svc
    fed.assert_clean_logs()
