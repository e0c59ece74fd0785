"""Failpoints: each rule acts at the hit it names, and only there.

The process-ending rules run in a child process: a crash or a stop here
would end or freeze the test run itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge import failpoints
from bridge.errors import ZooKeeperError
from tests.harness import procs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_rules_after() -> Iterator[None]:
    yield
    failpoints.configure(None)


def test_unset_failpoints_do_nothing() -> None:
    failpoints.configure(None)
    for _ in range(3):
        failpoints.hit(failpoints.EPOCH_TAKEN)


def test_an_unknown_rule_is_refused_with_its_name() -> None:
    with pytest.raises(ValueError, match="epoch_taken: unknown rule 'explode@1'"):
        failpoints.configure("epoch_taken=explode@1")


def test_lose_raises_a_lost_answer_at_the_named_hit_only() -> None:
    failpoints.configure("epoch_taken=lose@2, acl_read=lose@1")
    failpoints.hit(failpoints.EPOCH_TAKEN)
    with pytest.raises(ZooKeeperError, match="answer lost") as lost:
        failpoints.hit(failpoints.EPOCH_TAKEN)
    assert lost.value.retriable  # handled like any lost answer
    failpoints.hit(failpoints.EPOCH_TAKEN)
    with pytest.raises(ZooKeeperError):
        failpoints.hit(failpoints.ACL_READ)


def _child(rule: str, hits: int) -> subprocess.Popen[str]:
    """A process that hits ``epoch_taken`` ``hits`` times, saying so after each."""
    code = ("import sys\nfrom bridge import failpoints\n"
            f"for i in range({hits}):\n"
            "    failpoints.hit(failpoints.EPOCH_TAKEN)\n"
            "    print(f'passed {i + 1}', flush=True)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "ZKBRIDGE_FAILPOINTS": f"epoch_taken={rule}"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, text=True)


def test_crash_kills_the_process_at_the_named_hit() -> None:
    child = _child("crash@2", 3)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert out.split("\n") == ["passed 1", ""]


def test_stop_pauses_the_process_at_the_named_hit_until_continued() -> None:
    child = _child("stop@2", 3)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "passed 1\n"
        procs.wait_for(lambda: procs.stopped(child.pid), 30, interval=0.02,
                       message="stop@2 never stopped the process")
        time.sleep(0.3)
        assert procs.stopped(child.pid)  # still stopped: nothing resumes it but SIGCONT
        child.send_signal(signal.SIGCONT)
        out, _ = child.communicate(timeout=30)
        assert out.split("\n") == ["passed 2", "passed 3", ""]
        assert child.returncode == 0
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGCONT)
            child.kill()
            child.wait()
