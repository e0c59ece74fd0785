"""The operator's surface: lag, status, conflicts, resync, metrics, HA, systemd notify, reload."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from kazoo.exceptions import NodeExistsError

from bridge.configload import load_settings
from bridge.errors import FencedError
from bridge.lag import measure
from bridge.zk import Create, ZooKeeper
from tests.harness import procs
from tests.harness.procs import free_port, wait_for
from tests.harness.sdnotify import NotifySocket
from tests.integration.federation import REPO, Federation, Region, scrape
from tests.integration.test_faults import Stream, assert_nothing_lost
from tests.integration.test_ordering import _counters


def lag_json(fed: Federation, name: str) -> list[dict[str, object]]:
    out = fed.cli("lag", "-c", str(fed[name].config_path), "--json")
    assert out.returncode == 0, out.stderr
    rows: list[dict[str, object]] = json.loads(out.stdout)["rows"]
    return rows


def test_lag_grows_while_stopped_and_returns_to_zero(federation: Federation) -> None:
    fed = federation
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    r1.client.create(r1.path("/warm"), b"w")
    fed.wait_converged()
    assert fed.stop("r2") == 0
    for i in range(1000):
        r1.client.create_async(r1.path(f"/n{i:04d}"), b"v")
    wait_for(lambda: r1.client.get_children(r1.path("/")) and
             len(r1.client.get_children(r1.mount)) >= 1001, 30)
    # r1 publishes all of them while r2 is down.
    wait_for(lambda: next(r for r in lag_json(fed, "r2") if r["peer"] == "r1")
             ["events_behind"] >= 1000, 60, message="r1's 1000 events never showed as lag")
    first = next(r for r in lag_json(fed, "r2") if r["peer"] == "r1")
    assert 1000 <= int(first["events_behind"]) <= 1100  # heartbeats are records too
    wait_for(lambda: float(next(r for r in lag_json(fed, "r2") if r["peer"] == "r1")
                           ["seconds_behind"]) > float(first["seconds_behind"]) + 1, 30,
             message="seconds behind did not grow")
    table = fed.cli("lag", "-c", str(r2.config_path))
    assert table.returncode == 0 and "EVENTS BEHIND" in table.stdout
    print(table.stdout)  # the note quotes a real table
    over = fed.cli("lag", "-c", str(r2.config_path), "--max-seconds", "1")
    assert over.returncode == 1, over.stdout + over.stderr
    fed.start("r2")
    # Ready means caught up as `lag` reads it, at once: the stored positions reached
    # the ends read at start, the heartbeats after r1's last batch included, and the
    # status record holds the heartbeats read. Before, those heartbeats were still
    # behind (4, the oldest 3.2-3.6 s old, so `--max-seconds 3` fired on) and no
    # heartbeat age was shown for up to 2 s. Measured in process first, as fast as a
    # monitoring check could ask; a heartbeat published since may be behind, fresh.
    measured = asyncio.run(measure(r2.settings))
    assert all(r.seconds_behind is not None and r.seconds_behind < 2.0
               for r in measured), measured
    rows = lag_json(fed, "r2")
    assert all(r["heartbeat_age"] is not None for r in rows), rows
    cleared = fed.cli("lag", "-c", str(r2.config_path), "--max-seconds", "10")
    assert cleared.returncode == 0, cleared.stdout + cleared.stderr
    fed.wait_converged()
    fed.assert_clean_logs()


def status_json(fed: Federation, name: str) -> dict[str, Any]:
    out = fed.cli("status", "-c", str(fed[name].config_path), "--json")
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def check(fed: Federation, name: str) -> tuple[int, str]:
    """`zkbridge status --check`: its exit status and the verdict's kind."""
    out = fed.cli("status", "-c", str(fed[name].config_path), "--check")
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, out.stdout.split(":", 1)[0]


