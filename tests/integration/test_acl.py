"""Protected znodes (issue 8): ACLs never stall replication, and replicate by a documented rule.

Real digest auth on real servers: an application user ``alice``, and a
bridge identity ``bridge`` where a test gives the bridges one.
"""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.security import ACL, OPEN_ACL_UNSAFE, Id, make_digest_acl

from tests.conftest import ZkServers
from tests.harness.broker import Broker
from tests.harness.procs import free_port, wait_for
from tests.harness.zookeeper import ZooKeeperServer, zk_cli
from tests.integration.federation import Federation, scrape

pytestmark = [pytest.mark.integration, pytest.mark.every_zookeeper]

ALICE_PW = "alice-Pw-7f3q"
BRIDGE_PW = "bridge-Pw-k2x9"
ALICE = make_digest_acl("alice", ALICE_PW, all=True)


def _session(fed: Federation, name: str, user: str = "alice",
             password: str = ALICE_PW) -> contextlib.AbstractContextManager[KazooClient]:
    """A client of region ``name`` authenticated as a digest user, closed after use."""
    return fed[name].session(f"{user}:{password}")


def _status(fed: Federation, name: str) -> dict[str, object]:
    out = fed.cli("status", "-c", str(fed[name].config_path), "--json")
    assert out.returncode in (0, 1), out.stderr
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


def _verdict(fed: Federation, name: str) -> str:
    """The verdict line of ``zkbridge status`` in region ``name``."""
    verdict = _status(fed, name)["verdict"]
    assert isinstance(verdict, dict)
    return str(verdict["line"])


def _locked_in_r2(fed: Federation) -> None:
    """/locked in the receiving region r2: readable by all, writable only by alice."""
    with _session(fed, "r2") as alice:
        acl = [ALICE, make_digest_acl("anyone", "x", read=True)]
        acl[1] = acl[1]._replace(id=acl[1].id._replace(scheme="world", id="anyone"))
        alice.create(fed["r2"].path("/locked"), b"r2-own", acl=acl)


def _no_secret_anywhere(fed: Federation) -> None:
    for name, r in fed.regions.items():
        text = r.log_path.read_text(errors="replace") if r.log_path.exists() else ""
        status = fed.cli("status", "-c", str(r.config_path), "--json").stdout
        for secret in (ALICE_PW, BRIDGE_PW):
            assert secret not in text, f"{name}: a password in the bridge log"
            assert secret not in status, f"{name}: a password in status"


def test_unreadable_znodes_are_held_back_and_never_stall_the_rest(federation: Federation) -> None:
    fed = federation
    with _session(fed, "r1") as alice:
        for i in range(40):
            alice.create(fed["r1"].path(f"/secret{i}"), b"hidden", acl=[ALICE])
        for i in range(5):
            alice.create(fed["r1"].path(f"/public{i}"), b"open", acl=OPEN_ACL_UNSAFE)
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    # Created after the protected ones, it still arrives promptly.
    r1.client.create(r1.path("/late"), b"after")
    wait_for(lambda: r2.client.exists(r2.path("/late")) is not None, 15,
             message="a public znode was stalled behind protected ones")
    for i in range(5):
        assert r2.client.get(r2.path(f"/public{i}"))[0] == b"open"
    assert r2.client.exists(r2.path("/secret0")) is None  # nothing leaked

    def listed() -> bool:
        held = _status(fed, "r1").get("held_back", {})
        return isinstance(held, dict) and len(held.get("critical", [])) == 40

    wait_for(listed, 20, message="status does not list the 40 held-back znodes")
    # verify names them too, instead of failing on them.
    out = fed.cli("verify", "-c", str(r1.config_path), "-c", str(r2.config_path))
    assert out.returncode == 1 and "not readable" in out.stdout, out.stdout + out.stderr
    held = [e for e in fed.events("r1") if e.get("event") == "znode_held_back"]
    assert len(held) == 40  # reported once each, not retried in a loop
    # Once readable (alice opens one up), it replicates normally after a SIGHUP.
    with _session(fed, "r1") as owner:
        owner.set_acls(r1.path("/secret7"), OPEN_ACL_UNSAFE)
    assert r1.proc is not None
    r1.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: r2.client.exists(r2.path("/secret7")) is not None, 30,
             message="a znode that became readable was not replicated after SIGHUP")
    assert r2.client.get(r2.path("/secret7"))[0] == b"hidden"
    fed.assert_clean_logs()
    _no_secret_anywhere(fed)


