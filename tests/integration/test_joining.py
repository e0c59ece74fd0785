"""A region whose ensemble already holds the subtree joins the federation.

Its first start applies the peers' versions over what it holds and then
publishes only the paths no peer has (``bridge.joining``). Before, its start
published every znode it held as a write made now, so an old copy won every
conflict in every region: the federation's newest values were replaced by
the copy's and its deleted paths came back.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from tests.harness import procs
from tests.integration.federation import Federation

pytestmark = [pytest.mark.integration, pytest.mark.every_zookeeper]

OLD = ("r1", "r2", "r3")
# r4's copy, made some time ago: /flag and /list/a changed since, /gone was deleted.
COPY = {"/flag": b"old", "/list": b"", "/list/a": b"1", "/gone": b"stale",
        "/only-r4": b"mine", "/only-r4/deep": b"mine too"}


def _federation_and_a_copy(make_federation: Callable[..., Federation]) -> Federation:
    """r1..r3 replicate among themselves; r4's ensemble holds an old copy of the subtree."""
    fed = make_federation(spare=True)
    for name in OLD:
        fed.write_config(name, peers=[p for p in OLD if p != name])
        fed.start(name)
    r1, r2, r4 = fed["r1"], fed["r2"], fed["r4"]
    r1.client.create(r1.path("/flag"), b"new")
    r1.client.create(r1.path("/list/a"), b"2", makepath=True)
    r1.client.create(r1.path("/gone"), b"x")
    r2.client.create(r2.path("/from-r2"), b"r2's")
    fed.wait_converged(list(OLD))
    r1.client.delete(r1.path("/gone"))  # a delete the federation knows of: a tombstone
    fed.wait_converged(list(OLD))
    for rel, data in COPY.items():
        r4.client.create(r4.path(rel), data)
    return fed


def _expected(fed: Federation) -> dict[str, bytes]:
    return {**fed.tree("r1"), "/only-r4": b"mine", "/only-r4/deep": b"mine too"}


def _all_join(fed: Federation) -> None:
    """r1..r3 add r4 to their peers, one after the other, as an operator would."""
    for name in OLD:
        fed.write_config(name, peers=[p for p in ("r1", "r2", "r3", "r4") if p != name])
        fed.stop(name)
        fed.start(name)
    fed.wait_converged()


@pytest.mark.parametrize("watches", ["recursive", "per-node"])
def test_a_region_with_an_old_copy_takes_the_federation_s_versions(
        make_federation: Callable[..., Federation], watches: str) -> None:
    fed = _federation_and_a_copy(make_federation)
    want = _expected(fed)
    env = {"ZKBRIDGE_REFUSE_ADDWATCH": "1"} if watches == "per-node" else {}
    fed.start("r4", env=env)  # ready: caught up, and what only r4 had is published
    assert fed.tree("r4") == want
    [joining] = [e for e in fed.events("r4") if e["event"] == "subtree_joining"]
    assert joining["set_aside"] == len(COPY)
    [joined] = [e for e in fed.events("r4") if e["event"] == "subtree_joined"]
    assert joined["published"] == 2  # /only-r4 and /only-r4/deep
    _all_join(fed)
    for name in fed.regions:
        assert fed.tree(name) == want, name
    # Nothing was a conflict: r4's copy had no clock to be concurrent with.
    assert not any(fed.count_events(n, "conflict_resolved") for n in fed.regions)
    # Later starts are ordinary ones.
    assert r4_marker_gone(fed)
    fed.stop("r4")
    fed.start("r4", env=env)
    assert fed.count_events("r4", "subtree_joining") == 1
    fed.wait_converged()
    fed.assert_clean_logs()


@pytest.mark.parametrize("crash", ["after_apply_before_position", "join_ending"])
def test_a_join_cut_short_by_a_crash_still_keeps_the_copy_s_old_values(
        make_federation: Callable[..., Federation], crash: str) -> None:
    """Killed after its first apply (the marker keeps the next start joining), or after
    publishing its own znodes (the next start finds nothing left to publish)."""
    fed = _federation_and_a_copy(make_federation)
    want = _expected(fed)
    fed.crash_at("r4", f"{crash}=crash@1")
    fed.start("r4")
    assert fed.tree("r4") == want
    assert r4_marker_gone(fed)
    _all_join(fed)
    for name in fed.regions:
        assert fed.tree(name) == want, name
    assert not any(fed.count_events(n, "conflict_resolved") for n in fed.regions)
    fed.assert_clean_logs()