def test_a_peer_silent_since_before_a_restart_stays_silent_until_heard(
        federation: Federation) -> None:
    """A bridge restarted while a peer is away still reports it: status, lag, metrics, log.

    Before, the restarted bridge knew nothing of the heartbeats an earlier
    process had read: `status` said HEALTHY "caught up with r2", `lag` showed
    no heartbeat age and `--max-seconds` exited 0, the lag metric read 0 and
    the heartbeat-age metric was absent, so the alerts on them cleared.
    """
    fed = federation
    port = free_port()
    for name in ("r1", "r2", "r3"):  # silent after 10 intervals: 5 s
        fed.write_config(name, heartbeat_interval=0.5)
    fed.write_config("r1", metrics={"listen": f"127.0.0.1:{port}"})
    fed.start_all()
    r1 = fed["r1"]
    r1.client.create(r1.path("/x"), b"1")
    fed.wait_converged()
    # r1 away longer than the silence bound while its peers run: back, it reads
    # their heartbeats before it judges them (no false peer_silent at the start).
    assert fed.stop("r1") == 0
    time.sleep(6)
    fed.start("r1")
    time.sleep(2.5)  # the next record or two
    assert not [e for e in fed.events("r1") if e["event"] == "peer_silent"]
    assert status_json(fed, "r1")["verdict"]["healthy"]
    assert check(fed, "r1") == (0, "HEALTHY")
    assert fed.stop("r2") == 0
    wait_for(lambda: any(e["event"] == "peer_silent" and e["peer"] == "r2"
                         for e in fed.events("r1")), 30, message="r1 never logged r2 silent")
    assert fed.stop("r1") == 0
    assert check(fed, "r1") == (1, "DOWN")
    fed.start("r1")
    assert check(fed, "r1") == (1, "SILENT")
    st = status_json(fed, "r1")
    assert st["verdict"]["line"].startswith("SILENT: no heartbeat from r2"), st["verdict"]
    ages = {p["peer"]: p["heartbeat_age_seconds"] for p in st["peers"]}
    assert ages["r2"] is not None and ages["r2"] > 5, ages
    age = next(r["heartbeat_age"] for r in lag_json(fed, "r1") if r["peer"] == "r2")
    assert isinstance(age, float) and age > 5, age
    assert fed.cli("lag", "-c", str(r1.config_path), "--max-seconds", "5").returncode == 1
    metrics = scrape(port)
    assert metrics['zkbridge_heartbeat_age_seconds{peer="r2",subtree="critical"}'] > 5
    assert metrics['zkbridge_lag_seconds{peer="r2",subtree="critical"}'] > 5
    # The restarted process says so in its own log too.
    assert sum(e["event"] == "peer_silent" and e["peer"] == "r2" for e in fed.events("r1")) == 2
    fed.start("r2")
    wait_for(lambda: any(e["event"] == "peer_heard_again" and e["peer"] == "r2"
                         for e in fed.events("r1")), 30, message="r1 never heard r2 again")
    # When it is heard again is a unit test's (test_liveness.py): here, that the
    # restarted process, which never heard r2 before, counts it back.
    wait_for(lambda: status_json(fed, "r1")["verdict"]["healthy"], 10,
             message=lambda: f"r1 still reports {status_json(fed, 'r1')['verdict']}")
    fed.wait_converged()
    fed.assert_clean_logs()


@dataclass(frozen=True)
class Sample:
    asked: float
    answered: float
    line: str  # status's verdict
    healthy: bool
    starting: float | None  # zkbridge_starting, zkbridge_leader (None: not serving yet)
    leader: float | None


class StartWatch:
    """`zkbridge status` and /metrics of a region, asked over and over while it starts."""

    def __init__(self, fed: Federation, name: str, port: int) -> None:
        self.fed, self.name, self.port = fed, name, port
        self.seen: list[Sample] = []
        self.failed: list[str] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.is_set():
            asked = time.time()
            out = self.fed.cli("status", "-c", str(self.fed[self.name].config_path), "--json")
            if out.returncode != 0:
                self.failed.append(out.stderr)
                continue
            verdict = json.loads(out.stdout)["verdict"]
            try:
                metrics = scrape(self.port)
            except OSError:
                metrics = {}
            self.seen.append(Sample(
                asked, time.time(), verdict["line"], verdict["healthy"],
                metrics.get(f'zkbridge_starting{{region="{self.name}"}}'),
                metrics.get(f'zkbridge_leader{{region="{self.name}"}}')))

    def stop(self) -> list[Sample]:
        self._done.set()
        self._thread.join(timeout=30)
        assert not self.failed, self.failed
        return self.seen