def test_what_the_watch_is_not_told_of_an_unreadable_znode_the_periodic_audit_finds(
    federation: Federation,
) -> None:
    # ZooKeeper 3.8.4+ and 3.9.2+ (and Debian's 3.8.0 with the CVE-2024-23944
    # fix) send a persistent watch no event for a znode its session may not
    # read: only a listing of the parent shows it. Without the periodic audit
    # its creation went unreported, and its deletion unreplicated, until the
    # next reconnect or election.
    fed = federation
    fed.start_all()  # audit_interval 600 s
    r1, r2 = fed["r1"], fed["r2"]
    r1.client.create(r1.path("/open"), b"x")
    wait_for(lambda: r2.client.exists(r2.path("/open")) is not None, 20)
    scans = fed.count_events("r1", "scan_done")
    with _session(fed, "r1") as alice:
        alice.create(r1.path("/hidden"), b"secret", acl=[ALICE])
    # A shorter interval by reload counts from the last scan, not after the
    # 600 s wait already begun.
    fed.write_config("r1", audit_interval=2)
    assert r1.proc is not None
    r1.proc.send_signal(signal.SIGHUP)

    def listed() -> bool:
        held = _status(fed, "r1").get("held_back", {})
        return isinstance(held, dict) and "/hidden (read)" in held.get("critical", [])

    wait_for(listed, 20, message="an unreadable znode created while running was not reported")
    assert fed.count_events("r1", "audit_done") > 0
    assert fed.count_events("r1", "scan_done") == scans  # an audit, not a full scan
    assert r2.client.exists(r2.path("/hidden")) is None
    # Readable again (the owner opens it up): the next audit replicates it, no SIGHUP.
    with _session(fed, "r1") as owner:
        owner.set_acls(r1.path("/hidden"), OPEN_ACL_UNSAFE)
    wait_for(lambda: r2.client.exists(r2.path("/hidden")) is not None, 20,
             message="a znode that became readable was not replicated by the audit")
    assert r2.client.get(r2.path("/hidden"))[0] == b"secret"
    wait_for(lambda: not _status(fed, "r1").get("held_back", {}).get("critical"), 20,
             message="the replicated znode is still listed as held back")
    # Unreadable again, then deleted: no event for the delete either.
    with _session(fed, "r1") as owner:
        owner.set_acls(r1.path("/hidden"), [ALICE])
        owner.delete(r1.path("/hidden"))
    wait_for(lambda: r2.client.exists(r2.path("/hidden")) is None, 20,
             message="the delete of a znode the bridge may no longer read was not replicated")
    fed.assert_clean_logs()


