"""The fault campaign's short fixed-seed form: one round, every checker must pass.

Long runs with random seeds are `scripts/chaos --minutes N`; this round starts
its own cluster (9 ZooKeeper servers, a broker, 6 bridges), so it does not use
the shared servers. ZKBRIDGE_CHAOS_SEED picks another seed to reproduce a run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos.run import run_round
from tests.harness import procs
from tests.harness.broker import KIND_ENV

SEED = int(os.environ.get("ZKBRIDGE_CHAOS_SEED", "1203"))


@pytest.mark.timeout(900)
def test_chaos_round_fixed_seed(tmp_path: Path, harness_report: Callable[[str], None]) -> None:
    before = set(procs.live_pids())
    broker = os.environ.get(KIND_ENV, "").strip() or "kafka"
    result = run_round(SEED, fault_seconds=40, broker=broker, out_dir=tmp_path, keep=False,
                       quiet=True)
    for line in result.lines():
        harness_report("chaos " + line)
    assert set(procs.live_pids()) <= before, "the round left processes behind"
    assert result.passed, "\n".join(result.lines())