def test_a_long_start_up_is_not_taken_for_silence(federation: Federation) -> None:
    """A bridge whose start-up capture outlasts the silence bound (10 heartbeats).

    Before, a bridge sent its first heartbeat only once its start-up capture
    was done, so its peers logged `peer_silent` ("its bridge never ran or
    cannot reach Kafka") while it was capturing; and at `bridge_ready` it
    judged its peers by the heartbeats it had read when its term began, so it
    called them silent for as long as its own start had taken. It also said
    ready with what its peers published during its start-up not applied yet.

    And nobody could tell how the start went: the status record was first
    written once it was over, so `status` said "STALE: leader ... is not
    reporting ... stuck, or cut off from ZooKeeper" all along (or HEALTHY, from
    the record a previous process left), and `zkbridge_leader` read 0 as if no
    bridge ran.
    """
    fed = federation
    port = free_port()
    fed.write_config("r1", peers=["r2"], heartbeat_interval=0.4,  # silent after 4 s
                     metrics={"listen": f"127.0.0.1:{port}"})
    fed.write_config("r2", peers=["r1"], heartbeat_interval=0.4)
    r1, r2 = fed["r1"], fed["r2"]

    def create(region: Region, parent: str, multis: int, each: int) -> None:
        region.client.create(region.path(parent), b"")
        for k in range(multis):
            txn = region.client.transaction()
            for i in range(each):
                txn.create(region.path(f"{parent}/n{k:02d}-{i:03d}"), b"v")
            txn.commit()

    # r1 ran before (a first start would join: its capture would wait for the
    # catch-up, see test_joining.py), alone, for too short a time to call r2
    # silent; the 80,000 znodes were written while it was down.
    fed.write_config("r1", peers=["r2"], heartbeat_interval=5)
    fed.start("r1")
    fed.stop("r1")
    fed.write_config("r1", peers=["r2"], heartbeat_interval=0.4)
    create(r1, "/big", 80, 1000)
    fed.start("r2")
    watching = StartWatch(fed, "r1", port)
    fed.start("r1", wait=False)

    def at(event: str) -> float:  # in this start, the second
        [_, e] = [e for e in fed.events("r1") if e["event"] == event]
        return datetime.fromisoformat(e["timestamp"]).timestamp()

    # While r1 captures its 80,000 znodes, r2's application writes.
    wait_for(lambda: fed.count_events("r1", "scan_done") > 1, 120, message="r1 never scanned")
    create(r2, "/during", 5, 200)
    written = r2.client.exists(r2.path("/during/n04-199")).ctime / 1000
    fed.wait_ready("r1", timeout=300)
    seen = watching.stop()
    # What the test is about: r1's start took longer than the silence bound,
    # and r2's writes came well before its end.
    assert at("bridge_ready") - at("epoch_taken") > 4, "the start-up was too quick to tell"
    # `status` and /metrics said all along that r1 was starting, and how far it was.
    during = [s for s in seen
              if s.asked > at("epoch_taken") + 1 and s.answered < at("bridge_ready")]
    for s in during:
        assert s.line.startswith("STARTING: leader ") and not s.healthy, s
    # The gauge drops when the start ends, which is a ZooKeeper write (the
    # ready record) before `bridge_ready` is logged: a sample whose status was
    # read before that write may scrape 0. It never rises again, and it is 0
    # only once the bridge leads.
    gauge = [s.starting for s in during]
    assert gauge == sorted(gauge, reverse=True) and set(gauge) <= {0, 1}, during
    assert gauge.count(1) >= 3, during
    assert all(s.leader == 1 for s in during if s.starting == 0), during
    # Not a leader while it scans and captures, one while it catches up.
    assert any(s.leader == 0 for s in during), during
    assert any(re.search(r"capturing critical: [\d,]+ of 80,00\d changes", s.line)
               for s in during), during
    after = scrape(port)
    assert after['zkbridge_starting{region="r1"}'] == 0
    assert after['zkbridge_leader{region="r1"}'] == 1
    assert at("bridge_ready") - written > 3, "r2 wrote too late to tell"
    # Ready means caught up with them: applied before r1 said ready.
    applied = r1.client.exists(r1.path("/during/n04-199"))
    assert applied is not None and applied.ctime / 1000 <= at("bridge_ready")
    fed.wait_converged(["r1", "r2"], timeout=300)
    time.sleep(1)
    for name in ("r1", "r2"):
        assert not [e for e in fed.events(name) if e["event"] == "peer_silent"], name
    assert status_json(fed, "r1")["verdict"]["healthy"]
    assert status_json(fed, "r2")["verdict"]["healthy"]
    fed.assert_clean_logs()