def test_a_znode_the_receiver_may_not_write_does_not_block_later_batches(
    federation: Federation,
) -> None:
    fed = federation
    r1, r2 = fed["r1"], fed["r2"]
    _locked_in_r2(fed)
    fed.start_all()
    # r1 writes the same path: r2's bridge may not write it (nor read its ACL,
    # so r2 does not announce it either).
    r1.client.create(r1.path("/locked"), b"from-r1")
    for i in range(20):
        r1.client.create(r1.path(f"/after{i}"), b"x")
    wait_for(lambda: r2.client.exists(r2.path("/after19")) is not None, 20,
             message="later batches of r1 were blocked by a znode r2 may not write")
    assert r2.client.get(r2.path("/locked"))[0] == b"r2-own"

    def listed() -> bool:
        held = _status(fed, "r2").get("held_back", {})
        return isinstance(held, dict) and any("/locked" in p for p in held.get("critical", []))

    wait_for(listed, 20, message="status does not list /locked as held back")

    # The held event is kept in r2's state: a crash does not lose it.
    held = f"{fed.state_path}/subtrees/{fed.subtree}/held"
    assert len(r2.client.get_children(held)) == 1
    fed.kill("r2")
    fed.start("r2")
    wait_for(listed, 20, message="/locked is not held back after a restart")
    # Once r2's bridge may write it, the held event is resolved like any
    # other: here against r2's own, never announced, newer version.
    with _session(fed, "r2") as opener:
        opener.set_acls(r2.path("/locked"), OPEN_ACL_UNSAFE)
    assert r2.proc is not None
    r2.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: not r2.client.get_children(held), 30,
             message="the held event was not settled after the znode became writable")

    def logged(event: str) -> bool:
        return any(e.get("event") == event and e.get("path") == "/locked"
                   for e in fed.events("r2"))

    # Logged once the apply's multi has committed, so possibly after the test
    # already saw its effect in ZooKeeper (a CI run read the log too early).
    wait_for(lambda: logged("znode_released") and logged("conflict_resolved"), 10,
             message="the held event of r1 was lost, not resolved")
    fed.wait_converged(["r1", "r2"])
    fed.assert_clean_logs()


@pytest.mark.parametrize("audit_interval", [2, 0], ids=["audit", "no-audit"])
def test_a_held_event_is_applied_by_itself_once_the_znode_is_writable(
    federation: Federation, audit_interval: int,
) -> None:
    # Without audits (and by default, every 10 minutes) the bridge tries held
    # events again by itself, backing off to once a minute. Before: only an audit,
    # a rescan or SIGHUP did.
    fed = federation
    r1, r2 = fed["r1"], fed["r2"]
    port = free_port()
    fed.write_config("r2", audit_interval=audit_interval,
                     metrics={"listen": f"127.0.0.1:{port}"})
    _locked_in_r2(fed)
    fed.start_all()
    r1.client.create(r1.path("/locked"), b"from-r1")
    held = f"{fed.state_path}/subtrees/{fed.subtree}/held"
    wait_for(lambda: len(r2.client.get_children(held)) == 1, 20,
             message="r1's event was not held back in r2")
    # The divergence is visible where an operator looks: the gauge and the
    # status verdict (before: no gauge, and the verdict said HEALTHY).
    gauge = f'zkbridge_held_back{{reason="write",subtree="{fed.subtree}"}}'
    assert scrape(port)[gauge] == 1
    seen = [""]

    def verdict_starts(prefix: str) -> bool:
        seen[0] = _verdict(fed, "r2")
        return seen[0].startswith(prefix)

    wait_for(lambda: verdict_starts("HELD_BACK: 1 znode(s) held back (1 write)"), 10,
             message=lambda: f"status did not name the held znode: {seen[0]}")
    with _session(fed, "r2") as opener:
        opener.set_acls(r2.path("/locked"), OPEN_ACL_UNSAFE)
    # No SIGHUP.
    wait_for(lambda: not r2.client.get_children(held), 30,
             message="the held event was not tried again")
    assert scrape(port)[gauge] == 0
    wait_for(lambda: verdict_starts("HEALTHY"), 10,
             message=lambda: f"status is not healthy once nothing is held: {seen[0]}")
    fed.assert_clean_logs()