def test_a_write_made_while_a_crashed_join_was_down_is_not_taken_for_the_copy(
        make_federation: Callable[..., Federation]) -> None:
    """r4's join is killed before its first apply; an application sets /flag in r4
    before the bridge is back. That write is newer than every version the
    federation has, and wins: the next start tells it from the copy by the joining
    marker's czxid. Before, that start set it aside as part of the copy (the
    first scan's reads died with the process) and r1's version went over it."""
    fed = _federation_and_a_copy(make_federation)
    fed.crash_at("r4", "before_apply=crash@1")
    r4 = fed["r4"]
    r4.client.set(r4.path("/flag"), b"written while down")
    fed.start("r4")
    want = {**_expected(fed), "/flag": b"written while down"}
    assert fed.tree("r4") == want
    *_, joining = [e for e in fed.events("r4") if e["event"] == "subtree_joining"]
    assert joining["set_aside"] == len(COPY) - 1  # all but /flag
    _all_join(fed)
    for name in fed.regions:
        assert fed.tree(name) == want, name
    fed.assert_clean_logs()


@pytest.mark.parametrize("bridge", ["paused", "down"])
def test_a_copy_s_znode_deleted_during_the_join_stays_deleted(
        make_federation: Callable[..., Federation], bridge: str) -> None:
    """r4's join is paused after its scan set the copy aside and before its first
    apply, or killed there; an application deletes /flag in r4 meanwhile. That
    delete is newer than every version the federation has: /flag goes in all four
    regions. Before, the delete of a znode with no record announced nothing, and
    the apply brought r1's version back; after a kill, the next start found no
    trace of /flag (now the join's list of what it set aside has it)."""
    fed = _federation_and_a_copy(make_federation)
    r4 = fed["r4"]
    if bridge == "down":
        fed.crash_at("r4", "before_apply=crash@1")
        r4.client.delete(r4.path("/flag"))
        fed.start("r4")
    else:
        paused = fed.start("r4", env={"ZKBRIDGE_FAILPOINTS": "before_apply=stop@1"},
                           wait=False)
        proc = paused.proc
        assert proc is not None
        try:
            procs.wait_for(lambda: procs.stopped(proc.pid), 60,
                           message="before_apply=stop@1 never stopped it")
            assert fed.count_events("r4", "subtree_joining") == 1  # the copy is set aside
            r4.client.delete(r4.path("/flag"))
        finally:
            proc.send_signal(signal.SIGCONT)  # well within its session timeout
        fed.wait_ready("r4")
    want = {r: d for r, d in _expected(fed).items() if r != "/flag"}
    assert fed.tree("r4") == want
    # The list goes with the marker.
    assert r4.client.exists(f"{fed.state_path}/subtrees/{fed.subtree}/aside") is None
    _all_join(fed)
    for name in fed.regions:
        assert fed.tree(name) == want, name
    fed.assert_clean_logs()


def test_regions_holding_the_same_copy_record_no_conflicts(
        make_federation: Callable[..., Federation]) -> None:
    """A subtree every region already holds (added to the configuration later): the
    first region's start publishes it, the others take its versions. Before, every
    region published every znode and each path was a conflict in every region."""
    fed = make_federation()
    for name in fed.regions:
        r = fed[name]
        for i in range(20):
            r.client.create(r.path(f"/shared/n{i}"), b"same", makepath=True)
    for name in fed.regions:
        fed.start(name)
    fed.wait_converged()
    assert not any(fed.count_events(n, "conflict_resolved") for n in fed.regions)
    published = [e["published"] for n in fed.regions for e in fed.events(n)
                 if e["event"] == "subtree_joined"]
    assert sorted(published) == [0, 0, 21], published  # /shared and its 20 children, once
    fed.assert_clean_logs()


def r4_marker_gone(fed: Federation) -> bool:
    r4 = fed["r4"]
    return r4.client.exists(f"{fed.state_path}/subtrees/{fed.subtree}/joining") is None