def test_a_peer_no_region_answers_for_is_reported_silent(federation: Federation) -> None:
    """A name in `peers` that no bridge publishes as (a typo, a region never deployed).

    Before, the bridge waited on its empty topic for ever and said HEALTHY "caught
    up with r9", with no heartbeat age and no heartbeat-age series to alert on.
    """
    fed = federation
    port = free_port()
    fed.write_config("r1", peers=["r2", "r9"], heartbeat_interval=0.5,
                     metrics={"listen": f"127.0.0.1:{port}"})
    fed.start("r1")
    fed.start("r2")
    r1 = fed["r1"]
    r1.client.create(r1.path("/x"), b"1")
    fed.wait_converged(["r1", "r2"])
    wait_for(lambda: any(e["event"] == "peer_silent" and e["peer"] == "r9"
                         for e in fed.events("r1")), 30, message="r1 never logged r9 silent")
    # Only r9's: r2 counts as silent too if its bridge took longer to start than
    # ten heartbeats of r1's, which a loaded machine sees.
    [said] = [e for e in fed.events("r1") if e["event"] == "peer_silent" and e["peer"] == "r9"]
    # Logged once past 5 s (10 heartbeats of 0.5 s), rounded to 0.1 s: 5.0 at the least.
    assert said["never_heard_s"] >= 5 and "names a region that does not exist" in said["hint"]

    def verdict() -> str:
        line: str = status_json(fed, "r1")["verdict"]["line"]
        return line

    wait_for(lambda: verdict().startswith("SILENT: no heartbeat from r9 (critical) since this "
                                          "bridge started"), 10, message=verdict)
    metrics = scrape(port)
    assert metrics['zkbridge_heartbeat_age_seconds{peer="r9",subtree="critical"}'] > 5
    assert metrics['zkbridge_lag_seconds{peer="r9",subtree="critical"}'] > 5
    # `lag`, the cron check, counts it the same way.
    age = next(r["heartbeat_age"] for r in lag_json(fed, "r1") if r["peer"] == "r9")
    assert isinstance(age, float) and age > 5, age
    assert fed.cli("lag", "-c", str(r1.config_path), "--max-seconds", "5").returncode == 1
    # The peer that runs is not called silent.
    assert "r2" not in verdict()
    # Nor are tombstones collected while r9 never reports: status says whom it waits on.
    human = fed.cli("status", "-c", str(r1.config_path)).stdout
    assert "stable prefix age: r1 unknown (no report from r9 yet)" in human, human
    fed.assert_clean_logs()


class Reader:
    """Collects a child's output on a thread, so a test can wait on it with a deadline."""

    def __init__(self, read: Callable[[], bytes]) -> None:
        self.data = bytearray()
        self._read = read
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                chunk = self._read()
            except OSError:  # the pty's other side closed
                return
            if not chunk:
                return
            self.data += chunk

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")

    def join(self) -> None:
        self._thread.join(10)


def _spawn_cli(args: list[str], *, tty: bool) -> tuple[subprocess.Popen[bytes], Reader]:
    """``zkbridge ARGS`` with its output on a pipe, or on a 150x30 pseudo-terminal."""
    argv = [sys.executable, "-m", "bridge", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm-256color"}
    if not tty:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=REPO, env=env)
        assert proc.stdout is not None
        return proc, Reader(proc.stdout.read1)  # type: ignore[attr-defined]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 150, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=env)
    os.close(slave)
    return proc, Reader(lambda: os.read(master, 65536))


def _watch(fed: Federation, name: str, *extra: str, tty: bool, every: str = "0.5"
           ) -> tuple[subprocess.Popen[bytes], Reader]:
    return _spawn_cli(["lag", "-c", str(fed[name].config_path), "--watch", every, *extra],
                      tty=tty)


def _interrupt(proc: subprocess.Popen[bytes], reader: Reader) -> int:
    """Ctrl-C as a terminal sends it; the exit status."""
    proc.send_signal(signal.SIGINT)
    try:
        # Closing its Kafka and ZooKeeper clients took over 20 s once under a
        # load average of 10-17 (a CI run sharing the machine with long runs).
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            procs.stop(proc)
    reader.join()
    return rc