def test_many_held_events_are_probed_a_few_at_a_time_and_all_go_once_one_does(
    federation: Federation,
) -> None:
    # Each held event still refused costs a read and a multi: the bridge tries a
    # window of them by itself, a different one each time, and all once one applied.
    fed = federation
    r1, r2 = fed["r1"], fed["r2"]
    fed.write_config("r2", audit_interval=0)
    count = 40
    with _session(fed, "r2") as alice:
        for i in range(count):
            alice.create(r2.path(f"/locked{i}"), b"r2-own", acl=[ALICE])
    fed.start_all()
    for i in range(count):
        r1.client.create(r1.path(f"/locked{i}"), b"from-r1")
    held = f"{fed.state_path}/subtrees/{fed.subtree}/held"
    wait_for(lambda: len(r2.client.get_children(held)) == count, 30,
             message="r1's events were not held back in r2")
    with _session(fed, "r2") as alice:
        alice.set_acls(r2.path(f"/locked{count - 1}"), OPEN_ACL_UNSAFE)
    wait_for(lambda: len(r2.client.get_children(held)) == count - 1, 60,
             message="the one event that became writable was never probed")
    with _session(fed, "r2") as alice:
        for i in range(count - 1):
            alice.set_acls(r2.path(f"/locked{i}"), OPEN_ACL_UNSAFE)
    wait_for(lambda: not r2.client.get_children(held), 60,
             message="not all held events went once some applied")
    fed.assert_clean_logs()


def test_a_new_branch_under_a_znode_the_bridge_may_not_write_is_held_back_whole(
    federation: Federation,
) -> None:
    # r2 may not create children of /locked: the branch's first create is
    # refused, and so is the placeholder that its deeper events would create
    # in its place. Before, that placeholder was retried as a conflict until
    # the apply gave up, and again, for ever: r1's later writes never came.
    fed = federation
    r1, r2 = fed["r1"], fed["r2"]
    _locked_in_r2(fed)
    fed.start_all()
    r1.client.create(r1.path("/locked/branch/leaf/deeper"), b"x", makepath=True)
    r1.client.create(r1.path("/after"), b"flows")
    wait_for(lambda: r2.client.exists(r2.path("/after")) is not None, 20,
             message="r1's later writes were stalled behind the refused branch")
    held = f"{fed.state_path}/subtrees/{fed.subtree}/held"
    wait_for(lambda: len(r2.client.get_children(held)) == 4, 20,
             message=lambda: f"held: {r2.client.get_children(held)}")
    assert r2.client.get_children(r2.path("/locked")) == []
    assert not [e for e in fed.events("r2") if e.get("event") == "retrying"]
    # Once writable, the whole branch arrives.
    with _session(fed, "r2") as opener:
        opener.set_acls(r2.path("/locked"), OPEN_ACL_UNSAFE)
    assert r2.proc is not None
    r2.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: r2.client.exists(r2.path("/locked/branch/leaf/deeper")) is not None, 30,
             message="the held branch was not applied once writable")
    fed.assert_clean_logs()


def test_an_acl_the_receiving_ensemble_refuses_is_held_back_not_a_stall(
    tmp_path: Path, token: str, broker: Broker, zk_servers: ZkServers,
) -> None:
    # r1's ensemble has a SASL authentication provider, r2's has none: r2's
    # server refuses an ACL entry "sasl:alice" (InvalidACL). Before, that
    # failed r1's batch as a conflict, retried for ever.
    sasl = ZooKeeperServer("r1-sasl", extra_config=[
        "authProvider.1=org.apache.zookeeper.server.auth.SASLAuthenticationProvider"])
    sasl.start()
    fed = Federation(tmp_path, token, broker, {"r1": sasl, "r2": zk_servers.regions[1]})
    try:
        fed.start_all()
        r1, r2 = fed["r1"], fed["r2"]
        acl = [ACL(31, Id("sasl", "alice")), ACL(3, Id("world", "anyone"))]  # read, write
        r1.client.create(r1.path("/kerberized"), b"v1", acl=acl)
        r1.client.create(r1.path("/after"), b"flows")
        wait_for(lambda: r2.client.exists(r2.path("/after")) is not None, 20,
                 message="r1's later writes were stalled behind an ACL r2 refuses")
        assert r2.client.exists(r2.path("/kerberized")) is None
        held = [e for e in fed.events("r2") if e.get("event") == "znode_held_back"]
        assert [(e["path"], e["operation"]) for e in held] == [("/kerberized", "acl-refused")]
        assert "authProvider" in held[0]["hint"]
        assert not [e for e in fed.events("r2") if e.get("event") == "retrying"]
        # A later version waits with it, the newer kept.
        r1.client.set(r1.path("/kerberized"), b"v2")
        r1.client.create(r1.path("/after2"), b"flows")
        wait_for(lambda: r2.client.exists(r2.path("/after2")) is not None, 20)
        assert r2.client.exists(r2.path("/kerberized")) is None
        fed.assert_clean_logs()
    finally:
        fed.close()
        sasl.close()