@pytest.mark.parametrize("how", ["reload", "reload-killed", "restart"])
def test_a_path_included_again_takes_the_federation_s_versions(
        make_federation: Callable[..., Federation], how: str) -> None:
    """r2 excluded /tmp for a while, and its applications wrote there meanwhile: an
    older value of a path r1 created later, an older change of a path replicated
    before (r1 changed it later too), a path of r2's own, and the deletes of two
    replicated paths (r1 changed one of them later). Once r2 includes /tmp again,
    r1's newer values stay in every region, and r2's own path and its delete of the
    path no one changed since reach them all, as when a region joins with a copy.
    Killed once the re-read is stored, the next start still finds /tmp joining (the
    marker was written before it). Before, r2's older delete removed r1's newer
    /tmp/d everywhere."""
    fed = make_federation()
    r1, r2 = fed["r1"], fed["r2"]
    fed.start("r1", wait=False)
    fed.start("r3", wait=False)
    fed.start("r2", env={"ZKBRIDGE_FAILPOINTS": "reread_stored=crash@1"}
              if how == "reload-killed" else None)
    fed.wait_ready("r1")
    fed.wait_ready("r3")
    r1.client.create(r1.path("/tmp/r"), b"replicated", makepath=True)
    r1.client.create(r1.path("/tmp/d"), b"replicated")
    r1.client.create(r1.path("/tmp/gone"), b"replicated")
    fed.wait_converged()
    fed.write_exclude("r2", ["/tmp"])
    assert r2.proc is not None
    r2.proc.send_signal(signal.SIGHUP)
    procs.wait_for(lambda: fed.count_events("r2", "reloaded") == 1, 30)
    r2.client.create(r2.path("/tmp/a"), b"r2, while excluded")
    r2.client.set(r2.path("/tmp/r"), b"r2, while excluded")
    r2.client.create(r2.path("/tmp/own"), b"r2's own")
    r2.client.delete(r2.path("/tmp/d"))
    r2.client.delete(r2.path("/tmp/gone"))
    r1.client.create(r1.path("/tmp/a"), b"r1, newest")
    r1.client.set(r1.path("/tmp/d"), b"r1, newest")
    r1.client.set(r1.path("/tmp/r"), b"r1, newest")
    r1.client.create(r1.path("/kept"), b"k")
    procs.wait_for(lambda: r2.client.exists(r2.path("/kept")) is not None, 30)
    fed.exclude_by("r2", how)
    procs.wait_for(lambda: r1.client.exists(r1.path("/tmp/own")) is not None, 30,
                   message="r2's own path under /tmp never reached r1")
    fed.wait_converged()
    for name in fed.regions:
        assert fed.tree(name)["/tmp/a"] == b"r1, newest", name
        assert fed.tree(name)["/tmp/r"] == b"r1, newest", name
        assert fed.tree(name)["/tmp/own"] == b"r2's own", name
        assert fed.tree(name).get("/tmp/d") == b"r1, newest", name
        assert "/tmp/gone" not in fed.tree(name), name
    # Its first start joined the whole subtree; the include, /tmp.
    joined = [e for e in fed.events("r2") if e["event"] == "subtree_joined"]
    assert [e["paths"] for e in joined] == [["/"], ["/tmp"]]
    assert joined[1]["published"] == 2  # /tmp/own, /tmp/gone's delete: r1 has the others
    assert r2.client.exists(f"{fed.state_path}/subtrees/{fed.subtree}/joining") is None
    fed.assert_clean_logs()


def test_a_subtree_added_back_takes_the_federation_s_versions(
        make_federation: Callable[..., Federation]) -> None:
    """r2 ran without the subtree "side" for a while (taken out of its configuration,
    restarted), and its applications changed it meanwhile: an older change and an
    older delete of paths r1 changed later, a path of r2's own, and the delete of a
    path no one changed since. Once r2 has it in its configuration again, every
    region ends with r1's newer values, r2's own path and that delete. Before, r2's
    older change and delete, captured as writes made then, won over r1's newer ones
    in every region."""
    fed = make_federation()
    r1, r2 = fed["r1"], fed["r2"]

    def side(name: str, rel: str = "") -> str:
        return f"/{fed.token}/{name}-side{rel}"

    def both(name: str) -> list[dict[str, str]]:
        return [{"name": fed.subtree, "path": fed[name].mount},
                {"name": "side", "path": side(name)}]

    for name in fed.regions:
        fed.write_config(name, subtrees=both(name))
        fed.start(name, wait=False)
    for name in fed.regions:
        fed.wait_ready(name)
    for rel in ("/r", "/d", "/gone"):
        r1.client.create(side("r1", rel), b"replicated", makepath=True)
    for name in fed.regions:
        procs.wait_for(lambda n=name: fed[n].client.exists(side(n, "/gone")) is not None, 30)
    fed.write_config("r2", subtrees=both("r2")[:1])
    assert fed.stop("r2") == 0
    fed.start("r2")
    r2.client.set(side("r2", "/r"), b"r2, while away")
    r2.client.delete(side("r2", "/d"))
    r2.client.delete(side("r2", "/gone"))
    r2.client.create(side("r2", "/own"), b"r2's own")
    r1.client.set(side("r1", "/r"), b"r1, newest")
    r1.client.set(side("r1", "/d"), b"r1, newest")
    procs.wait_for(lambda: fed["r3"].client.get(side("r3", "/d"))[0] == b"r1, newest", 30)
    # Meanwhile the others hear nothing from r2 for that subtree, and say so.
    procs.wait_for(lambda: any(e["event"] == "peer_silent" and e["subtree"] == "side"
                               and e["peer"] == "r2" for e in fed.events("r1")), 30,
                   message="r1 never said r2 was silent for the subtree it left")
    # Heard on the other subtree: named for its configuration, not as down.
    [silent] = [e for e in fed.events("r1") if e["event"] == "peer_silent"
                and e["subtree"] == "side" and e["peer"] == "r2"]
    assert "`side` is missing from its configuration" in silent["hint"], silent
    status = fed.cli("status", "-c", str(fed["r1"].config_path)).stdout
    assert "no heartbeat from r2 (side)" in status and "r2 is heard on" in status, status
    fed.write_config("r2", subtrees=both("r2"))
    assert fed.stop("r2") == 0
    fed.start("r2")

    def tree(name: str) -> dict[str, bytes]:
        client = fed[name].client
        return {c: client.get(side(name, f"/{c}"))[0] for c in client.get_children(side(name))}

    want = {"r": b"r1, newest", "d": b"r1, newest", "own": b"r2's own"}
    procs.wait_for(lambda: all(tree(n) == want for n in fed.regions), 60,
                   message=lambda: f"side differs: { {n: tree(n) for n in fed.regions} }")
    joined = [e for e in fed.events("r2") if e["event"] == "subtree_joined"
              and e["subtree"] == "side"]
    assert [e["published"] for e in joined] == [0, 2]  # its first start; /own, /gone's delete
    assert fed.count_events("r2", "subtree_away") == 1  # marked once, by the start without it
    assert fed.count_events("r2", "subtree_back") == 1
    assert r2.client.exists(f"{fed.state_path}/subtrees/side/joining") is None
    fed.assert_clean_logs(allowed={"peer_silent"})