def test_lag_watch_on_a_terminal_and_in_a_pipe(federation: Federation) -> None:
    fed = federation
    fed.start_all()
    r1 = fed["r1"]
    assert fed.stop("r2") == 0
    # Enough that r2's catch-up spans several samples (1,500 once took less
    # than one 0.5 s sample, and 6,000 once did on a CI run: the watch never
    # saw it catching up). Hence also samples every 0.2 s while it catches up.
    backlog = 10_000
    for i in range(backlog):
        r1.client.create_async(r1.path(f"/w{i:05d}"), b"v")
    wait_for(lambda: next(r for r in lag_json(fed, "r2") if r["peer"] == "r1")
             ["events_behind"] >= backlog, 60, message="r1's events never showed as lag")
    started: list[subprocess.Popen[bytes]] = []
    try:
        # Not a terminal: one stamped table per interval, whole history kept.
        proc, out = _watch(fed, "r2", tty=False)
        started.append(proc)
        wait_for(lambda: out.text.count("\n# ") >= 5, 30, message=lambda: out.text)
        assert _interrupt(proc, out) == 0, out.text
        tables = [t for t in out.text.split("\n\n") if t.strip()]
        assert len(tables) >= 5 and "Traceback" not in out.text
        assert all(t.startswith("# ") and "TREND" in t for t in tables), out.text
        r1_rows = [line for t in tables for line in t.splitlines() if " r1 " in line]
        assert any("falling behind" in line for line in r1_rows), out.text
        assert not any("catching up" in line for line in r1_rows), out.text
        print(tables[-1])  # the README quotes a real one
        # ...or one JSON document per line.
        proc, out = _watch(fed, "r2", "--json", tty=False)
        started.append(proc)
        wait_for(lambda: out.text.count("\n") >= 2, 30, message=lambda: out.text)
        assert _interrupt(proc, out) == 0, out.text
        docs = [json.loads(line) for line in out.text.splitlines()]
        assert {r["peer"] for r in docs[-1]["rows"]} == {"r1", "r3"}
        assert all(r["trend"] for d in docs for r in d["rows"])
        # A terminal: redrawn in place while r2 catches up.
        proc, screen = _watch(fed, "r2", "--max-seconds", "5", tty=True, every="0.2")
        started.append(proc)
        wait_for(lambda: "falling behind" in screen.text, 30, message=lambda: screen.text)
        fed.start("r2")
        wait_for(lambda: "keeping up with every peer" in screen.text, 60,
                 message=lambda: screen.text[-3000:])
        assert _interrupt(proc, screen) == 0, screen.text[-3000:]
        raw = screen.text
        assert "catching up (" in raw, "the catch-up was never shown with its rate"
        assert "above 5s: r1" in raw
        assert "\x1b[1A" in raw and "\x1b[2K" in raw, "not redrawn in place"
        assert raw.count("zkbridge lag  r2") >= 5
        assert raw.rstrip().endswith("\x1b[?25h") or "\x1b[?25h" in raw[-200:], \
            "cursor not restored on Ctrl-C"
        assert "Traceback" not in raw and "KeyboardInterrupt" not in raw
        print(raw[raw.rfind("zkbridge lag  r2"):])
    finally:
        for p in started:
            if p.poll() is None:
                procs.stop(p)
    fed.wait_converged()
    fed.assert_clean_logs()


def _no_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def _finish(proc: subprocess.Popen[bytes], reader: Reader, timeout: float = 120) -> int:
    try:
        rc = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            procs.stop(proc)
    reader.join()
    return rc


def test_verify_and_resync_show_progress_only_on_a_terminal(federation: Federation) -> None:
    fed = federation
    fed.start_all()
    r1 = fed["r1"]
    for i in range(1500):
        r1.client.create_async(r1.path(f"/p{i:04d}"), b"v")
    fed.wait_converged(timeout=120)
    configs = [a for r in ("r1", "r2", "r3") for a in ("-c", str(fed[r].config_path))]
    # A terminal: bars with counts, rate and time left, then the result.
    proc, screen = _spawn_cli(["verify", "--meta", *configs], tty=True)
    assert _finish(proc, screen) == 0, screen.text
    text = _no_ansi(screen.text)
    assert "identical: r1, r2, r3" in text
    for region in ("r1", "r2", "r3"):
        assert f"{region} critical" in text and f"{region} critical metadata" in text
    # The first region's size is the others' estimate, so theirs end at N/N.
    assert re.search(r"r2 critical\s.*\s1500/1500\s", text), text[-3000:]
    assert "znodes/s" in text and "eta" in text
    # Not a terminal: just the result.
    out = fed.cli("verify", "--meta", *configs)
    assert out.returncode == 0 and out.stdout == "identical: r1, r2, r3\n" and not out.stderr
    proc, screen = _spawn_cli(["resync", "-c", str(r1.config_path)], tty=True)
    assert _finish(proc, screen) == 0, screen.text
    text = _no_ansi(screen.text)
    assert re.search(r"re-announcing on \S+\s.*\s1500/1500\s", text), text[-3000:]
    assert "re-announced 1500 records from r1" in text
    out = fed.cli("resync", "-c", str(r1.config_path), "--json")
    assert out.returncode == 0 and not out.stderr, out.stderr
    assert json.loads(out.stdout) == {"region": "r1", "published": 1500, "uncaptured": 0}
    fed.wait_converged()
    fed.assert_clean_logs()


