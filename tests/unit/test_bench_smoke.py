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
    assert "--quick" in out.stdout and "--json" in out.stdout and "--large" in out.stdout


def test_quick_and_large_exclude_each_other() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--large"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "not allowed with" in out.stderr and "Traceback" not in out.stderr


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
    assert s.conflict_paths <= leaves
    # Latency writes use distinct paths from the second half of the tree.
    assert (s.dirs - s.dirs // 2) * s.leaves >= s.latency_writes
    assert s.latency_rate == 200


def test_scales_match_the_issue(bench: ModuleType) -> None:
    assert bench.FULL.dirs * (bench.FULL.leaves + 1) >= 10_000
    assert bench.LARGE.dirs * (bench.LARGE.leaves + 1) == 100_000


# Real `cons` output of ZooKeeper 3.8 (two sessions and the asking connection).
CONS = """\
 /127.0.0.1:43880[1](queued=0,recved=308,sent=308,sid=0x100003c2aac0000,lop=GETC,\
est=1795563396235,to=10000,lcxid=0x133,lzxid=0x131,lresp=3947437,llat=3,minlat=0,\
avglat=122,maxlat=605)
 /127.0.0.1:43890[1](queued=0,recved=4,sent=4,sid=0x100003c2aac0001,lop=PING,\
est=1795563396300,to=10000,lcxid=0xffffffffffffffff,lzxid=0xffffffffffffffff,lresp=1,\
llat=0,minlat=0,avglat=0,maxlat=0)
 /127.0.0.1:43884[0](queued=0,recved=1,sent=0)

"""


def test_cons_gives_last_xid_per_session(bench: ModuleType) -> None:
    assert bench.parse_cons(CONS) == {0x100003C2AAC0000: 0x133, 0x100003C2AAC0001: 0}
    assert bench.parse_cons("") == {}


def test_requests_between_counts_only_other_sessions(bench: ModuleType) -> None:
    before = {1: 100, 2: 50}
    after = {1: 180, 2: 75, 3: 12}  # 3 appeared meanwhile: all its requests count
    assert bench.requests_between(before, after, exclude=set()) == 80 + 25 + 12
    assert bench.requests_between(before, after, exclude={1}) == 25 + 12
    # A session that ended in between is not in `after`: nothing to count.
    assert bench.requests_between(before, {2: 60}, exclude=set()) == 10


def test_targets_report_met_and_missed(bench: ModuleType) -> None:
    lines = bench.target_lines({"steady_vs_multi": 0.62, "latency_p99_ms": 140.0})
    assert len(lines) == 2
    assert lines[0].startswith("met") and "0.62" in lines[0]
    assert lines[1].startswith("MISSED") and "140" in lines[1]
    assert bench.target_lines({}) == []


def test_cpu_table_shows_share_of_one_core(bench: ModuleType) -> None:
    text = bench.cpu_table({"steady": {"wall_s": 2.0, "load": 3.25,
                                       "cpu_s": {"zk-a": 1.0, "bridge-a": 0.5}},
                            "raw_get": {"wall_s": 4.0, "cpu_s": {"zk-a": 4.0}}})
    lines = text.splitlines()
    assert lines[0].split() == ["phase", "wall", "s", "load", "zk-a", "bridge-a"]
    assert lines[1].split() == ["steady", "2.0", "3.2", "50%", "25%"]
    assert lines[2].split() == ["raw_get", "4.0", "100%"]


def test_jit_seconds_sums_the_compiler_threads_only(bench: ModuleType, tmp_path: Path) -> None:
    tick = bench.os.sysconf("SC_CLK_TCK")

    def thread(tid: str, name: str, utime: int, stime: int) -> None:
        d = tmp_path / "4242" / "task" / tid
        d.mkdir(parents=True)
        # pid (comm) state ppid ... : utime and stime are fields 14 and 15.
        fields = ["S", *["0"] * 10, str(utime), str(stime), *["0"] * 30]
        (d / "stat").write_text(f"{tid} ({name}) " + " ".join(fields) + "\n")

    thread("1", "java", 10 * tick, 0)
    thread("2", "C2 CompilerThre", 2 * tick, tick)
    thread("3", "C1 CompilerThre", tick, 0)
    thread("4", "SyncThread:0", 5 * tick, 0)
    assert bench.jit_seconds(4242, proc=tmp_path) == pytest.approx(4.0)
    assert bench.jit_seconds(999, proc=tmp_path) == 0.0  # gone


def test_warm_up_bounds_hold(bench: ModuleType) -> None:
    assert 1 <= bench.WARM_MIN_ROUNDS <= bench.WARM_MAX_ROUNDS
    assert 1 <= bench.WARM_IDLE_ROUNDS <= bench.WARM_MAX_ROUNDS
    # A round's writes fit in the latency paths of either scale (no path twice a round).
    for scale in (bench.FULL, bench.QUICK):
        assert scale.latency_rate * bench.WARM_ROUND_S <= scale.latency_writes
