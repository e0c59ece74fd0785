"""scripts/bench.py without servers: it imports, parses its options, and its arithmetic holds.

The benchmark itself needs real servers and minutes of CPU; it runs by hand
(scripts/bench), not in the test suite. These checks keep it from rotting.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("zkbridge_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_help_runs() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--quick" in out.stdout and "--json" in out.stdout


def test_percentile_nearest_rank(bench: ModuleType) -> None:
    values = list(range(1, 101))
    assert bench.percentile(values, 50) == 50
    assert bench.percentile(values, 95) == 95
    assert bench.percentile(values, 99) == 99
    assert bench.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        bench.percentile([], 50)


def test_values_have_the_announced_size(bench: ModuleType) -> None:
    assert len(bench.value("v0", 123)) == bench.VALUE_BYTES
    assert bench.value("v0", 1) != bench.value("v1", 1)


def test_table_and_ratio(bench: ModuleType) -> None:
    assert bench.ratio(50.0, 1000.0, "multi") == "0.050x multi"
    assert bench.ratio(None, 1000.0, "multi") == ""
    rows = [bench.Row("raw: thing", 1234.5, "ops/s"), bench.Row("missing", None, "s")]
    text = bench.table(rows)
    assert "1,234" in text or "1,235" in text
    assert "n/a" in text


@pytest.mark.parametrize("scale_name", ["FULL", "QUICK"])
def test_scales_leave_room_for_every_step(bench: ModuleType, scale_name: str) -> None:
    s = getattr(bench, scale_name)
    leaves = s.dirs * s.leaves
    assert s.steady <= leaves
    conflict_first_dir = s.dirs // 2 + s.latency_writes // s.leaves + 1
    assert (s.dirs - conflict_first_dir) * s.leaves >= s.conflict_paths
