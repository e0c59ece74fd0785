"""Two ensembles configured as one region (a copied config): refused, never silent.

Ensemble A is r1's; ensemble B (the spare server) runs a copy of r1's config
with only its ZooKeeper changed. r2 applies r1's topic.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgpack

from bridge.clock import hlc_from_ms
from tests.harness.procs import wait_for
from tests.integration.federation import Federation
from tests.integration.test_faults import produce

Report = Callable[[str], None]
DUPLICATE_REGION_EXIT = 4


def _exits(fed: Federation, name: str, timeout: float = 60) -> tuple[int, float]:
    proc = fed[name].proc
    assert proc is not None
    t0 = time.monotonic()
    wait_for(lambda: proc.poll() is not None, timeout,
             message=f"{name} kept running as a duplicate of r1")
    fed[name].proc = None
    return proc.returncode, time.monotonic() - t0


def test_copied_config_is_refused_while_the_other_runs_and_nothing_diverges(
    make_federation: Callable[..., Federation], harness_report: Report,
) -> None:
    fed = make_federation(spare=True)
    fed.write_config("r1", peers=["r2"])
    fed.write_config("r2", peers=["r1"])
    # B: r1's config, another ensemble (the copied template).
    fed.write_config("r4", peers=["r2"], region="r1")
    a, r2, b = fed["r1"], fed["r2"], fed["r4"]
    fed.start("r1")
    fed.start("r2")
    a.client.create(a.path("/crit/x"), b"from-A", makepath=True)
    wait_for(lambda: r2.client.exists(r2.path("/crit/x")), 30)
    b.client.create(b.path("/crit/x"), b"from-B", makepath=True)

    # 1. B starts while A runs: refused before it publishes anything.
    fed.start("r4", wait=False)
    code, took = _exits(fed, "r4")
    assert code == DUPLICATE_REGION_EXIT, code
    refused = [e for e in fed.events("r4") if e.get("event") == "duplicate_region"]
    assert len(refused) == 1 and "same region" in refused[0]["error"], refused
    assert "copied config" in refused[0]["error"]

    # 2. A is down (as after a wipe, B cannot be told from a restore): B
    #    starts, rebuilds r1's history from r1's topic (its copy of /crit/x
    #    takes A's version, as a joining region's would) and publishes as r1.
    fed.stop("r1")
    fed.start("r4")
    assert b.client.get(b.path("/crit/x"))[0] == b"from-A"
    assert r2.client.get(r2.path("/crit/x"))[0] == b"from-A"
    b.client.set(b.path("/crit/x"), b"B's write")  # to r2, B is r1: applied
    wait_for(lambda: r2.client.get(r2.path("/crit/x"))[0] == b"B's write", 30)

    # 3. A comes back while B runs: A is the one refused now.
    fed.start("r1", wait=False)
    code, took_a = _exits(fed, "r1")
    assert code == DUPLICATE_REGION_EXIT, code

    # 4. B stops and A starts again: it reads r1's topic, where B published as
    #    r1, as a restored ensemble would, and takes B's write. Nothing diverges.
    fed.stop("r4")
    fed.start("r1")
    assert fed.count_events("r1", "replaying_own_topic") >= 1
    assert a.client.get(a.path("/crit/x"))[0] == b"B's write"
    a.client.set(a.path("/crit/x"), b"A's write")
    wait_for(lambda: r2.client.get(r2.path("/crit/x"))[0] == b"A's write", 30)
    fed.wait_converged(["r1", "r2"])
    harness_report(f"duplicate region refused within {took:.1f}s of its start (A running), "
                   f"{took_a:.1f}s (B running)")
    fed.assert_clean_logs(allowed={"duplicate_region"})


def test_equal_clocks_with_other_content_are_a_collision_and_not_applied(
        federation: Federation) -> None:
    """Two writers of one region that never saw each other: a record on r1's topic with
    the clock r1 gave /x and other content (as a second ensemble's bridge would
    publish, had it started before the twin check could see the first one)."""
    fed = federation
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    r1.client.create(r1.path("/x"), b"from r1")
    fed.wait_converged()
    twin = dict(v=1, origin="r1", subtree=fed.subtree, path="/x", op="put", data=b"from a twin",
                vc={"r1": 1}, ts=hlc_from_ms(int(time.time() * 1000)), writer="r1")
    produce(fed.broker.bootstrap, f"{fed.prefix}.{fed.subtree}.r1",
            [(b"/x", msgpack.packb(twin))])
    wait_for(lambda: fed.count_events("r2", "clock_collision") >= 1, 30,
             message="r2 never noticed equal clocks with different content")
    hit = next(e for e in fed.events("r2") if e.get("event") == "clock_collision")
    assert (hit["origin"], hit["path"]) == ("r1", "/x")
    assert r2.client.get(r2.path("/x"))[0] == b"from r1"  # not applied
    shown = ""

    def reported() -> bool:
        nonlocal shown
        shown = fed.cli("status", "-c", str(r2.config_path)).stdout
        return "COLLISION" in shown and "degraded" in shown

    wait_for(reported, 30, message=lambda: f"status does not say it:\n{shown}")
    fed.assert_clean_logs(allowed={"clock_collision"})