def test_the_acl_cache_forgets_deleted_znodes(federation: Federation) -> None:
    # The origin caches each captured znode's ACL. It used to keep the
    # entries of deleted znodes for ever: under churn (a queue's sequential
    # znodes) its memory grew without bound.
    fed = federation
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]

    def cached() -> int:
        state = _status(fed, "r1").get("state", {})
        assert isinstance(state, dict)
        return int(state["critical"]["acl_cache"])

    r1.client.ensure_path(r1.path("/q"))
    for _ in range(3):
        names = [r1.client.create(r1.path("/q/item-"), b"x", sequence=True)
                 for _ in range(100)]
        wait_for(lambda n=names[-1]: r2.client.exists(  # type: ignore[misc]
            r2.path("/q/" + n.rsplit("/", 1)[1])) is not None, 30)
        for name in names:
            r1.client.delete(name)
    wait_for(lambda: r2.client.get_children(r2.path("/q")) == [], 30)
    wait_for(lambda: cached() <= 2, 20, message=lambda: f"{cached()} ACLs still cached")
    fed.assert_clean_logs()


def test_copy_policy_replicates_acls_and_never_widens_access(federation: Federation) -> None:
    fed = federation
    for name in fed.regions:
        fed.write_config(name, zookeeper={"auth": {"credential": f"bridge:{BRIDGE_PW}"}})
    bridge_acl = make_digest_acl("bridge", BRIDGE_PW, all=True)
    with _session(fed, "r1") as alice:
        alice.create(fed["r1"].path("/tenant/secret"), b"tenant-data", makepath=True,
                     acl=[ALICE, bridge_acl])
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    with _session(fed, "r1") as owner, _session(fed, "r2") as reader:
        # Looked for as alice: ZooKeeper 3.9 refuses even `exists` on a znode the
        # asker may not read (NoAuth), where 3.8 answered it.
        wait_for(lambda: reader.exists(r2.path("/tenant/secret")) is not None, 20,
                 message="the protected znode never arrived")
        # Seen by alice, who holds ADMIN: real digests, not redacted ones.
        origin = sorted(map(str, owner.get_acls(r1.path("/tenant/secret"))[0]))
        copy = sorted(map(str, reader.get_acls(r2.path("/tenant/secret"))[0]))
        assert copy == origin and ":x'" not in "".join(copy)
        with pytest.raises(NoAuthError):
            r2.client.get(r2.path("/tenant/secret"))  # unauthenticated: no access
        assert reader.get(r2.path("/tenant/secret"))[0] == b"tenant-data"
        # An update travels too, and the bridge can still manage its copy.
        with _session(fed, "r1") as writer:
            writer.set(r1.path("/tenant/secret"), b"v2")
        wait_for(lambda: reader.get(r2.path("/tenant/secret"))[0] == b"v2", 20)
    fed.assert_clean_logs()
    _no_secret_anywhere(fed)


