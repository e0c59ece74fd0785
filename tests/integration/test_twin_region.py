"""Two ensembles configured as one region (a copied config): refused, never silent.

Ensemble A is r1's; ensemble B (the spare server) runs a copy of r1's config
with only its ZooKeeper changed. r2 applies r1's topic.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.harness.procs import wait_for
from tests.integration.federation import Federation

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


def test_copied_config_is_refused_and_its_writes_never_applied(
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
    #    starts and publishes its own /crit/x with the very clock A used.
    fed.stop("r1")
    fed.start("r4")
    wait_for(lambda: fed.count_events("r2", "clock_collision") >= 1, 30,
             message="r2 never noticed equal clocks with different content")
    hit = next(e for e in fed.events("r2") if e.get("event") == "clock_collision")
    assert (hit["origin"], hit["path"]) == ("r1", "/crit/x")
    assert r2.client.get(r2.path("/crit/x"))[0] == b"from-A"  # not applied
    shown = ""

    def reported() -> bool:
        nonlocal shown
        shown = fed.cli("status", "-c", str(r2.config_path)).stdout
        return "COLLISION" in shown and "degraded" in shown

    wait_for(reported, 30, message=lambda: f"status does not say it:\n{shown}")

    # 3. A comes back while B runs: A is the one refused now.
    fed.start("r1", wait=False)
    code, took_a = _exits(fed, "r1")
    assert code == DUPLICATE_REGION_EXIT, code
    assert r2.client.get(r2.path("/crit/x"))[0] == b"from-A"
    harness_report(f"duplicate region refused within {took:.1f}s of its start (A running), "
                   f"{took_a:.1f}s (B running)")
    fed.assert_clean_logs(allowed={"duplicate_region", "clock_collision"})