def test_lag_exits_2_when_servers_are_unreachable(federation: Federation, tmp_path: Path
                                                  ) -> None:
    fed = federation
    doc = fed.config_doc("r1")
    doc["zookeeper"] = {"hosts": f"127.0.0.1:{free_port()}", "connect_timeout": 2}
    cfg = tmp_path / "unreachable.yaml"
    cfg.write_text(json.dumps(doc))
    out = fed.cli("lag", "-c", str(cfg))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "cannot reach" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_metrics_move_and_match_the_cli(federation: Federation) -> None:
    fed = federation
    port = free_port()
    fed.write_config("r2", metrics={"listen": f"127.0.0.1:{port}"})
    fed.start_all()
    r1 = fed["r1"]
    before = scrape(port)
    for i in range(200):
        r1.client.create(r1.path(f"/m{i}"), b"x")
    fed["r2"].client.create(fed["r2"].path("/from-r2"), b"y")
    fed.wait_converged()
    after = scrape(port)
    key = 'zkbridge_applied_total{outcome="applied",subtree="critical"}'
    assert after[key] >= before.get(key, 0) + 200
    assert after['zkbridge_published_total{subtree="critical"}'] >= 1
    assert after['zkbridge_leader{region="r2"}'] == 1
    assert 'zkbridge_scan_seconds{subtree="critical"}' in after
    # The gauges agree with `zkbridge lag` once caught up. `lag` counts from
    # the stored positions: a heartbeat fetched moments before it asked shows
    # as one record behind until its position is stored (CI saw it once).
    wait_for(lambda: scrape(port)['zkbridge_lag_events{peer="r1",subtree="critical"}'] == 0, 30)
    cli: dict[object, dict[str, object]] = {}

    def caught_up() -> bool:
        cli.update({r["peer"]: r for r in lag_json(fed, "r2")})
        return cli["r1"]["events_behind"] == 0

    wait_for(caught_up, 30, message=lambda: f"lag never showed r2 caught up with r1: {cli}")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        assert resp.status == 200
        assert json.loads(resp.read())["role"] == "leader"
    print("\n".join(f"{k} {v:g}" for k, v in sorted(after.items()) if "critical" in k))
    fed.assert_clean_logs()


