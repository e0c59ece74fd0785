"""What a bridge process pays before its first request: no rich, no cycle collection."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

from bridge import daemon

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "schemas" / "examples" / "region-us-east.yaml"


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout.strip()


def test_the_daemon_imports_no_rich() -> None:
    # rich is for the CLI's tables and bars; structlog would import it too.
    loaded = _python("import sys, bridge.cli, bridge.daemon; "
                     "print(sorted(m for m in sys.modules if m.split('.')[0] == 'rich'))")
    assert loaded == "[]"


def test_rich_still_works_after_the_bridge_is_imported() -> None:
    assert _python("import bridge.daemon, rich.console; print(rich.console.Console)") != ""


def test_a_one_shot_command_turns_the_collector_back_on() -> None:
    out = _python("import gc, sys; from bridge.__main__ import main; "
                  f"sys.argv = ['zkbridge', 'check-config', '-c', {str(EXAMPLE)!r}]; "
                  "rc = main(); print(rc, gc.isenabled())")
    assert out.splitlines()[-1] == "0 True"


def test_the_daemon_turns_the_collector_back_on_with_the_imports_frozen() -> None:
    threshold = gc.get_threshold()
    gc.disable()
    try:
        daemon._tune_gc()
        assert gc.isenabled()
        assert gc.get_threshold()[0] == daemon.GC_THRESHOLD
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        gc.enable()