def test_open_policy_holds_back_what_it_would_widen(federation: Federation) -> None:
    fed = federation
    for name in fed.regions:
        fed.write_config(name, zookeeper={"auth": {"credential": f"bridge:{BRIDGE_PW}"}},
                         subtrees=[{"name": fed.subtree, "path": fed[name].mount,
                                    "acl": "open"}])
    bridge_acl = make_digest_acl("bridge", BRIDGE_PW, all=True)
    with _session(fed, "r1") as alice:
        alice.create(fed["r1"].path("/narrow"), b"tenant", acl=[ALICE, bridge_acl])
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    r1.client.create(r1.path("/wide"), b"everyone")
    wait_for(lambda: r2.client.exists(r2.path("/wide")) is not None, 20)
    assert r2.client.exists(r2.path("/narrow")) is None  # never widened into r2

    def listed() -> bool:
        held = _status(fed, "r1").get("held_back", {})
        return isinstance(held, dict) and any("/narrow" in p for p in held.get("critical", []))

    wait_for(listed, 20, message="status does not list /narrow as held back")
    fed.assert_clean_logs()


def test_a_znode_created_again_narrower_is_not_announced_with_its_old_acl(
    federation: Federation,
) -> None:
    # Its aversion starts at 0 again: known by path and aversion alone, the
    # ACL read for the first znode passed for the second one's, and the new
    # znode's secret went out world-readable.
    fed = federation
    for name in fed.regions:
        fed.write_config(name, zookeeper={"auth": {"credential": f"bridge:{BRIDGE_PW}"}},
                         subtrees=[{"name": fed.subtree, "path": fed[name].mount,
                                    "acl": "open"}])
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    r1.client.create(r1.path("/x"), b"public")
    wait_for(lambda: r2.client.exists(r2.path("/x")) is not None, 20)
    bridge_acl = make_digest_acl("bridge", BRIDGE_PW, all=True)
    with _session(fed, "r1") as alice:
        alice.delete(r1.path("/x"))
        alice.create(r1.path("/x"), b"secret", acl=[ALICE, bridge_acl])
    r1.client.create(r1.path("/after"), b"later")
    wait_for(lambda: r2.client.exists(r2.path("/after")) is not None, 20)
    # r1 announced all before /after, in order: /x too, had it gone out.
    got = r2.client.exists(r2.path("/x"))
    assert got is None or r2.client.get(r2.path("/x"))[0] != b"secret", "widened into r2"

    def listed() -> bool:
        held = _status(fed, "r1").get("held_back", {})
        return isinstance(held, dict) and "/x (acl)" in held.get("critical", [])

    wait_for(listed, 20, message="status does not list the narrower /x as held back")
    fed.assert_clean_logs()


def test_bridge_state_is_writable_by_the_bridge_identity_only(federation: Federation) -> None:
    fed = federation
    for name in fed.regions:
        fed.write_config(name, zookeeper={"auth": {"credential": f"bridge:{BRIDGE_PW}"}})
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    r1.client.create(r1.path("/app/x"), b"v1", makepath=True)
    wait_for(lambda: r2.client.exists(r2.path("/app/x")) is not None, 20)
    base = f"{fed.state_path}/subtrees/{fed.subtree}"
    state = [fed.state_path, f"{fed.state_path}/epoch", base, f"{base}/meta",
             f"{base}/meta/app/x", f"{base}/outbox", f"{base}/positions"]
    app = r2.client  # a plain application client: no credentials
    with _session(fed, "r2", "bridge", BRIDGE_PW) as bridge:
        own = make_digest_acl("bridge", BRIDGE_PW, all=True)
        for path in state:
            assert bridge.get_acls(path)[0] == [own], path
            with pytest.raises(NoAuthError):
                app.set(path, b"garbage")
            with pytest.raises(NoAuthError):
                app.get(path)  # the outbox holds payloads of protected znodes too
        with pytest.raises(NoAuthError):
            app.create(f"{base}/outbox/b-forged", b"garbage")
        with pytest.raises(NoAuthError):
            app.delete(f"{base}/meta/app/x")
        positions = bridge.get_children(f"{base}/positions")
        assert positions
        with pytest.raises(NoAuthError):
            app.delete(f"{base}/positions/{positions[0]}")
    # The bridges themselves carry on: an update still travels both ways.
    r2.client.set(r2.path("/app/x"), b"v2")
    wait_for(lambda: r1.client.get(r1.path("/app/x"))[0] == b"v2", 20)
    fed.assert_clean_logs()
    _no_secret_anywhere(fed)


