"""Clock poisoning is refused: a peer event stamped far ahead waits, loudly, unapplied.

An event ten years ahead (a broken clock or a hostile writer) must neither be
applied (this region's hybrid clock, and every later local write, would be
dragged there and win every conflict) nor skipped (that would diverge).
"""

from __future__ import annotations

import json
import time

import msgpack
import pytest

from bridge import statecodec
from bridge.clock import hlc_from_ms, hlc_to_ms
from tests.harness.procs import wait_for
from tests.integration.federation import Federation
from tests.integration.test_faults import produce

pytestmark = pytest.mark.integration

TEN_YEARS_MS = 10 * 365 * 24 * 3600 * 1000


def test_a_far_future_event_waits_and_never_poisons_the_clock(federation: Federation) -> None:
    fed = federation
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    future = hlc_from_ms(int(time.time() * 1000) + TEN_YEARS_MS)
    event = dict(v=1, origin="r1", subtree=fed.subtree, path="/future", op="put",
                 data=b"from-the-future", vc={"r1": 1000}, ts=future, writer="r1")
    produce(fed.broker.bootstrap, f"{fed.prefix}.{fed.subtree}.r1",
            [(b"/future", msgpack.packb(event))])
    wait_for(lambda: fed.count_events("r2", "clock_skew_wait") >= 1, 30,
             message="r2 did not report the far-future event")
    assert r2.client.exists(r2.path("/future")) is None  # not applied
    # r2's own writes still go out with sane stamps, and still reach r1.
    r2.client.create(r2.path("/local"), b"now")
    wait_for(lambda: r1.client.exists(r1.path("/local")) is not None, 30)
    meta_path = f"{fed.state_path}/subtrees/{fed.subtree}/meta/local"
    meta = statecodec.decode_meta(r2.client.get(meta_path)[0])
    assert meta is not None
    assert hlc_to_ms(meta.ts) < time.time() * 1000 + 60_000

    def reported() -> bool:
        out = fed.cli("status", "-c", str(r2.config_path), "--json").stdout
        json.loads(out)
        return "ahead" in out

    # The status record is rewritten every 2 s: the waiting stream shows up there.
    wait_for(reported, 30, message="status never reported the waiting stream")

    # Later events of r1 wait behind it: nothing is skipped silently.
    r1.client.create(r1.path("/after"), b"later")
    time.sleep(3)
    assert r2.client.exists(r2.path("/after")) is None

    # The operator skips the record status names; a wrong offset is refused.
    status = json.loads(fed.cli("status", "-c", str(r2.config_path), "--json").stdout)
    [waiting] = status["waiting"].values()
    topic, offset = waiting["topic"], waiting["offset"]
    assert "zkbridge skip" in fed.cli("status", "-c", str(r2.config_path)).stdout
    wrong = fed.cli("skip", "-c", str(r2.config_path), "--topic", topic, "--offset",
                    str(offset + 5))
    assert wrong.returncode == 1 and "does not wait on" in wrong.stderr, wrong
    done = fed.cli("skip", "-c", str(r2.config_path), "--topic", topic, "--offset", str(offset))
    assert done.returncode == 0 and "skipped" in done.stdout, done
    wait_for(lambda: r2.client.exists(r2.path("/after")) is not None, 30,
             message="r1's later event did not follow the skip")
    assert r2.client.exists(r2.path("/future")) is None
    [audit] = [e for e in fed.events("r2") if e.get("event") == "record_skipped"]
    assert audit["offset"] == offset and audit["paths"] == ["/future"] and audit["requested_by"]
    assert not r2.client.get_children(f"{fed.state_path}/skips")

    def audited() -> bool:
        doc = json.loads(fed.cli("status", "-c", str(r2.config_path), "--json").stdout)
        return any(i["kind"] == "SKIPPED" for i in doc["incidents"]) and not doc["waiting"]

    wait_for(audited, 30, message="status never listed the skip")
    # The audit outlives the process that skipped: a restarted bridge keeps the
    # region's recent incidents (before, its first record dropped them).
    assert fed.stop("r2") == 0
    fed.start("r2")
    doc = json.loads(fed.cli("status", "-c", str(r2.config_path), "--json").stdout)
    assert [i["kind"] for i in doc["incidents"]] == ["SKIPPED"], doc["incidents"]
    assert any(p["kind"] == "SKIPPED" for p in doc["verdict"]["problems"]), doc["verdict"]
    fed.assert_clean_logs(allowed={"clock_skew_wait"})


def test_a_bridge_whose_own_clock_is_off_reports_itself_degraded(
        federation: Federation) -> None:
    fed = federation
    fed.start("r1")
    fed.start("r3")
    fed.start("r2", env={"ZKBRIDGE_CLOCK_OFFSET_MS": str(120_000)})  # two minutes fast
    r2 = fed["r2"]

    def clock_problem() -> dict[str, object] | None:
        doc = json.loads(fed.cli("status", "-c", str(r2.config_path), "--json").stdout)
        found = [p for p in doc["verdict"]["problems"] if p["kind"] == "CLOCK"]
        return found[0] if found and doc["health"] == "degraded" else None

    wait_for(clock_problem, 60, message="r2 never reported its own clock as off")
    problem = clock_problem()
    assert problem is not None and "ahead of the heartbeats of r1, r3" in str(problem["text"])
    # r1 and r3 agree with each other: r2 alone is off, so they do not blame their own clocks.
    for name in ("r1", "r3"):
        doc = json.loads(fed.cli("status", "-c", str(fed[name].config_path), "--json").stdout)
        assert not [p for p in doc["verdict"]["problems"] if p["kind"] == "CLOCK"], doc
    assert [e for e in fed.events("r2") if e.get("event") == "clock_disagrees"]
    fed.assert_clean_logs(allowed={"clock_skew_wait", "clock_disagrees"})