def _join_tmp_and_crash(fed: Federation) -> None:
    """r2 excludes /tmp and /etc and writes there (r1 too); a restart takes /tmp in
    again and is killed before its first apply: /tmp joins, its list written
    (/tmp/own), and /etc stays excluded."""
    r1, r2 = fed["r1"], fed["r2"]
    fed.start_all()
    r1.client.create(r1.path("/tmp/r"), b"replicated", makepath=True)
    r1.client.create(r1.path("/etc/x"), b"replicated", makepath=True)
    fed.wait_converged()
    fed.exclude_by("r2", "restart", ["/tmp", "/etc"])
    r2.client.create(r2.path("/tmp/own"), b"r2's own")  # /tmp's join lists it
    r2.client.set(r2.path("/etc/x"), b"r2, while excluded")
    r2.client.create(r2.path("/etc/b"), b"r2, while excluded")
    r1.client.set(r1.path("/tmp/r"), b"r1, while r2 excluded it")
    r1.client.set(r1.path("/etc/x"), b"r1, newest")
    r1.client.create(r1.path("/etc/b"), b"r1's")
    r1.client.create(r1.path("/kept"), b"k")
    procs.wait_for(lambda: r2.client.exists(r2.path("/kept")) is not None, 30)
    assert fed.stop("r2") == 0
    fed.write_exclude("r2", ["/etc"])
    fed.crash_at("r2", "before_apply=crash@1")  # /tmp's re-read, not applied


def test_a_join_widened_after_a_crash_keeps_the_writes_made_since_it_began(
        make_federation: Callable[..., Federation]) -> None:
    """r2 excluded /tmp and /etc. A restart took /tmp in again and was killed before
    its first apply: /tmp is still joining, and its list holds /tmp/own, which r2
    created while excluded. An application sets /tmp/r in r2 while the bridge is
    down, after r1's version. The next start takes /etc in too and is killed the
    same way; an application deletes /etc/b in r2, which r2 created while /etc was
    excluded (r1 has a version of it). Then r2 starts for good. Both writes, made
    after their paths' joins began, win in every region, while what r2 wrote in
    /etc while excluded takes r1's later version. Before, widening the marker for
    /etc moved /tmp's line with it, so r2's newer /tmp/r was taken for a write made
    while excluded and r1's older version went over it; and the join's list kept
    only what /tmp's scan set aside, so r1's /etc/b came back over r2's delete."""
    fed = make_federation()
    r1, r2 = fed["r1"], fed["r2"]
    _join_tmp_and_crash(fed)
    r2.client.set(r2.path("/tmp/r"), b"r2, while down")
    fed.write_exclude("r2", [])
    fed.crash_at("r2", "before_apply=crash@1")  # /etc set aside too, not applied
    r2.client.delete(r2.path("/etc/b"))
    fed.start("r2")
    procs.wait_for(lambda: r1.client.get(r1.path("/tmp/r"))[0] == b"r2, while down", 30,
                   message=lambda: f"r1 has /tmp/r = {r1.client.get(r1.path('/tmp/r'))[0]!r}")
    procs.wait_for(lambda: r1.client.exists(r1.path("/etc/b")) is None, 30,
                   message="r2's delete of /etc/b never reached r1")
    fed.wait_converged()
    for name in fed.regions:
        assert fed.tree(name)["/tmp/r"] == b"r2, while down", name
        assert fed.tree(name)["/etc/x"] == b"r1, newest", name
        assert "/etc/b" not in fed.tree(name), name
        assert fed.tree(name)["/tmp/own"] == b"r2's own", name
    marked = [e["paths"] for e in fed.events("r2") if e["event"] == "paths_joining"]
    assert marked == [["/tmp"], ["/etc"]], marked
    assert r2.client.exists(f"{fed.state_path}/subtrees/{fed.subtree}/joining") is None
    assert r2.client.exists(f"{fed.state_path}/subtrees/{fed.subtree}/aside") is None
    fed.assert_clean_logs()