def test_status_and_conflicts_commands(federation: Federation) -> None:
    fed = federation
    fed.start_all()
    r1, r2 = fed["r1"], fed["r2"]
    barrier = threading.Barrier(2)

    failed: list[BaseException] = []

    def write(r: object, value: bytes) -> None:
        barrier.wait()
        try:
            for i in range(30):
                path = r.path(f"/c{i}")  # type: ignore[attr-defined]
                try:
                    r.client.create(path, value)  # type: ignore[attr-defined]
                except NodeExistsError:
                    # The other region's create was replicated here first: still
                    # a concurrent write of the same path, as a set.
                    r.client.set(path, value)  # type: ignore[attr-defined]
        except BaseException as exc:  # a thread's error would otherwise only be a warning
            failed.append(exc)

    threads = [threading.Thread(target=write, args=(r, r.name.encode())) for r in (r1, r2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failed, failed
    fed.wait_converged()
    out = fed.cli("conflicts", "-c", str(r1.config_path), "--json", "--limit", "100")
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found and all(c["winner"] in ("local", "remote") and c["rule"] == "lww"
                         for c in found)
    assert {c["path"] for c in found} <= {f"/c{i}" for i in range(30)}
    text = fed.cli("conflicts", "-c", str(r1.config_path))
    assert "winner" in text.stdout
    seen: list[dict[str, Any]] = []

    def settled() -> bool:
        # A heartbeat fetched moments before a status write shows as one record
        # behind until its position is stored (at most every 0.2 s): wait it out.
        seen.append(json.loads(fed.cli("status", "-c", str(r1.config_path), "--json").stdout))
        return seen[-1]["health"] == "ok" and not any(
            p["events_behind"] for p in seen[-1]["peers"])

    wait_for(settled, 30, message=lambda: f"status never showed r1 caught up: {seen[-1:]}")
    status = seen[-1]
    assert status["leader"] and status["epoch"] >= 1
    assert status["bridges"][0]["role"] == "leader"
    human = fed.cli("status", "-c", str(r1.config_path))
    assert "leader" in human.stdout and "from r2" in human.stdout
    # The verdict comes first: healthy while converged...
    assert human.stdout.splitlines()[0].startswith("HEALTHY: "), human.stdout
    assert status["verdict"]["healthy"] is True
    assert {p["peer"] for p in status["peers"]} == {"r2", "r3"}
    assert all(p["events_behind"] == 0 for p in status["peers"])
    print(human.stdout)
    fed.assert_clean_logs()
    # ...and with the bridge stopped, what is wrong and where to look.
    fed.stop("r1")
    down = fed.cli("status", "-c", str(r1.config_path))
    assert down.returncode == 0, down.stderr
    first = down.stdout.splitlines()[0]
    assert first.startswith("DOWN: no bridge is leading in r1"), down.stdout
    assert "systemctl status zkbridge@r1" in first


def _delete_topic(bootstrap: str, topic: str) -> None:
    async def go() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([topic])
        finally:
            await admin.close()

    asyncio.run(go())


def test_resync_restores_convergence_after_topic_loss(federation: Federation) -> None:
    fed = federation
    fed.start_all()
    r1 = fed["r1"]
    fed.stop("r2")
    for i in range(20):
        r1.client.create(r1.path(f"/lost{i}"), b"v")
    wait_for(lambda: len(fed.tree("r3")) == 20, 30)
    # r1's topic is lost before r2 read it: r2 can never see those writes...
    fed.stop("r1")
    _delete_topic(fed.broker.bootstrap, f"{fed.prefix}.{fed.subtree}.r1")
    fed.start("r1")
    fed.start("r2")
    # ...until r1 re-announces its state: by itself, since its stored publish
    # position is above the new topic's end...
    fed.wait_converged()
    assert fed.count_events("r1", "own_topic_lost_records") == 1
    # ...and by hand, twice: receivers must not mind.
    for _ in range(2):
        out = fed.cli("resync", "-c", str(r1.config_path))
        assert out.returncode == 0, out.stderr
        assert "re-announced" in out.stdout
    fed.wait_converged()
    fed.assert_clean_logs(allowed={"own_topic_lost_records", "topic_lost_records"})


def _spawn_second(fed: Federation, name: str, tag: str) -> tuple[object, Path]:
    r = fed[name]
    log = fed.tmp / f"bridge-{name}-{tag}.log"
    proc = procs.spawn([sys.executable, "-m", "bridge", "run", "-c", str(r.config_path)], log,
                       env={"PYTHONPATH": str(REPO)}, cwd=REPO)
    return proc, log


def test_standby_takes_over_when_leader_is_killed(federation: Federation) -> None:
    fed = federation
    fed.start_all()
    standby, log = _spawn_second(fed, "r1", "standby")
    try:
        wait_for(lambda: '"standby"' in log.read_text(), 30)
        members = f"{fed.state_path}/members"
        r1 = fed["r1"]
        wait_for(lambda: len(r1.client.get_children(members)) == 2, 30)
        status = json.loads(fed.cli("status", "-c", str(r1.config_path), "--json").stdout)
        assert sorted(b["role"] for b in status["bridges"]) == ["leader", "standby"]
        with Stream(r1.client, r1.path("/ha"), "ha", keys=30) as stream:
            wait_for(lambda: stream.count > 100, 30)
            killed_at = time.monotonic()
            fed.kill("r1")  # the leader
            wait_for(lambda: '"bridge_ready"' in log.read_text(), 30,
                     message="standby never took over")
            took = time.monotonic() - killed_at
            wait_for(lambda: stream.count > 400, 30)
        # Session timeout is 4 s; election and catch-up come on top.
        assert took < 4 + 8, took
        print(f"standby took over {took:.1f}s after the leader was killed")
        fed.wait_converged()
        assert_nothing_lost(fed, [("r1", stream)])
    finally:
        procs.stop(standby)  # type: ignore[arg-type]
    assert "Traceback" not in log.read_text()


def test_deposed_leader_cannot_write(federation: Federation) -> None:
    fed = federation
    settings = load_settings(fed.write_config("r1"))

    async def go() -> None:
        old, new = ZooKeeper(settings.zookeeper), ZooKeeper(settings.zookeeper)
        await old.start()
        await new.start()
        try:
            epoch = f"{fed.state_path}/epoch"
            await old.take_epoch(epoch, b"old")
            await old.multi([Create(f"{fed.state_path}/by-old-1")])
            await new.take_epoch(epoch, b"new")  # a new term begins
            with pytest.raises(FencedError):
                await old.multi([Create(f"{fed.state_path}/by-old-2")])
            await new.multi([Create(f"{fed.state_path}/by-new")])
            assert await new.exists(f"{fed.state_path}/by-old-2") is None
        finally:
            await old.stop()
            await new.stop()

    fed["r1"].client.ensure_path(fed.state_path)
    asyncio.run(go())


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    try:
        yield sock
    finally:
        sock.close()


def test_sd_notify_ready_watchdog_stopping_and_reload(
    federation: Federation, notify_socket: NotifySocket
) -> None:
    fed = federation
    path, received, drain = notify_socket.path, notify_socket.received, notify_socket.drain

    fed.write_exclude("r1", ["/private"])
    fed.start("r2")
    r1 = fed.start("r1", env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}, wait=False)
    wait_for(lambda: any("READY=1" in m for m in drain()), 60, message="no READY=1")
    assert fed.count_events("r1", "bridge_ready") == 1  # READY only once caught up
    # `systemctl status` showed what the start was doing before it was ready, and
    # systemd was asked to wait on while it moved (TimeoutStartSec is 90 s).
    ready = next(i for i, m in enumerate(received) if "READY=1" in m)
    starting = [m for m in received[:ready] if "STATUS=starting: " in m]
    assert starting and "EXTEND_TIMEOUT_USEC=30000000\n" in starting[0], received
    assert "STATUS=leader in region r1, caught up" in received[ready], received
    assert not any("EXTEND_TIMEOUT_USEC" in m for m in received[ready:]), received
    wait_for(lambda: sum("WATCHDOG=1" in m for m in drain()) >= 3, 10, message="no WATCHDOG=1")
    # Excluded: not replicated.
    r1.client.create(r1.path("/private/x"), b"secret", makepath=True)
    r1.client.create(r1.path("/public"), b"p")
    r2 = fed["r2"]
    wait_for(lambda: r2.client.exists(r2.path("/public")), 30)
    assert not r2.client.exists(r2.path("/private/x"))
    # Reload without restart: the exclude goes, the subtree is rescanned.
    pid = r1.proc.pid  # type: ignore[union-attr]
    fed.write_exclude("r1")
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: r2.client.exists(r2.path("/private/x")), 30,
             message="reloaded exclude list not applied")
    reloaded = [e for e in fed.events("r1") if e.get("event") == "reloaded"]
    assert reloaded and any("exclude" in k for k in reloaded[0]["applied"])
    assert reloaded[0]["needs_restart"] == []
    assert any("RELOADING=1" in m for m in drain())
    assert r1.proc is not None and r1.proc.poll() is None and r1.proc.pid == pid
    assert fed.stop("r1") == 0
    wait_for(lambda: any("STOPPING=1" in m for m in drain()), 10, message="no STOPPING=1")
    fed.assert_clean_logs()


