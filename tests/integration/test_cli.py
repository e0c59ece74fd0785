"""The command line as an operator meets it: clear messages, exit codes, no tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.federation import REPO

GOOD = """
region: r1
zookeeper: {hosts: "127.0.0.1:2181"}
kafka: {bootstrap_servers: "127.0.0.1:9092"}
peers: [r2]
subtrees: [{name: critical, path: /critical}]
"""


def zkbridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace("/critical}", "critical}"), "subtrees[0].path: must be absolute"),
        (GOOD.replace("region: r1", "region: R1!"), "region:"),
        (GOOD.replace("peers: [r2]", "peers: [r1]"), "peers"),
        (GOOD + "surprise: 1\n", "surprise: unknown key"),
        (GOOD.replace('kafka: {bootstrap_servers: "127.0.0.1:9092"}', "kafka: {}"),
         "kafka.bootstrap_servers: required"),
        (GOOD + "state_path: /critical/state\n", "state_path"),
        ("region: [unclosed\n", "invalid YAML"),
        ("- just\n- a list\n", "mapping"),
    ],
)
def test_bad_config_exits_1_with_message(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    for command in ("check-config", "run"):
        out = zkbridge(command, "-c", str(cfg))
        assert out.returncode == 1, (command, out.stdout, out.stderr)
        assert message in out.stderr, (command, out.stderr)
        assert "Traceback" not in out.stderr + out.stdout


def test_missing_config_file(tmp_path: Path) -> None:
    out = zkbridge("check-config", "-c", str(tmp_path / "nope.yaml"))
    assert out.returncode == 1
    assert "cannot read" in out.stderr and "Traceback" not in out.stderr


def test_good_config_exits_0_and_describes(tmp_path: Path) -> None:
    cfg = tmp_path / "good.yaml"
    cfg.write_text(GOOD)
    out = zkbridge("check-config", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "zkbridge.critical.r1" in out.stdout


def test_usage_errors_exit_2() -> None:
    assert zkbridge().returncode == 2
    assert zkbridge("verify", "-c", "only-one.yaml").returncode != 0


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_lag_watch_needs_a_positive_interval(tmp_path: Path, value: str) -> None:
    cfg = tmp_path / "r1.yaml"
    cfg.write_text(GOOD)
    out = zkbridge("lag", "-c", str(cfg), "--watch", value)
    assert out.returncode == 2
    assert "argument --watch:" in out.stderr and "Traceback" not in out.stderr