@pytest.mark.parametrize(("own_session", "env"), [
    (True, {}),
    # The third group's reads fail after the first piece was written: the
    # capture is made again, and the rest arrives.
    (True, {"ZKBRIDGE_FAILPOINTS": "acl_read=lose@3"}),
    (False, {"ZKBRIDGE_NO_ACL_READER": "1"}),
], ids=["acl-session", "acl-session-read-fails", "main-session"])
def test_a_large_start_up_capture_copies_each_znodes_own_acl(
    federation: Federation, own_session: bool, env: dict[str, str],
) -> None:
    # More changes than one group of ACL reads: a start-up capture reads
    # them group by group on a session of its own while the pieces before
    # are written, or all first on its main session when it has no other.
    fed = federation
    for name in fed.regions:
        fed.write_config(name, zookeeper={"auth": {"credential": f"bridge:{BRIDGE_PW}"}})
    protected = [ALICE, make_digest_acl("bridge", BRIDGE_PW, all=True)]
    count = 2500
    with _session(fed, "r1") as alice:
        alice.ensure_path(fed["r1"].path("/many"))
        for base in range(0, count, 250):
            t = alice.transaction()
            for i in range(base, base + 250):
                t.create(fed["r1"].path(f"/many/n{i:04d}"), f"v{i}".encode(),
                         acl=protected if i % 7 == 0 else OPEN_ACL_UNSAFE)
            assert all(r is not None and not isinstance(r, Exception) for r in t.commit())
    fed.start("r2")
    fed.start("r1", env=env)
    fed.wait_converged(["r1", "r2"])
    r1, r2 = fed["r1"], fed["r2"]
    connected = [e for e in fed.events("r1") if e.get("event") == "acl_session_connected"]
    if own_session:
        # That session sent the getACLs: one per znode (read ahead by the scan,
        # which listed them new, and taken by the capture), and syncs.
        sid = f"sid={connected[0]['session']},"
        line = next(x for x in r1.server.four_letter("cons").splitlines() if sid in x)
        assert count <= int(line.split("recved=")[1].split(",")[0]) < count + 100, line
    else:
        assert not connected
    if "ZKBRIDGE_FAILPOINTS" in env:
        assert fed.count_events("r1", "retrying") >= 1
    with _session(fed, "r1") as owner, _session(fed, "r2") as reader:
        for i in range(count):
            rel = f"/many/n{i:04d}"
            origin = sorted(map(str, owner.get_acls(r1.path(rel))[0]))
            copy = sorted(map(str, reader.get_acls(r2.path(rel))[0]))
            if i % 7 == 0:
                assert copy == origin, rel
                assert reader.get(r2.path(rel))[0] == f"v{i}".encode()
            else:
                assert any("perms=31" in e and "scheme='world'" in e for e in copy), (rel, copy)
    fed.assert_clean_logs()
    _no_secret_anywhere(fed)


def _state_acls(fed: Federation, name: str, user: str, password: str) -> dict[str, list[ACL]]:
    """Every state znode of region ``name`` with its ACL, read as ``user``."""
    out: dict[str, list[ACL]] = {}
    with _session(fed, name, user, password) as zk:
        todo = [fed.state_path]
        while todo:
            path = todo.pop()
            out[path] = zk.get_acls(path)[0]
            todo.extend(f"{path}/{c}" for c in zk.get_children(path))
    return out


