"""The command line as an operator meets it: clear messages, exit codes, no tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ZkServers
from tests.harness.broker import Broker
from tests.harness.procs import free_port
from tests.harness.zookeeper import ZooKeeperServer
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
    missing = tmp_path / "nope.yaml"
    for command in ("check-config", "run"):
        out = zkbridge(command, "-c", str(missing))
        assert out.returncode == 1
        # One line, the path named once (before: "PATH: PATH: cannot read: ...").
        assert out.stderr == f"{missing}: cannot read: No such file or directory\n", out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("region: r1\nregion: r2\n" + GOOD.split("\n", 2)[2])
    out = zkbridge("check-config", "-c", str(bad))
    assert out.returncode == 1
    assert out.stderr.startswith(f"{bad}: duplicate key region at line 2"), out.stderr
    assert f"{bad}: {bad}" not in out.stderr, out.stderr


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


def test_check_config_connect_says_whether_the_servers_take_it(
    tmp_path: Path, zk_servers: ZkServers, broker: Broker,
) -> None:
    cfg = tmp_path / "r1.yaml"
    hosts = zk_servers.regions[0].hosts
    cfg.write_text(GOOD.replace("127.0.0.1:2181", hosts)
                   .replace("127.0.0.1:9092", broker.bootstrap)
                   + f"state_path: /check-{tmp_path.name}\n")
    out = zkbridge("check-config", "--connect", "-c", str(cfg))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"zookeeper: OK: {hosts}: connected (plain), session 0x" in out.stdout, out.stdout
    assert "not made yet (the bridge's first start makes it)" in out.stdout, out.stdout
    assert f"kafka: OK: {broker.bootstrap}: connected (PLAINTEXT), reachable" in out.stdout
    # Nobody listening on either side: both named, exit 1, no traceback.
    closed = [free_port(), free_port()]
    cfg.write_text(GOOD.replace("127.0.0.1:2181", f"127.0.0.1:{closed[0]}")
                   .replace('"}', '", connect_timeout: 2}', 1)
                   .replace("127.0.0.1:9092", f"127.0.0.1:{closed[1]}"))
    out = zkbridge("check-config", "--connect", "-c", str(cfg))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "zookeeper: FAILED: cannot connect to ZooKeeper" in out.stderr, out.stderr
    assert f"kafka: FAILED: connect: 127.0.0.1:{closed[1]}" in out.stderr, out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_a_zookeeper_older_than_3_6_is_refused_with_what_to_do(
    tmp_path: Path, broker: Broker,
) -> None:
    """ZooKeeper 3.5 lacks multiRead and addWatch. Before, `run` fell back to per-znode
    watches, retried its scan against the server's dropped connections and died of
    kazoo's "xids do not match" with tracebacks; `check-config --connect` said OK."""
    old = ZooKeeperServer("zk35", release="3.5")
    try:
        old.start()
        assert "Zookeeper version: 3.5." in old.four_letter("srvr")
        cfg = tmp_path / "r1.yaml"
        cfg.write_text(GOOD.replace("127.0.0.1:2181", old.hosts)
                       .replace("127.0.0.1:9092", broker.bootstrap))
        needs = f"ZooKeeper at {old.hosts} does not implement multiRead ({old.hosts} runs 3.5."
        upgrade = "zkbridge needs ZooKeeper 3.6 or later (multiRead and addWatch); upgrade"

        out = zkbridge("run", "-c", str(cfg))
        text = out.stdout + out.stderr
        assert out.returncode == 1, text
        assert '"event": "bridge_stopped"' in text and needs in text and upgrade in text, text
        assert '"error_type": "UnsupportedServerError"' in text, text
        assert "Traceback" not in text and "xids do not match" not in text, text
        assert "persistent_watch_unsupported" not in text, text  # refused before any watch

        out = zkbridge("check-config", "--connect", "-c", str(cfg))
        assert out.returncode == 1, out.stdout + out.stderr
        assert f"zookeeper: FAILED: {needs}" in out.stderr and upgrade in out.stderr, out.stderr
        assert "kafka: OK:" in out.stdout, out.stdout

        for command in ("status", "lag", "conflicts"):
            out = zkbridge(command, "-c", str(cfg))
            assert out.returncode == 2, (command, out.stdout, out.stderr)
            assert out.stderr.startswith(f"zkbridge {command}: {needs}"), (command, out.stderr)
            assert "cannot reach" not in out.stderr and "Traceback" not in out.stderr
    finally:
        old.close()