def _delete_etc_b_and_start(fed: Federation) -> None:
    """An application deletes /etc/b in r2 while its bridge is down; once it runs,
    the delete holds in every region."""
    r1, r2 = fed["r1"], fed["r2"]
    r2.client.delete(r2.path("/etc/b"))
    fed.start("r2")
    procs.wait_for(lambda: r1.client.exists(r1.path("/etc/b")) is None, 30,
                   message="r2's delete of /etc/b never reached r1")
    fed.wait_converged()
    for name in fed.regions:
        assert "/etc/b" not in fed.tree(name), name


def test_a_crash_right_after_the_join_was_widened_still_lists_the_new_path(
        make_federation: Callable[..., Federation]) -> None:
    """r2 excluded /tmp and /etc. A restart took /tmp in again and was killed before
    its first apply, its list written. The next start widened the marker for /etc
    and was killed at once; the one after set /etc/b aside (r2 created it while
    excluded, r1 has a version) and was killed before its first apply. An
    application deletes /etc/b in r2 meanwhile, then r2 starts for good: the
    delete wins in every region. Before, the start after the widening took the
    list for whole, /etc/b was never listed, and r1's version came back."""
    fed = make_federation()
    r2 = fed["r2"]
    _join_tmp_and_crash(fed)
    fed.write_exclude("r2", [])
    fed.crash_at("r2", "join_marked=crash@1")  # widened for /etc, no scan yet
    fed.crash_at("r2", "before_apply=crash@1")  # /etc/b set aside, not applied
    _delete_etc_b_and_start(fed)
    for name in fed.regions:
        tree = fed.tree(name)
        assert tree["/tmp/own"] == b"r2's own", name
        assert tree["/tmp/r"] == b"r1, while r2 excluded it", name
        assert tree["/etc/x"] == b"r1, newest", name
    marked = [e["paths"] for e in fed.events("r2") if e["event"] == "paths_joining"]
    assert marked == [["/tmp"], ["/etc"]], marked
    assert r2.client.exists(f"{fed.state_path}/subtrees/{fed.subtree}/aside") is None
    fed.assert_clean_logs()


def test_a_join_s_list_left_unfinished_by_a_crash_is_kept(
        make_federation: Callable[..., Federation]) -> None:
    """r2 excluded /etc and created /etc/b there (r1 has a version). Taken in again
    by a restart killed after its list's pieces were written, before the list was
    marked whole; an application deletes /etc/b in r2, then r2 starts for good: the
    delete wins in every region. Before, the unfinished list was dropped, and
    r1's version came back."""
    fed = make_federation()
    r1, r2 = fed["r1"], fed["r2"]
    fed.start_all()
    r1.client.create(r1.path("/etc/x"), b"replicated", makepath=True)
    fed.wait_converged()
    fed.exclude_by("r2", "restart", ["/etc"])
    r2.client.create(r2.path("/etc/b"), b"r2, while excluded")
    r1.client.create(r1.path("/etc/b"), b"r1's")
    r1.client.create(r1.path("/kept"), b"k")
    procs.wait_for(lambda: r2.client.exists(r2.path("/kept")) is not None, 30)
    assert fed.stop("r2") == 0
    fed.write_exclude("r2", [])
    fed.crash_at("r2", "join_listed=crash@1")
    _delete_etc_b_and_start(fed)
    assert r2.client.exists(f"{fed.state_path}/subtrees/{fed.subtree}/aside") is None
    fed.assert_clean_logs()