@pytest.mark.parametrize("how", ["reload", "reload-killed", "restart"])
def test_paths_a_receiver_no_longer_excludes_arrive_from_the_peers_topics(
    federation: Federation, how: str,
) -> None:
    # r2 passed over r1's events for /tmp while it excluded it; a reload that
    # includes /tmp again reads r1's topic again from its start (before, r2
    # lacked r1's /tmp until r1 happened to write each znode again). So does a
    # restart with the new config: the exclude list the topics were read under
    # is stored (before, a restart never read them again). Killed once the
    # rewound positions are stored, r2 still applies only /tmp's events up to
    # where it had been: the filter is stored with them (before, it was in
    # memory only, and the restart applied all of r1's events again).
    fed = federation
    r1, r2 = fed["r1"], fed["r2"]
    fed.write_exclude("r2", ["/tmp"])
    fed.start("r1")
    fed.start("r3")
    crash = {"ZKBRIDGE_FAILPOINTS": "reread_stored=crash@1"} if how == "reload-killed" else None
    fed.start("r2", env=crash)
    r1.client.create(r1.path("/tmp/a"), b"a", makepath=True)
    r1.client.create(r1.path("/tmp/b"), b"b")
    r1.client.set(r1.path("/tmp/a"), b"a2")
    for i in range(30):
        r1.client.create(r1.path(f"/kept{i}"), b"k")
    wait_for(lambda: r2.client.exists(r2.path("/kept29")), 30)
    assert not r2.client.exists(r2.path("/tmp"))
    skipped = f"applied:{fed.subtree}:skipped"
    time.sleep(2.5)  # one status interval: the counters as they stand
    before = _counters(fed, "r2").get(skipped, 0)
    fed.exclude_by("r2", how)
    if how != "reload":
        before = 0  # the counters start again with the process
    wait_for(lambda: r2.client.exists(r2.path("/tmp/b")), 30,
             message="r1's znodes under a path r2 no longer excludes never arrived")
    fed.wait_converged()
    assert r2.client.get(r2.path("/tmp/a"))[0] == b"a2"
    # Only /tmp's events were applied again: r1's 30 others were not even tried.
    if how != "reload-killed":  # the killed process had counted it
        wait_for(lambda: _counters(fed, "r2").get(f"topic_rereads:{fed.subtree}:r1"), 10)
    time.sleep(2.5)
    assert _counters(fed, "r2").get(skipped, 0) - before < 30, _counters(fed, "r2")
    again = [e for e in fed.events("r2") if e.get("event") == "topic_read_again"]
    assert {e["topic"] for e in again} == {f"{fed.prefix}.{fed.subtree}.{r}" for r in ("r1", "r3")}
    assert all(e["paths"] == ["/tmp"] for e in again)
    fed.assert_clean_logs()