@pytest.mark.parametrize("change", ["rotated", "removed"])
def test_a_changed_credential_stops_with_the_command_that_gives_it_the_state(
    federation: Federation, change: str,
) -> None:
    # ZooKeeper's digest scheme takes any password: a new one is just another
    # identity, which the state's ACL shuts out. Before: "create .../members/...:
    # not allowed by the ACL", and systemd restarted it again and again.
    fed = federation
    for name in fed.regions:
        fed.write_config(name, zookeeper={"auth": {"credential": f"bridge:{BRIDGE_PW}"}})
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    r1.client.create(r1.path("/app/x"), b"v1", makepath=True)
    wait_for(lambda: r2.client.exists(r2.path("/app/x")) is not None, 20)
    assert fed.stop("r2") == 0
    new_pw = "bridge-New-Pw-5c1d"
    fed.write_config("r2", zookeeper={"auth": {"credential": f"bridge:{new_pw}"}}
                     if change == "rotated" else {})
    before = len(fed.events("r2"))
    proc = fed.start("r2", wait=False).proc
    assert proc is not None
    assert proc.wait(timeout=60) == 1
    stopped = [e for e in fed.events("r2")[before:] if e["event"] == "bridge_stopped"]
    assert len(stopped) == 1, fed.events("r2")[before:]
    line = str(stopped[0]["error"])
    assert stopped[0]["error_type"] == "StateAccessError", line
    fix = line.rsplit(": ", 1)[1]
    expected = (make_digest_acl("bridge", new_pw, all=True).id.id + ":cdrwa"
                if change == "rotated" else "anyone:cdrwa")
    assert fix.startswith(f"setAcl -R {fed.state_path} ") and fix.endswith(expected), line
    for command in (["status"], ["lag"], ["resync"], ["skip", "--topic", "t", "--offset", "0"]):
        out = fed.cli(*command, "-c", str(r2.config_path))
        assert out.returncode == 2 and fix in out.stderr, (command, out.stdout + out.stderr)
        assert BRIDGE_PW not in line + out.stderr and new_pw not in line + out.stderr

    # The runbook: in ZooKeeper's shell, authenticated with the old credential.
    logins = [BRIDGE_PW, new_pw] if change == "rotated" else [BRIDGE_PW]
    zk_cli(r2.hosts, script="".join(f"addauth digest bridge:{pw}\n" for pw in logins)
           + f"{fix}\nquit\n")
    fed.start("r2")
    r1.client.set(r1.path("/app/x"), b"v2")
    wait_for(lambda: r2.client.get(r2.path("/app/x"))[0] == b"v2", 20)
    if change == "rotated":
        new = make_digest_acl("bridge", new_pw, all=True)
        acls = _state_acls(fed, "r2", "bridge", new_pw)
        assert all(acl == [new] for acl in acls.values()), acls
    fed.assert_clean_logs(allowed={"bridge_stopped"})


def test_zookeeper_auth_added_later_makes_the_open_state_the_bridge_s_own(
    federation: Federation,
) -> None:
    # README promises the state is the bridge identity's alone once zookeeper.auth
    # is set. Before: state made by a bridge without it stayed open to everyone.
    fed = federation
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    r1.client.create(r1.path("/app/x"), b"v1", makepath=True)
    wait_for(lambda: r2.client.exists(r2.path("/app/x")) is not None, 20)
    assert fed.stop("r2") == 0
    fed.write_config("r2", zookeeper={"auth": {"credential": f"bridge:{BRIDGE_PW}"}})
    fed.start("r2")
    own = make_digest_acl("bridge", BRIDGE_PW, all=True)
    acls = _state_acls(fed, "r2", "bridge", BRIDGE_PW)
    assert len(acls) > 5 and all(acl == [own] for acl in acls.values()), acls
    tightened = [e for e in fed.events("r2") if e["event"] == "state_acl_tightened"]
    assert len(tightened) == 1, tightened
    with pytest.raises(NoAuthError):
        r2.client.get(f"{fed.state_path}/incarnation")
    r1.client.set(r1.path("/app/x"), b"v2")
    wait_for(lambda: r2.client.get(r2.path("/app/x"))[0] == b"v2", 20)
    fed.assert_clean_logs(allowed={"state_acl_tightened"})
