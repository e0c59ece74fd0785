"""zkbridge speed, measured: the raw ceilings and the bridge's end-to-end rates, in one run.

Started by ``scripts/bench`` (which installs what is missing first). Everything
runs on loopback in a temporary directory and is stopped on exit, failure or
Ctrl-C. Speed is measured here and not in the tests because numbers on a
shared 2-core machine are only meaningful next to ceilings measured on the same
servers in the same run: every bridge rate is printed with its ratio to the
relevant raw rate.

1. Raw rates: kazoo against one standalone ZooKeeper (sync create, pipelined
   set_data, pipelined 2-op multi, pipelined get) and aiokafka against the
   broker (produce and consume of 264-byte records, acks=all, idempotence as
   the bridge uses it there: on for Apache Kafka, off for tansu).
2. zk-shell ``mirror`` (from its own venv in the ignored ``.cache/``,
   created on first use) copying the pre-populated tree from one of the
   bench's servers to the other: the peer copier the catch-up is compared to.
   Then the catch-up's floor: the ZooKeeper work the design asks of both
   servers for that tree (the origin's reads, getACLs and metadata multis, the
   receiver's znode and metadata creates), done by a bare batched client,
   each side alone and both at once.
3. zkbridge with two regions (two ZooKeeper servers, one broker, two
   ``python -m bridge run``): initial scan and catch-up of the same tree,
   steady-state throughput (twice), latency at a fixed write rate (after a
   warm-up of the same load until the JVMs' JIT compilers are idle), a
   conflict storm, the bridge's memory after the scan, and at the end the
   catch-up again, of a second tree, with zk-shell mirroring it too: the
   second steady phase and catch-up run on servers that are done compiling.
   After the second steady phase, its floor: the same updates' ZooKeeper work
   (the writes, the origin's reads and metadata multis, the receiver's reads
   and content + metadata multis) by a bare batched client.

ZooKeeper requests are counted per session from the servers' ``cons``
output (the last client xid of each session, which pings do not move), so
the bridges' requests are told apart from the bench's own exactly instead
of subtracting estimates from ``mntr``'s packet counter; each count is taken
once the bridges went quiet after the phase, so work that trails the last
visible value (a receiver's post-apply capture read, outbox deletes) counts.

    scripts/bench                  the full run (about 5 minutes on an idle machine)
    scripts/bench --quick          smaller counts (about 1 minute)
    scripts/bench --large          a 100,000-znode subtree: full scan time and bridge RSS
    scripts/bench --broker kafka   Apache Kafka (KRaft) instead of tansu
    scripts/bench --json out.json  also write the numbers
    scripts/bench --profile DIR    run both bridges under cProfile (slower!)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bridge import codec, statecodec  # noqa: E402
from bridge.batching import MAX_BATCH_EVENTS  # noqa: E402
from bridge.configload import load_settings  # noqa: E402
from bridge.model import Event, NodeMeta, Op, VectorClock, content_hash  # noqa: E402
from bridge.verify import verify  # noqa: E402
from bridge.zk import BatchedClient  # noqa: E402
from bridge.zk.sizing import READS_MAX as READ_CHUNK  # noqa: E402
from tests.harness import procs  # noqa: E402  (the same server management the tests use)
from tests.harness.broker import make_broker  # noqa: E402
from tests.harness.zookeeper import ZooKeeperServer, start_all  # noqa: E402

REGIONS = ("region-a", "region-b")
MOUNT = "/critical"
MOUNT2 = "/critical2"  # the second subtree of the catch-up again (Bench.catch_up_again)
RAW_ROOT = "/rawbench"
FLOOR_ROOT = "/floorbench"  # the catch-up floor's scratch trees, outside the mounts
FLOOR_WINDOW = 4  # multis in flight for the floor (the bridge sends one at a time)
WINDOW = 2000  # requests in flight for the pipelined raw rates
RECORD_BYTES = 264
# The JVM's JIT compiler threads, by the name the kernel keeps (15 characters).
JIT_THREADS = ("C1 CompilerThre", "C2 CompilerThre")
# The latency warm-up (Bench.warm_up): rounds of this many seconds of writes,
# until every JVM's compilers used less CPU than this in a round (WARM_IDLE_ROUNDS in a row).
WARM_ROUND_S = 2.0
WARM_IDLE_JIT_S = 0.04
WARM_MIN_ROUNDS = 2
# Idle rounds in a row that end the warm-up: after one idle round, zk-a's
# compilers came back in the measured phase in three runs (0.8 core-seconds).
WARM_IDLE_ROUNDS = 2
WARM_MAX_ROUNDS = 20
VALUE_BYTES = 64

BOLD, DIM, RESET = "\033[1m", "\033[2m", "\033[0m"
if not sys.stdout.isatty():
    BOLD = DIM = RESET = ""


@dataclass(frozen=True)
class Scale:
    """How much work each measurement does; the raw counts aim at 2-5 s each."""

    raw_create: int
    raw_set: int
    raw_multi: int
    raw_get: int
    raw_records: int
    dirs: int
    leaves: int
    steady: int
    latency_writes: int
    latency_rate: float  # writes per second in the latency phase
    conflict_paths: int

    @property
    def tree_znodes(self) -> int:
        """Znodes of the catch-up tree: the directories and their leaves."""
        return self.dirs * (self.leaves + 1)


FULL = Scale(
    raw_create=4000, raw_set=20_000, raw_multi=20_000, raw_get=30_000, raw_records=240_000,
    dirs=100, leaves=100, steady=5000, latency_writes=1000, latency_rate=200.0,
    conflict_paths=1000,
)
QUICK = Scale(
    raw_create=1000, raw_set=5000, raw_multi=5000, raw_get=8000, raw_records=60_000,
    dirs=10, leaves=100, steady=1000, latency_writes=400, latency_rate=200.0,
    conflict_paths=300,
)
# --large: the quick raw ZooKeeper rates (the scan's ceilings) and the 100k-znode scan.
# 1,000 directories of 99 leaves: a subtree of exactly 100,000 znodes.
LARGE = replace(QUICK, raw_records=0, dirs=1000, leaves=99)
ZKSHELL_PACKAGE = "zk_shell==1.3.4"
ZKSHELL_VENV = REPO / ".cache" / "zkshell-venv"

# Issue #6's targets: (key in Results.bridge, comparison, threshold, what).
TARGETS = (
    ("steady_vs_multi", ">=", 0.5, "steady state A→B / raw async 2-op multi"),
    ("catch_up_vs_zkshell", ">=", 10.0, "catch-up speed / zk-shell mirror, same tree"),
    ("latency_p99_ms", "<=", 100.0, "latency p99 at 200 updates/s (ms)"),
    ("steady_requests_a", "<=", 1.5, "ZooKeeper requests/update, origin, steady"),
    ("steady_requests_b", "<=", 1.5, "ZooKeeper requests/update, receiver, steady"),
    ("latency_requests_a", "<=", 1.5, "ZooKeeper requests/update, origin, 200/s"),
    ("latency_requests_b", "<=", 1.5, "ZooKeeper requests/update, receiver, 200/s"),
    ("large_scan_s", "<=", 30.0, "--large: full scan of 100k znodes (s)"),
    ("large_rss_peak_mb", "<=", 300.0, "--large: bridge peak RSS (MB)"),
)


class BenchError(RuntimeError):
    """A measurement could not complete (timeout, a process died)."""


# --------------------------------------------------------------------------- output

_T0 = time.monotonic()


def say(text: str) -> None:
    print(f"{DIM}[{time.monotonic() - _T0:6.1f}s]{RESET} {text}", flush=True)


def step(text: str) -> None:
    print(f"\n{BOLD}▶ {text}{RESET}", flush=True)


@dataclass
class Row:
    metric: str
    value: float | None
    unit: str
    ratio: str = ""  # to the raw rate measured in this run
    note: str = ""


def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(rows: Sequence[Row]) -> str:
    head = ("metric", "value", "unit", "vs raw (same run)", "note")
    cells = [head] + [(r.metric, fmt(r.value), r.unit, r.ratio, r.note) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = []
    for n, c in enumerate(cells):
        line = (f"{c[0]:<{widths[0]}}  {c[1]:>{widths[1]}}  {c[2]:<{widths[2]}}  "
                f"{c[3]:<{widths[3]}}  {c[4]}")
        lines.append(line.rstrip())
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def ratio(value: float | None, raw: float | None, name: str) -> str:
    if not value or not raw:
        return ""
    return f"{value / raw:.3f}x {name}"


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: the smallest value with at least pct% of values at or below."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil without floats drifting
    return ordered[int(rank) - 1]


# --------------------------------------------------------------------------- processes


def stat_cpu(text: str) -> float:
    """User + system CPU seconds from a ``/proc/…/stat`` line."""
    # Fields after the command name (which may hold spaces): state is first,
    # utime and stime are the 12th and 13th.
    rest = text.rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 when it is gone)."""
    try:
        return stat_cpu(Path(f"/proc/{pid}/stat").read_text())
    except OSError:
        return 0.0


def jit_seconds(pid: int, proc: Path = Path("/proc")) -> float:
    """CPU seconds the JIT compiler threads of the JVM ``pid`` used so far (0 when gone).

    A freshly started server compiles its hot paths for tens of seconds
    under a new load: up to a core-second per 5 s at 200 writes/s, measured
    per thread, on a machine where every core-second counts.
    """
    total = 0.0
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return 0.0
    for task in tasks:
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        if text[text.index("(") + 1 : text.rindex(")")].startswith(JIT_THREADS):
            total += stat_cpu(text)
    return total


def rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    """Resident memory now (VmRSS) or at its peak so far (VmHWM), in MB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def mntr(server: ZooKeeperServer) -> dict[str, str]:
    """The server's ``mntr`` figures, by key."""
    return dict(line.split("\t", 1) for line in server.four_letter("mntr").splitlines()
                if "\t" in line)


def zk_packets(server: ZooKeeperServer) -> int:
    """Packets the server has received so far, everyone's, pings included (``mntr``)."""
    return int(mntr(server).get("zk_packets_received", 0))


_CONS = re.compile(r"sid=0x([0-9a-f]+).*?lcxid=0x([0-9a-f]+)")


def parse_cons(text: str) -> dict[int, int]:
    """Session id → the last client xid the server saw from it, from ``cons`` output.

    A client numbers its requests 1, 2, 3, ... per session; pings and watch
    notifications use negative xids and do not move it, so the difference of
    two readings is the requests the session sent in between. A session that
    has sent nothing yet reports -1 (as 64-bit hex): counted as 0.
    """
    out: dict[int, int] = {}
    for line in text.splitlines():
        m = _CONS.search(line)
        if m:
            xid = int(m.group(2), 16)
            out[int(m.group(1), 16)] = 0 if xid >= 1 << 63 else xid
    return out


def requests_between(before: Mapping[int, int], after: Mapping[int, int],
                     exclude: set[int]) -> int:
    """Requests sent by the sessions not in ``exclude`` between two ``parse_cons`` readings.

    A session that appeared in between counts from its first request; one
    that ended in between is not seen afterwards and counts nothing.
    """
    return sum(xid - before.get(sid, 0) for sid, xid in after.items() if sid not in exclude)


def zk_sessions(server: ZooKeeperServer) -> dict[int, int]:
    return parse_cons(server.four_letter("cons"))


def foreign_servers(ours: set[int]) -> int:
    """Servers and bridges on this machine that this run did not start (they skew numbers)."""
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in ours:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if (b"QuorumPeerMain" in cmd or b"tansu broker" in cmd or b"kafka.Kafka" in cmd
                or b"bridge run" in cmd):
            count += 1
    return count


# --------------------------------------------------------------------------- ZooKeeper helpers


def value(tag: str, n: int) -> bytes:
    return f"{tag}-{n:06d}".encode().ljust(VALUE_BYTES, b".")


def pipelined(issue: Callable[[int], Any], n: int, window: int = WINDOW) -> float:
    """Issue ``n`` kazoo async requests with at most ``window`` unanswered; return seconds."""
    inflight: deque[Any] = deque()
    t0 = time.perf_counter()
    for i in range(n):
        inflight.append(issue(i))
        if len(inflight) >= window:
            inflight.popleft().get(timeout=60)  # raises the request's error, if any
    while inflight:
        inflight.popleft().get(timeout=60)
    return time.perf_counter() - t0


def read_values(client: BatchedClient, paths: Sequence[str]) -> list[bytes | None]:
    """The data of each path (None: absent), as many per ``multiRead`` as the bridge reads."""
    out: list[bytes | None] = []
    for part in chunked(paths, READ_CHUNK):
        for got in client.multi_read_async([("data", p) for p in part]).get(timeout=60):
            out.append(got[0] if isinstance(got, tuple) else None)
    return out


def run_threads(work: Sequence[Callable[[], None]]) -> float:
    """Run each function in a thread of its own, all at once; seconds until the last ended."""
    failed: list[BaseException] = []

    def guarded(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # re-raised in the caller's thread
            failed.append(exc)

    threads = [threading.Thread(target=guarded, args=(fn,)) for fn in work]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise failed[0]
    return time.perf_counter() - t0


def origin_multis(c: BatchedClient, pieces: Sequence[Sequence[str]], meta: bytes, entry: bytes,
                  *, update: bool) -> None:
    """The origin's part of a floor: per batch, a metadata znode per path (created, or set
    with ``update``) and the batch's outbox entry, in one ``multi``; several in flight."""

    def piece(k: int) -> Any:
        t = c.transaction()
        for p in pieces[k]:
            if update:
                t.set_data(f"{FLOOR_ROOT}/meta{p}", meta)
            else:
                t.create(f"{FLOOR_ROOT}/meta{p}", meta)
        t.create(f"{FLOOR_ROOT}/outbox/e-", entry, sequence=True)
        return t.commit_async()

    pipelined(piece, len(pieces), window=FLOOR_WINDOW)


def floor_payloads(region: str, path: str) -> tuple[bytes, bytes]:
    """A metadata value and a full batch's outbox entry, as the bridge encodes them."""
    meta = statecodec.encode_meta(NodeMeta(vc=VectorClock.of({region: 1}),
                                      data_hash=content_hash(value("v0", 0)), deleted=False,
                                      writer=region, ts=time.time_ns()))
    event = codec.encode(Event(origin=region, subtree="critical", path=path, op=Op.PUT,
                               vc=VectorClock.of({region: 1}), ts=time.time_ns(), writer=region,
                               data=value("v0", 0)))
    return meta, statecodec.encode_outbox([event] * MAX_BATCH_EVENTS)


def chunked(items: Sequence[str], size: int) -> list[Sequence[str]]:
    """``items`` in consecutive pieces of at most ``size``, order kept."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def count_tree(zk: KazooClient, root: str) -> int:
    """Znodes in the tree at ``root`` (itself included), listing one level at a time."""
    if zk.exists(root) is None:
        return 0
    level, count = [root], 1
    while level:
        ars = [(p, zk.get_children_async(p)) for p in level]
        level = []
        for p, ar in ars:
            kids = ar.get(timeout=60)
            count += len(kids)
            level += [f"{p.rstrip('/')}/{k}" for k in kids]
    return count


def zkshell() -> Path:
    """zk-shell's executable, installed on first use into its own venv under ``.cache/``.

    It gets a venv of its own so its dependencies (its own kazoo, the
    twitter.common packages) never meet zkbridge's; ``.cache/`` is ignored
    by git. The marker names the installed package, so a change of
    version reinstalls.
    """
    exe = ZKSHELL_VENV / "bin" / "zk-shell"
    marker = ZKSHELL_VENV / ".installed"
    if exe.exists() and marker.exists() and marker.read_text().strip() == ZKSHELL_PACKAGE:
        return exe
    say(f"installing {ZKSHELL_PACKAGE} into {ZKSHELL_VENV.relative_to(REPO)} (once)…")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(ZKSHELL_VENV)],
                       check=True, capture_output=True, timeout=300)
        subprocess.run([str(ZKSHELL_VENV / "bin" / "pip"), "install", "-q", ZKSHELL_PACKAGE],
                       check=True, capture_output=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise BenchError(f"could not install {ZKSHELL_PACKAGE}: "
                         f"{detail.decode(errors='replace')[-300:] or exc}") from exc
    marker.write_text(ZKSHELL_PACKAGE + "\n")
    return exe


class Watcher:
    """The latest value of chosen paths in one region, refreshed by one-shot data watches.

    A watch fires on the server's change notification and the re-read arms the
    next one, so a value is seen about one round trip after it is committed,
    without polling thousands of paths. ``expect`` records when each path
    first shows the value it is waiting for.
    """

    def __init__(self, client: KazooClient, paths: Sequence[str]) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._closed = False
        self.values: dict[str, bytes | None] = {}
        self.expected: dict[str, bytes] = {}
        self.seen_at: dict[str, float] = {}
        self.done = threading.Event()
        self.armed = threading.Event()
        self.reads = 0  # requests sent, so callers can tell the bench's load from the bridge's
        self._unarmed = len(paths)
        if not paths:
            self.armed.set()
        for p in paths:
            self._read(p)

    def close(self) -> None:
        self._closed = True

    def expect(self, wanted: Mapping[str, bytes]) -> None:
        with self._lock:
            self.expected.update(wanted)
            for p, v in wanted.items():
                self.seen_at.pop(p, None)
                if self.values.get(p) == v:
                    self.seen_at[p] = time.monotonic()
            self._check_done()

    @property
    def remaining(self) -> int:
        with self._lock:
            return len(self.expected) - len(self.seen_at)

    def _check_done(self) -> None:
        if len(self.seen_at) >= len(self.expected):
            self.done.set()
        else:
            self.done.clear()

    def _read(self, path: str) -> None:
        if self._closed:
            return
        self.reads += 1
        ar = self._client.get_async(path, watch=lambda _ev, p=path: self._read(p))
        ar.rawlink(lambda res, p=path: self._got(p, res))

    def _got(self, path: str, res: Any) -> None:
        now = time.monotonic()
        data: bytes | None
        try:
            data = res.get_nowait()[0]
        except NoNodeError:
            # No data watch is left on a missing node: an exists watch fires on creation.
            data = None
            if not self._closed:
                self.reads += 1
                ar = self._client.exists_async(path, watch=lambda _ev, p=path: self._read(p))
                ar.rawlink(lambda r, p=path: self._read(p) if r.successful() and r.value else None)
        except Exception:
            # Connection trouble: ask again rather than lose the path for the run.
            self._read(path)
            return
        with self._lock:
            if path not in self.values:
                self._unarmed -= 1
                if self._unarmed == 0:
                    self.armed.set()
            self.values[path] = data
            want = self.expected.get(path)
            if want is not None and data == want and path not in self.seen_at:
                self.seen_at[path] = now
                self._check_done()


def wait_event(
    event: threading.Event,
    timeout: float,
    what: str,
    progress: Callable[[], str] | None = None,
    every: float = 3.0,
) -> None:
    """Wait for ``event``, printing ``progress()`` every few seconds; BenchError at the deadline."""
    end = time.monotonic() + timeout
    while not event.wait(min(every, max(0.0, end - time.monotonic()))):
        if time.monotonic() >= end:
            raise BenchError(f"{what}: not done after {timeout:.0f} s"
                             + (f" ({progress()})" if progress else ""))
        if progress:
            say(f"  … {progress()}")


def poll(
    pred: Callable[[], bool],
    timeout: float,
    what: str,
    progress: Callable[[], str] | None = None,
    interval: float = 0.01,
    every: float = 3.0,
) -> float:
    """Poll ``pred`` until true; return the monotonic time it was first seen true."""
    end = time.monotonic() + timeout
    next_report = time.monotonic() + every
    while True:
        if pred():
            return time.monotonic()
        now = time.monotonic()
        if now >= end:
            raise BenchError(f"{what}: not done after {timeout:.0f} s"
                             + (f" ({progress()})" if progress else ""))
        if progress and now >= next_report:
            say(f"  … {progress()}")
            next_report = now + every
        time.sleep(interval)


# --------------------------------------------------------------------------- the bench


@dataclass
class Region:
    name: str
    server: ZooKeeperServer
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    client: KazooClient | None = None  # stock kazoo
    # A second session with the bridge's batched socket I/O, for the watchers
    # and the steady phase's writer: a stock client seeing 5,000 values
    # arrive in bulk took 0.85 s after the last apply to read them all, and
    # writing them took it 2.05 s (traced), which both counted as the bridge's.
    observer: KazooClient | None = None

    @property
    def zk(self) -> KazooClient:
        assert self.client is not None
        return self.client

    @property
    def fast(self) -> KazooClient:
        assert self.observer is not None
        return self.observer

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """This bridge's JSON log lines for one event name (other lines are skipped)."""
        out: list[dict[str, Any]] = []
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return out
        needle = f'"{event}"'
        for line in text.splitlines():
            if needle in line and line.startswith("{"):
                with contextlib.suppress(ValueError):
                    doc = json.loads(line)
                    if doc.get("event") == event:
                        out.append(doc)
        return out


def log_time(doc: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(str(doc["timestamp"])).timestamp()


@dataclass
class Results:
    raw: dict[str, float] = field(default_factory=dict)
    bridge: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)


class Bench:
    def __init__(self, workdir: Path, scale: Scale, profile_dir: Path | None,
                 broker: str = "tansu") -> None:
        self.dir = workdir
        self.scale = scale
        self.profile_dir = profile_dir
        self.broker = make_broker(broker, base_dir=workdir / "broker")
        self.kind = self.broker.kind
        self.idempotence = self.broker.supports_idempotence
        self.regions = {
            r: Region(
                r,
                ZooKeeperServer(r, base_dir=workdir / f"zk-{r}"),
                workdir / f"{r}.yaml",
                workdir / f"bridge-{r}.log",
            )
            for r in REGIONS
        }
        self.a, self.b = (self.regions[r] for r in REGIONS)
        self.res = Results()
        self._watchers: list[Watcher] = []
        self.mounts = [("critical", MOUNT)]  # (subtree name, path) in the bridges' configs

    # -- lifecycle -------------------------------------------------------
    def up(self) -> None:
        what = "tansu, memory only" if self.kind == "tansu" else "Apache Kafka, KRaft"
        step(f"Starting two ZooKeeper servers and the broker ({what})")
        self.compile_bridge()
        start_all(r.server for r in self.regions.values())
        self.broker.start()
        for r in self.regions.values():
            c = KazooClient(hosts=r.server.hosts, timeout=30)
            c.start(timeout=30)
            r.client = c
            o = BatchedClient(hosts=r.server.hosts, timeout=30)
            o.start(timeout=30)
            r.observer = o
            self._write_config(r)
            say(f"{r.name}: ZooKeeper {r.server.hosts} (pid {r.server.pid})")
        say(f"kafka: {self.broker.bootstrap} (pid {self.broker.pid})")
        others = foreign_servers(self.pids())
        if others:
            say(f"note: {others} ZooKeeper/broker/bridge processes not started by this run are "
                "running on this machine; they share the CPU and skew every number below")
        self.res.bridge["foreign_processes"] = others
        self.res.bridge["loadavg_start"] = os.getloadavg()

    def compile_bridge(self) -> None:
        """Compile the bridge's modules to bytecode before any bridge starts.

        An installed bridge (pip compiles a wheel's modules at install) loads
        its bytecode; this checkout would compile every module at every
        start, since PYTHONDONTWRITEBYTECODE keeps Python from saving it (the
        systemd unit sets it; so may the machine), which added about 0.13 s
        to each bridge's start in the catch-up's time (imports: median 0.47 s
        from source, 0.34 s from bytecode, 12 starts each). Python still reads
        bytecode under PYTHONDONTWRITEBYTECODE; ``__pycache__`` is ignored by git.
        """
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "bridge")],
                       check=True)

    def jvms(self) -> dict[str, int]:
        """The Java processes of this run (ZooKeeper servers; Apache Kafka), by phase-table name."""
        out = {f"zk-{r.name[-1]}": r.server.pid for r in self.regions.values() if r.server.pid}
        if self.kind == "kafka" and self.broker.pid:
            out[self.kind] = self.broker.pid
        return out

    def pids(self) -> set[int]:
        out = {os.getpid()}
        for r in self.regions.values():
            if r.server.pid:
                out.add(r.server.pid)
            if r.proc is not None:
                out.add(r.proc.pid)
        if self.broker.pid:
            out.add(self.broker.pid)
        return out

    def _write_config(self, r: Region, **extra: Any) -> None:
        doc = {
            "region": r.name,
            "zookeeper": {"hosts": r.server.hosts},
            "kafka": {"bootstrap_servers": self.broker.bootstrap,
                      "enable_idempotence": self.idempotence},
            "peers": [p for p in REGIONS if p != r.name],
            "subtrees": [{"name": name, "path": path} for name, path in self.mounts],
            "log": {"format": "json"},
            **extra,
        }
        r.config.write_text(yaml.safe_dump(doc, sort_keys=False))

    def start_bridge(self, r: Region) -> None:
        argv = [sys.executable]
        if self.profile_dir is not None:
            # The daemon stops cleanly on SIGTERM, so cProfile gets to write its file.
            # The second catch-up's processes get files of their own.
            again = "" if self.mounts[0][1] == MOUNT else "-again"
            argv += ["-m", "cProfile", "-o", str(self.profile_dir / f"{r.name}{again}.prof")]
        argv += ["-m", "bridge", "run", "-c", str(r.config)]
        r.proc = procs.spawn(argv, r.log, env={"PYTHONPATH": str(REPO)}, cwd=REPO)

    def check_bridges(self) -> None:
        for r in self.regions.values():
            if r.proc is not None and r.proc.poll() is not None:
                raise BenchError(f"bridge {r.name} exited with {r.proc.returncode}; log "
                                 f"{r.log}:\n{procs.log_tail(r.log)}")

    def down(self) -> None:
        for w in self._watchers:
            w.close()
        for r in self.regions.values():
            for c in (r.client, r.observer):
                if c is not None:
                    with contextlib.suppress(Exception):
                        c.stop()
                        c.close()
        for r in self.regions.values():
            if r.proc is not None:
                procs.stop(r.proc, signal.SIGTERM, deadline=30 if self.profile_dir else 10)
        self.broker.close()
        for r in self.regions.values():
            r.server.close()

    def watcher(self, client: KazooClient, paths: Sequence[str]) -> Watcher:
        w = Watcher(client, paths)
        self._watchers.append(w)
        wait_event(w.armed, 60, "arming watches")
        return w

    def bench_sessions(self) -> set[int]:
        """The bench's own ZooKeeper sessions: their requests are not the bridges'."""
        return {c.client_id[0] for r in self.regions.values() for c in (r.client, r.observer)
                if c is not None and c.client_id}

    def bridge_requests(self) -> dict[str, dict[int, int]]:
        return {f"zk-{r.name[-1]}": zk_sessions(r.server) for r in self.regions.values()}

    def settle(self, before: dict[str, dict[int, int]], quiet: float = 0.5,
               limit: float = 8.0) -> dict[str, dict[int, int]]:
        """Session readings once the bridges stopped sending requests (or ``limit`` s).

        The last value the bench sees is not the bridges' last request: the
        origin still deletes outbox entries, the receiver re-reads the paths it
        just applied (its own watch fired). Those belong to the phase.
        """
        mine = self.bench_sessions()
        end = time.monotonic() + limit
        prev = self.bridge_requests()
        while time.monotonic() < end:
            time.sleep(quiet)
            cur = self.bridge_requests()
            moved = sum(requests_between(prev[k], cur[k], mine) for k in cur)
            prev = cur
            if moved <= 2:  # an idle position write or two: quiet enough
                break
        return prev

    @contextlib.contextmanager
    def phase(self, name: str, requests: bool = False) -> Iterator[None]:
        """Record wall time and the CPU each server and bridge spent, to show who was busy.

        With ``requests``, also the ZooKeeper requests the bridges' sessions
        sent (everyone but the bench), counted until they went quiet.
        """
        who = {f"zk-{r.name[-1]}": r.server.pid for r in self.regions.values()}
        who[self.kind] = self.broker.pid
        who |= {f"bridge-{r.name[-1]}": r.proc.pid if r.proc else None
                for r in self.regions.values()}
        who["bench"] = os.getpid()
        before = {k: cpu_seconds(p) for k, p in who.items() if p}
        jvms = self.jvms()
        jit_before = {k: jit_seconds(p) for k, p in jvms.items()}
        packets = {f"zk-{r.name[-1]}": zk_packets(r.server) for r in self.regions.values()}
        sessions = self.bridge_requests() if requests else {}
        t0 = time.monotonic()
        yield
        wall = time.monotonic() - t0
        # A bridge started inside the phase has no "before": it used all of its CPU here.
        who |= {f"bridge-{r.name[-1]}": r.proc.pid if r.proc else None
                for r in self.regions.values()}
        cpu = {k: round(cpu_seconds(p) - before.get(k, 0.0), 2) for k, p in who.items() if p}
        # The machine's 1-minute load average at the phase's end: with 2 cores,
        # anything far above 2 means other work competed with this phase.
        jit = {k: round(jit_seconds(p) - jit_before[k], 2) for k, p in jvms.items()}
        record: dict[str, Any] = {"wall_s": round(wall, 2), "cpu_s": cpu, "jit_s": jit,
                                  "load": round(os.getloadavg()[0], 1)}
        if requests:
            after = self.settle(sessions)
            mine = self.bench_sessions()
            record["bridge_zk_requests"] = {
                k: requests_between(sessions[k], after[k], mine) for k in after}
        record["zk_packets_all"] = {
            k: zk_packets(r.server) - packets[k]
            for k, r in zip(packets, self.regions.values(), strict=True)}
        self.res.phases[name] = record
        busy = ", ".join(f"{k} {v / wall:.0%}" for k, v in cpu.items() if wall > 0)
        say(f"  cpu during {name} ({wall:.1f} s wall, % of one core): {busy}; of it JIT "
            "compiling: " + ", ".join(f"{k} {v / wall:.0%}" for k, v in jit.items() if wall > 0))
        if requests:
            say("  ZooKeeper requests sent by the bridges (per session, cons): " + ", ".join(
                f"{k} {v:,}" for k, v in record["bridge_zk_requests"].items())
                + "; packets received from everyone (mntr): " + ", ".join(
                f"{k} {v:,}" for k, v in record["zk_packets_all"].items()))

    # -- 1. raw rates ----------------------------------------------------
    def _raw_rates(self, label: str, zk: KazooClient, paths: list[str], data: bytes,
                   version: int) -> None:
        s, n = self.scale, len(paths)
        with self.phase(f"raw_set_{label}"):
            say(f"async set_data x {s.raw_set:,} ({WINDOW} in flight, {label} client)…")
            secs = pipelined(lambda i: zk.set_async(paths[i % n], data), s.raw_set)
        self.res.raw[f"zk_async_set_per_s_{label}"] = s.raw_set / secs
        say(f"  {s.raw_set / secs:,.0f} set_data/s")

        def multi(i: int) -> Any:
            # The bridge's shape: a fence check on an epoch znode plus the write.
            t = zk.transaction()
            t.check(f"{RAW_ROOT}-epoch", version)
            t.set_data(paths[i % n], data)
            return t.commit_async()

        with self.phase(f"raw_multi_{label}"):
            say(f"async 2-op multi (check + set_data) x {s.raw_multi:,} ({WINDOW} in flight, "
                f"{label} client)…")
            secs = pipelined(multi, s.raw_multi)
        self.res.raw[f"zk_async_multi_per_s_{label}"] = s.raw_multi / secs
        say(f"  {s.raw_multi / secs:,.0f} multi/s")

        with self.phase(f"raw_get_{label}"):
            say(f"async get x {s.raw_get:,} ({WINDOW} in flight, {label} client)…")
            secs = pipelined(lambda i: zk.get_async(paths[i % n]), s.raw_get)
        self.res.raw[f"zk_async_get_per_s_{label}"] = s.raw_get / secs
        say(f"  {s.raw_get / secs:,.0f} get/s")

    def raw_zookeeper(self) -> None:
        s, zk = self.scale, self.a.zk
        step(f"Raw ZooKeeper rates (kazoo, one standalone server {self.a.server.hosts})")
        zk.ensure_path(RAW_ROOT)
        zk.create(f"{RAW_ROOT}-epoch", b"e")
        epoch_stat = zk.exists(f"{RAW_ROOT}-epoch")
        paths = [f"{RAW_ROOT}/n{i:06d}" for i in range(s.raw_create)]
        data = value("raw", 0)

        with self.phase("raw_create"):
            say(f"sync create x {s.raw_create:,} (one at a time)…")
            t0 = time.perf_counter()
            for p in paths:
                zk.create(p, data)
            secs = time.perf_counter() - t0
        self.res.raw["zk_sync_create_per_s"] = s.raw_create / secs
        say(f"  {s.raw_create / secs:,.0f} creates/s")

        n = len(paths)
        assert epoch_stat is not None
        version = epoch_stat.version
        # Stock kazoo sends one request per wake-up of its connection thread;
        # the bridge's adapter batches its socket I/O (bridge/zk/wire.py). Both are
        # measured, and the faster is the ceiling the bridge is compared to.
        batched = BatchedClient(hosts=self.a.server.hosts, timeout=30)
        batched.start(timeout=30)
        try:
            for label, client in (("kazoo", zk), ("batched", batched)):
                self._raw_rates(label, client, paths, data, version)
        finally:
            batched.stop()
            batched.close()
        for op in ("set", "multi", "get"):
            self.res.raw[f"zk_async_{op}_per_s"] = max(
                self.res.raw[f"zk_async_{op}_per_s_{label}"] for label in ("kazoo", "batched"))

        # Leave the server as the bridge benchmarks expect it: only their data.
        pipelined(lambda i: zk.delete_async(paths[i]), n)
        zk.delete(RAW_ROOT)
        zk.delete(f"{RAW_ROOT}-epoch")

    def raw_kafka(self) -> None:
        n = self.scale.raw_records
        step(f"Raw Kafka rates (aiokafka against {self.kind} {self.broker.bootstrap})")
        idem = "on" if self.idempotence else "off"
        say(f"produce x {n:,} records of {RECORD_BYTES} B (acks=all, idempotence {idem}), "
            f"then consume them…")
        with self.phase("raw_kafka"):
            produce_s, consume_s = asyncio.run(
                _kafka_rates(self.broker.bootstrap, n, self.idempotence))
        self.res.raw["kafka_produce_per_s"] = n / produce_s
        self.res.raw["kafka_consume_per_s"] = n / consume_s
        say(f"  {n / produce_s:,.0f} produced/s, {n / consume_s:,.0f} consumed/s")
        samples = 20
        say(f"produce → consume latency x {samples}, one record at a time, with the bridge's "
            "bound on a fetch's wait (fetch_max_wait_ms)…")
        ms = asyncio.run(_kafka_latency(self.broker.bootstrap, samples, 0.02,
                                        self.idempotence))
        self.res.raw["kafka_latency_p50_ms"] = percentile(ms, 50)
        self.res.raw["kafka_latency_max_ms"] = max(ms)
        say(f"  p50 {percentile(ms, 50):.1f} ms, max {max(ms):.1f} ms")

    def populate(self, mount: str = MOUNT) -> list[str]:
        """The catch-up tree in A: ``dirs`` directories of ``leaves`` leaves, one multi each."""
        s, zk = self.scale, self.a.zk
        dirs = [f"{mount}/d{d:03d}" for d in range(s.dirs)]
        zk.ensure_path(mount)

        def one_dir(i: int) -> Any:
            t = zk.transaction()
            t.create(dirs[i], b"")
            for j in range(s.leaves):
                t.create(f"{dirs[i]}/l{j:03d}", value("v0", i * s.leaves + j))
            return t.commit_async()

        secs = pipelined(one_dir, len(dirs), window=50)
        if len(zk.get_children(dirs[-1])) != s.leaves:
            raise BenchError(f"populating {dirs[-1]} failed")
        total = s.tree_znodes
        say(f"{self.a.name}: created {s.dirs:,} dirs x {s.leaves} leaves of {VALUE_BYTES} B "
            f"({total / secs:,.0f} znodes/s, one multi per directory)")
        return dirs

    def zkshell_mirror(self, total: int, src: str = MOUNT) -> None:
        """zk-shell ``mirror`` of A's tree ``src`` into B (outside B's mounts), timed, same
        servers; a ``src`` other than the first mount is the second catch-up's."""
        a, b = self.a, self.b
        again = src != MOUNT
        try:
            exe = zkshell()
        except BenchError as exc:
            say(f"zk-shell unavailable, no same-run comparison: {exc}")
            self.res.bridge["zkshell_error"] = str(exc)
            return
        dst = "/zkshell-mirror2" if again else "/zkshell-mirror"
        cmd = f"mirror zk://{a.server.hosts}{src} zk://{b.server.hosts}{dst} true false true"
        say(f"zk-shell {ZKSHELL_PACKAGE.split('==')[1]}: {cmd!r} (async copies, its faster "
            "mode)…")
        with self.phase("zkshell_mirror_again" if again else "zkshell_mirror"):
            t0 = time.monotonic()
            out = subprocess.run([str(exe), "--run-once", cmd], capture_output=True, text=True,
                                 timeout=1800, stdin=subprocess.DEVNULL)
            wall = time.monotonic() - t0
        copied = count_tree(b.zk, dst)
        if out.returncode != 0 or copied != total + 1:
            raise BenchError(f"zk-shell mirror exited {out.returncode} with {copied:,} of "
                             f"{total + 1:,} znodes in {dst}: {out.stdout[-300:]}"
                             f"{out.stderr[-300:]}")
        m = re.search(r"Mirroring took ([0-9.]+) secs", out.stdout)
        own = float(m.group(1)) if m else None
        if again:
            self.res.bridge["zkshell_again_s"] = wall
        else:
            self.res.bridge |= {"zkshell_mirror_s": wall, "zkshell_mirror_own_s": own,
                                "zkshell_znodes": total}
        say(f"  zk-shell copied {total:,} znodes in {wall:.1f} s wall ({total / wall:,.0f}/s; "
            f"it reports {fmt(own)} s without its own start-up)")

    def leaves_of(self, directory: str) -> list[str]:
        return [f"{directory}/l{j:03d}" for j in range(self.scale.leaves)]

    # -- 2a. what a catch-up cannot avoid asking of the servers ------------
    def catch_up_floor(self, znodes: list[str]) -> None:
        """The catch-up's own ZooKeeper work, done by a bare client on the same servers.

        What the design asks of the servers for one region to bootstrap
        another, whatever the bridge does around it. At the origin: every
        znode's data (``multiRead``, 500 per request, as the bridge reads),
        its ACL (``getACL``, one request each: a ``multiRead`` cannot carry
        it) and one metadata znode per znode, in multis of a batch
        (1,000) each with the batch's outbox entry. At the receiver: each
        znode and its metadata znode, in multis of a batch. Done with the
        bridge's batched client, several multis in flight, in scratch trees
        outside the mounts (removed after): first each side alone, then both
        at once, as in a catch-up. The catch-up cannot be faster than both
        at once, and the bridges share the same two cores with the servers.
        """
        a, n = self.a, len(znodes)
        step(f"Catch-up floor: the same {n:,} znodes' ZooKeeper work by a bare batched client")
        meta, entry = floor_payloads(a.name, znodes[-1])
        pieces, reads = chunked(znodes, MAX_BATCH_EVENTS), chunked(znodes, READ_CHUNK)
        times: dict[str, float] = {}

        def origin(alone: bool = False) -> None:
            t0 = time.perf_counter()
            pipelined(lambda k: za.multi_read_async([("data", p) for p in reads[k]]),
                      len(reads), window=FLOOR_WINDOW)
            t1 = time.perf_counter()
            pipelined(lambda i: za.get_acls_async(znodes[i]), n)
            if alone:
                times["read"], times["acl"] = t1 - t0, time.perf_counter() - t1
            origin_multis(za, pieces, meta, entry, update=False)
            if alone:
                times["a"] = time.perf_counter() - t0

        def receiver(alone: bool = False) -> None:
            t0 = time.perf_counter()

            def piece(k: int) -> Any:
                t = zb.transaction()
                for p in pieces[k]:
                    t.create(f"{FLOOR_ROOT}/tree{p}", value("v0", k))
                    t.create(f"{FLOOR_ROOT}/meta{p}", meta)
                return t.commit_async()

            pipelined(piece, len(pieces), window=FLOOR_WINDOW)
            if alone:
                times["b"] = time.perf_counter() - t0

        with self.floor_clients() as (za, zb):
            # Scratch trees mirroring the mount, under FLOOR_ROOT on each server.
            trees = ((za, ("meta",)), (zb, ("tree", "meta")))

            def prepare() -> None:
                for c, names in trees:
                    for tree in names:
                        c.ensure_path(f"{FLOOR_ROOT}/{tree}{MOUNT}")
                za.ensure_path(f"{FLOOR_ROOT}/outbox")

            for label, work in (("floor_a", origin), ("floor_b", receiver)):
                prepare()
                with self.phase(label):
                    work(True)
                self.drop_trees(trees, znodes)
            prepare()
            with self.phase("floor_both"):
                times["both"] = run_threads((origin, receiver))
            self.drop_trees(trees, znodes)
        bridge = self.res.bridge
        bridge |= {"floor_read_s": times["read"], "floor_acl_s": times["acl"],
                   "floor_a_s": times["a"],
                   "floor_b_s": times["b"], "floor_both_s": times["both"]}
        cpu = self.res.phases["floor_both"]["cpu_s"]
        bridge["floor_both_server_cpu_s"] = cpu.get("zk-a", 0.0) + cpu.get("zk-b", 0.0)
        say(f"  origin alone {times['a']:.2f} s (reading the {n:,} znodes {times['read']:.2f} s, "
            f"their getACL {times['acl']:.2f} s, then the metadata multis); receiver alone "
            f"{times['b']:.2f} s; both at once {times['both']:.2f} s, servers' CPU "
            f"{bridge['floor_both_server_cpu_s']:.2f} s")

    # -- 2b. what steady state cannot avoid asking of the servers ----------
    def steady_floor(self) -> None:
        """The steady phase's own ZooKeeper work, done by a bare client on the same servers.

        A floor under the steady rate, as ``catch_up_floor`` is under the
        catch-up: the application's updates at the origin (the bench's writer
        sends them in the steady phase too), the origin's read of the updated
        znodes (``multiRead``, 500 per request) and one ``multi`` per batch of
        1,000 setting each znode's metadata with the batch's outbox entry,
        then the entries' delete; at the receiver, the read of the znodes and
        their parents, then one ``multi`` per batch setting each znode and its
        metadata and the peer's position. No bridge, no broker, no waiting of
        one side for the other, several requests in flight: the steady phase
        cannot go faster than this, on servers that share the 2 cores with
        nothing but the bench. In scratch trees outside the mounts, removed
        after: each side alone, then both at once.
        """
        n, a = self.scale.steady, self.a
        paths = self.leaves(0, n)
        parents = sorted({p.rsplit("/", 1)[0] for p in paths})
        step(f"Steady floor: the ZooKeeper work of {n:,} replicated updates, by a bare "
             "batched client")
        meta, entry = floor_payloads(a.name, paths[-1])
        pieces = chunked(paths, MAX_BATCH_EVENTS)
        times: dict[str, float] = {}
        root = FLOOR_ROOT

        def reads(c: BatchedClient, tree: str, names: Sequence[str]) -> None:
            parts = chunked(names, READ_CHUNK)
            pipelined(lambda k: c.multi_read_async([("data", f"{root}/{tree}{p}")
                                                    for p in parts[k]]), len(parts),
                      window=FLOOR_WINDOW)

        with self.floor_clients() as (za, zb):
            trees = ((za, ("app", "meta")), (zb, ("tree", "meta")))

            def writer() -> None:
                pipelined(lambda i: za.set_async(f"{root}/app{paths[i]}", value("f", i)), n)

            def origin() -> None:
                reads(za, "app", paths)
                origin_multis(za, pieces, meta, entry, update=True)
                t = za.transaction()
                for name in za.get_children(f"{root}/outbox"):
                    t.delete(f"{root}/outbox/{name}")
                t.commit()

            def receiver() -> None:
                reads(zb, "tree", [*paths, *parents])

                def piece(k: int) -> Any:
                    t = zb.transaction()
                    for p in pieces[k]:
                        t.set_data(f"{root}/tree{p}", value("f", k))
                        t.set_data(f"{root}/meta{p}", meta)
                    t.set_data(f"{root}/position", b"%d" % k)
                    return t.commit_async()

                pipelined(piece, len(pieces), window=FLOOR_WINDOW)

            for c, names in trees:
                for tree in names:
                    self.scratch_tree(c, f"{root}/{tree}", paths)
            za.ensure_path(f"{root}/outbox")
            zb.create(f"{root}/position", b"")
            sides = {"a": (writer, origin), "b": (receiver,), "both": (writer, origin, receiver)}
            for label, work in sides.items():
                with self.phase(f"steady_floor_{label}"):
                    times[label] = run_threads(work)
            self.drop_trees(trees, paths)
        cpu = self.res.phases["steady_floor_both"]["cpu_s"]
        server_cpu = cpu.get("zk-a", 0.0) + cpu.get("zk-b", 0.0)
        vs_multi = n / times["both"] / self.res.raw["zk_async_multi_per_s"]
        self.res.bridge |= {"steady_floor_a_s": times["a"], "steady_floor_b_s": times["b"],
                            "steady_floor_both_s": times["both"],
                            "steady_floor_vs_multi": vs_multi,
                            "steady_floor_server_cpu_s": server_cpu}
        say(f"  origin alone {times['a']:.2f} s (the application's updates, the reads and "
            f"the metadata multis); receiver alone {times['b']:.2f} s; both at once "
            f"{times['both']:.2f} s ({n / times['both']:,.0f} updates/s, {vs_multi:.3f}x "
            f"multi), servers' CPU {server_cpu:.2f} s")

    def scratch_tree(self, c: BatchedClient, root: str, leaves: Sequence[str]) -> None:
        """Create ``root`` + each leaf's path (directories first), a multi per 1,000 leaves."""
        for d in sorted({p.rsplit("/", 1)[0] for p in leaves}):
            c.ensure_path(f"{root}{d}")
        parts = chunked(leaves, MAX_BATCH_EVENTS)

        def piece(k: int) -> Any:
            t = c.transaction()
            for p in parts[k]:
                t.create(f"{root}{p}", b"")
            return t.commit_async()

        pipelined(piece, len(parts), window=FLOOR_WINDOW)

    def drop_trees(self, trees: Sequence[tuple[BatchedClient, Sequence[str]]],
                   znodes: Sequence[str]) -> None:
        """Remove a floor's scratch trees: ``znodes`` (listed parents first) under each
        client's FLOOR_ROOT/<tree>, a multi per 1,000, then what is left of FLOOR_ROOT."""
        gone = chunked(znodes[::-1], MAX_BATCH_EVENTS)  # children before their parents
        for c, names in trees:
            for tree in names:

                def drop(k: int, cl: BatchedClient = c, root: str = f"{FLOOR_ROOT}/{tree}"
                         ) -> Any:
                    t = cl.transaction()
                    for p in gone[k]:
                        t.delete(f"{root}{p}")
                    return t.commit_async()

                pipelined(drop, len(gone), window=FLOOR_WINDOW)
            c.delete(FLOOR_ROOT, recursive=True)  # directories, roots, the outbox's entries

    @contextlib.contextmanager
    def floor_clients(self) -> Iterator[tuple[BatchedClient, BatchedClient]]:
        """A bare batched session on each region's server, closed after."""
        clients = [BatchedClient(hosts=r.server.hosts, timeout=30) for r in (self.a, self.b)]
        try:
            for c in clients:
                c.start(timeout=30)
            yield clients[0], clients[1]
        finally:
            for c in clients:
                c.stop()
                c.close()

    # -- 2a. initial scan and catch-up ------------------------------------
    def catch_up(self) -> None:
        s, a, b = self.scale, self.a, self.b
        total = s.tree_znodes
        step(f"Initial scan and catch-up: {total:,} znodes in {a.name} before its bridge starts")
        dirs = self.populate()
        self.zkshell_mirror(total)
        self.catch_up_floor([p for d in dirs for p in (d, *self.leaves_of(d))])

        elapsed, wall0 = self.timed_catch_up(dirs, MOUNT)
        poll(lambda: all(r.log_events("bridge_ready") for r in (a, b)), 60, "bridges ready")
        scan = a.log_events("scan_done")[0]
        ready = a.log_events("bridge_ready")[0]
        first = a.log_events("epoch_taken")[0]
        capture_s = log_time(ready) - log_time(scan)
        bridge = self.res.bridge
        bridge["catch_up_znodes"] = total
        bridge["catch_up_s"] = elapsed
        bridge["catch_up_per_s"] = total / elapsed
        bridge["scan_s"] = float(scan["seconds"])
        bridge["scan_znodes"] = int(scan["znodes"])
        bridge["startup_to_epoch_s"] = log_time(first) - wall0
        bridge["startup_capture_s"] = capture_s
        bridge["rss_a_after_scan_mb"] = rss_mb(a.proc.pid) if a.proc else None
        bridge["rss_b_after_catch_up_mb"] = rss_mb(b.proc.pid) if b.proc else None
        req = self.res.phases["catch_up"]["bridge_zk_requests"]
        bridge["catch_up_zk_requests_per_znode"] = {k: round(v / total, 3)
                                                    for k, v in req.items()}
        mirror = bridge.get("zkshell_mirror_s")
        if mirror:
            bridge["catch_up_vs_zkshell"] = mirror / elapsed
        say(f"{b.name} holds all {total:,} after {elapsed:.1f} s "
            f"({total / elapsed:,.0f} znodes/s end to end)")
        say(f"{a.name}: process start → epoch taken {bridge['startup_to_epoch_s']:.1f} s; "
            f"scan {bridge['scan_s']:.2f} s for {bridge['scan_znodes']:,} znodes; then "
            f"{capture_s:.1f} s capturing them before bridge_ready (each batch published "
            "as it commits)")
        say(f"{a.name} bridge RSS {fmt(bridge['rss_a_after_scan_mb'])} MB after the scan; "
            "ZooKeeper requests per replicated znode, the bridges' own: " + ", ".join(
                f"{k} {v}" for k, v in bridge["catch_up_zk_requests_per_znode"].items()))

    def timed_catch_up(self, dirs: Sequence[str], mount: str) -> tuple[float, float]:
        """Start both bridges; the seconds until B holds every znode of ``dirs`` under
        ``mount``, and the wall clock at the start (phase ``catch_up``, or
        ``catch_up_again`` for the second tree)."""
        s, a, b = self.scale, self.a, self.b
        first = mount == MOUNT
        total = s.tree_znodes
        # Polling must not load B's server much: list the mount, then only the
        # directories that exist and are not yet complete.
        complete: set[str] = set()
        seen = {"n": 0}

        def count_b() -> int:
            try:
                names = set(b.zk.get_children(mount))
            except NoNodeError:
                return 0
            todo = [d for d in dirs if d not in complete and d.rsplit("/", 1)[1] in names]
            ars = [(d, b.zk.get_children_async(d)) for d in todo]
            n = len(complete) * (1 + s.leaves)
            for d, ar in ars:
                with contextlib.suppress(NoNodeError):
                    kids = len(ar.get(timeout=30))
                    n += 1 + kids
                    if kids >= s.leaves:
                        complete.add(d)
            return n

        # B applies A's batches in A's order, and A wrote this znode last (the
        # last directory's multi, deepest and last in it), so its arrival in B
        # is the catch-up's end. A watch sees it when it happens; a count
        # right after confirms the rest was there. The count alone, every
        # 0.2 s, overstated the time by up to 0.2 s plus its own duration.
        last = f"{dirs[-1]}/l{s.leaves - 1:03d}"
        arrived = threading.Event()
        arrived_at: list[float] = []

        def created(_event: Any) -> None:
            arrived_at.append(time.monotonic())
            arrived.set()

        if b.fast.exists(last, watch=created) is not None:
            raise BenchError(f"{b.name} already holds {last}")

        def done() -> bool:
            self.check_bridges()
            came = arrived.wait(0.2)
            seen["n"] = count_b()
            if came and seen["n"] < total:
                raise BenchError(f"{b.name} showed {last} with only {seen['n']:,} of {total:,} "
                                 "znodes: origin order broken")
            return seen["n"] >= total

        def progress() -> str:
            if not first:
                return f"{b.name} holds {seen['n']:,}/{total:,}"
            stage = ("scanning" if not a.log_events("scan_done") else
                     "capturing" if not a.log_events("bridge_ready") else "publishing/applying")
            return f"{b.name} holds {seen['n']:,}/{total:,}; {a.name} bridge: {stage}"

        with self.phase("catch_up" if first else "catch_up_again", requests=True):
            say(f"starting both bridges; waiting until {b.name} holds every znode of {mount}…")
            wall0, t0 = time.time(), time.monotonic()
            self.start_bridge(a)
            self.start_bridge(b)
            t_done = poll(done, 900, "catch-up", progress, interval=0)
            arrived.wait(5)  # the count may see it before this session's notification
        t_end = min([t_done, *arrived_at])
        say(f"{b.name} held {last} after {t_end - t0:.2f} s (a watch); the count that "
            f"confirmed all {total:,} ended {t_done - t_end:.2f} s later")
        return t_end - t0, wall0

    def catch_up_again(self) -> None:
        """The catch-up once more: a second subtree of the same shape, on servers that have
        done every phase before (the first catch-up ran while they were still compiling)."""
        s, a, b = self.scale, self.a, self.b
        total = s.tree_znodes
        step(f"Catch-up again: a second subtree {MOUNT2} of {total:,} znodes, both bridges "
             "restarted with it alone")
        for r in (a, b):
            if r.proc is not None:
                procs.stop(r.proc, signal.SIGTERM, deadline=10)
                r.proc = None
        # Alone: a bridge that also mounted the first subtree would scan it again.
        self.mounts = [("critical2", MOUNT2)]
        for r in (a, b):
            self._write_config(r)
        dirs = self.populate(MOUNT2)
        # zk-shell again too: it also ran on servers still compiling the first time.
        self.zkshell_mirror(total, MOUNT2)
        elapsed, _ = self.timed_catch_up(dirs, MOUNT2)
        bridge = self.res.bridge
        bridge["catch_up_again_s"] = elapsed
        mirror = bridge.get("zkshell_again_s")
        if mirror:
            bridge["catch_up_again_vs_zkshell"] = mirror / elapsed
        say(f"{b.name} holds all {total:,} of {MOUNT2} after {elapsed:.2f} s; servers "
            f"compiling meanwhile: {self.jit_share('catch_up_again')} (first catch-up: "
            f"{self.jit_share('catch_up')})")

    # -- --large ----------------------------------------------------------
    def large(self) -> None:
        s, a = self.scale, self.a
        total = s.tree_znodes
        step(f"Large subtree: {total:,} znodes in {a.name}, then its bridge starts alone")
        self.populate()
        with self.phase("large_scan", requests=True):
            wall0 = time.time()
            self.start_bridge(a)
            assert a.proc is not None
            pid = a.proc.pid

            def logged(event: str) -> Callable[[], bool]:
                def check() -> bool:
                    self.check_bridges()
                    return bool(a.log_events(event))
                return check

            def rss() -> str:
                return f"{a.name} bridge RSS {fmt(rss_mb(pid))} MB"

            poll(logged("scan_done"), 900, "large scan", rss, interval=0.5, every=10)
            # Recorded at once: the scan's figures stand even if the capture fails.
            scan = a.log_events("scan_done")[0]
            self.res.bridge |= {
                "large_znodes": int(scan["znodes"]),
                "large_scan_s": float(scan["seconds"]),
                "large_start_to_scan_done_s": log_time(scan) - wall0,
                "large_rss_after_scan_mb": rss_mb(pid),
                "large_rss_peak_mb": rss_mb(pid, "VmHWM"),
            }
            poll(logged("bridge_ready"), 900, "large capture", rss, interval=0.5, every=10)
            ready = a.log_events("bridge_ready")[0]
            rss_ready = rss_mb(pid)
            # Publishing starts after bridge_ready: the peak may come later.
            topic = f"zkbridge.critical.{a.name}"
            t_ready = time.monotonic()
            wanted = int(self.res.bridge["large_znodes"])
            got = {"n": 0}

            def published() -> bool:
                self.check_bridges()
                got["n"] = asyncio.run(_end_offset(self.broker.bootstrap, topic))
                return got["n"] >= wanted

            poll(published, 900, "large publish",
                 lambda: f"{got['n']:,}/{wanted:,} records on {topic}; " + rss(),
                 interval=1.0, every=10)
            self.res.bridge["large_publish_s"] = time.monotonic() - t_ready
        self.large_audit()
        znodes = self.res.bridge["large_znodes"]
        req = self.res.phases["large_scan"]["bridge_zk_requests"]["zk-a"]
        self.res.bridge |= {
            "large_capture_s": log_time(ready) - log_time(scan),
            "large_rss_ready_mb": rss_ready,
            "large_rss_published_mb": rss_mb(pid),
            "large_rss_peak_mb": rss_mb(pid, "VmHWM"),
            "large_zk_requests_per_znode": round(req / znodes, 4) if znodes else None,
        }
        br = self.res.bridge
        rss_scan = br["large_rss_after_scan_mb"]
        say(f"{a.name}: scan of {znodes:,} znodes {br['large_scan_s']:.1f} s "
            f"({znodes / br['large_scan_s']:,.0f}/s); scan_done → bridge_ready "
            f"{br['large_capture_s']:.1f} s; RSS {fmt(rss_scan)} MB after the scan, "
            f"{fmt(br['large_rss_ready_mb'])} MB when ready, "
            f"peak {fmt(br['large_rss_peak_mb'])} MB (through publishing all, "
            f"{br['large_publish_s']:.1f} s after ready)")

    def large_audit(self) -> None:
        """One periodic audit of the large subtree, all of it replicated (``audit_interval``):
        its time, and the bridge's memory through it."""
        a = self.a
        assert a.proc is not None
        before = len(a.log_events("audit_done"))
        self._write_config(a, audit_interval=1)
        os.kill(a.proc.pid, signal.SIGHUP)  # counted from the last audit or scan: due now
        poll(lambda: len(a.log_events("audit_done")) > before, 300, "periodic audit",
             interval=0.2)
        self._write_config(a)
        os.kill(a.proc.pid, signal.SIGHUP)
        done = a.log_events("audit_done")[before]
        self.res.bridge |= {"large_audit_s": float(done["seconds"]),
                            "large_audit_suspects": int(done["suspects"])}
        say(f"{a.name}: a periodic audit of {int(done['znodes']):,} znodes took "
            f"{float(done['seconds']):.2f} s ({int(done['suspects'])} suspects)")

    # -- 2b. steady state ------------------------------------------------
    def leaves(self, first_dir: int, count: int) -> list[str]:
        s = self.scale
        out = [f"{MOUNT}/d{d:03d}/l{i:03d}" for d in range(first_dir, s.dirs)
               for i in range(s.leaves)]
        if len(out) < count:
            raise BenchError(f"only {len(out)} leaves from d{first_dir:03d}; need {count}")
        return out[:count]

    def steady(self, again: bool = False) -> None:
        """``again``: the same updates once more (new values), on servers that just did them."""
        n, a, b = self.scale.steady, self.a, self.b
        name, tag = ("steady_again", "v1b") if again else ("steady", "v1")
        step(f"Steady state{' again' if again else ''}: {n:,} updates to existing znodes in "
             f"{a.name}, as fast as async set (batched client)")
        paths = self.leaves(0, n)
        want = {p: value(tag, i) for i, p in enumerate(paths)}
        # Only the last update is watched: B applies A's writes in A's order
        # (the ordered log), so the last visible means all are, and all are
        # checked right after. Watching all 5,000 cost B's server a read per
        # update and the bench about a third of a core, on the same 2 cores.
        w = self.watcher(b.fast, paths[-1:])
        w.expect({paths[-1]: want[paths[-1]]})
        with self.phase(name, requests=True):
            t0 = time.monotonic()
            write_s = pipelined(lambda i: a.fast.set_async(paths[i], want[paths[i]]), n)
            say(f"{a.name}: {n:,} updates written in {write_s:.2f} s "
                f"({n / write_s:,.0f}/s); waiting for {b.name}…")
            wait_event(w.done, 600, "steady-state replication",
                       lambda: f"{b.name} does not show the last update yet")
            elapsed = w.seen_at[paths[-1]] - t0
        w.close()
        stale = [p for p, got in zip(paths, read_values(b.fast, paths), strict=True)
                 if got != want[p]]
        if stale:
            raise BenchError(f"{b.name} showed A's last update before {len(stale):,} earlier "
                             f"ones (first {stale[0]}): origin order broken")
        per_s = n / elapsed
        req = self.res.phases[name]["bridge_zk_requests"]
        per = {k: round(v / n, 3) for k, v in req.items()}
        vs_multi = per_s / self.res.raw["zk_async_multi_per_s"]
        if again:
            self.res.bridge |= {"steady_again_per_s": per_s, "steady_again_vs_multi": vs_multi}
        else:
            self.res.bridge |= {
                "steady_updates": n, "steady_s": elapsed, "steady_per_s": per_s,
                "steady_write_per_s": n / write_s, "steady_zk_requests_per_update": per,
                "steady_requests_a": per["zk-a"], "steady_requests_b": per["zk-b"],
                "steady_vs_multi": vs_multi}
        say(f"{b.name} shows all {n:,} final values after {elapsed:.2f} s "
            f"({per_s:,.0f} updates/s end to end, {vs_multi:.3f}x multi); the bridges' "
            "ZooKeeper requests per update: " + ", ".join(f"{k} {v}" for k, v in per.items()))

    # -- 2c. latency ---------------------------------------------------
    def latency(self) -> None:
        s, a, b = self.scale, self.a, self.b
        n, rate = s.latency_writes, s.latency_rate
        # Distinct paths: a later write to the same path could hide an earlier one.
        paths = self.leaves(s.dirs // 2, n)
        w = self.watcher(b.fast, paths)
        self.warm_up(w, paths)
        step(f"Latency: {n} writes in {a.name} at {rate:.0f}/s, each timed until visible "
             f"in {b.name}")
        for r in (a, b):
            r.server.four_letter("srst")  # the servers' own latency figures, this phase only
        with self.phase("latency", requests=True):
            started, wall, issued_s = self.timed_writes(w, paths, "v2", rate)
        w.close()
        ms = [(w.seen_at[p] - started[p]) * 1000 for p in paths]
        lat = {f"p{q}": percentile(ms, q) for q in (50, 95, 99)}
        lat["max"] = max(ms)
        lat["mean"] = statistics.fmean(ms)
        req = self.res.phases["latency"]["bridge_zk_requests"]
        per = {k: round(v / n, 3) for k, v in req.items()}
        self.res.bridge |= {
            "latency_ms": lat, "latency_p99_ms": lat["p99"],
            "latency_rate_achieved": (n - 1) / issued_s if issued_s > 0 else None,
            "latency_zk_requests_per_update": per,
            "latency_requests_a": per["zk-a"], "latency_requests_b": per["zk-b"],
        }
        say("  " + ", ".join(f"{k} {v:.1f} ms" for k, v in lat.items())
            + f"; writes issued at {self.res.bridge['latency_rate_achieved']:.0f}/s; bridges' "
            "ZooKeeper requests per update: " + ", ".join(f"{k} {v}" for k, v in per.items()))
        self.latency_split(paths, started, wall, w.seen_at)
        self.server_latency()

    def timed_writes(self, w: Watcher, paths: Sequence[str], tag: str, rate: float
                     ) -> tuple[dict[str, float], dict[str, float], float]:
        """Write a new value to each of ``paths`` in A at ``rate``/s; return once B shows all.

        Returns when each write was sent (monotonic and wall clock) and the
        seconds that sending them took.
        """
        started: dict[str, float] = {}
        wall: dict[str, float] = {}
        sent: list[Any] = []
        t0 = time.monotonic()
        for i, p in enumerate(paths):
            pause = t0 + i / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            data = value(tag, i)
            w.expect({p: data})
            started[p], wall[p] = time.monotonic(), time.time()
            # Asynchronous, so a slow reply never holds back the schedule.
            sent.append(self.a.zk.set_async(p, data))
        issued_s = time.monotonic() - t0
        for ar in sent:
            ar.get(timeout=60)
        wait_event(w.done, 120, f"{tag} writes",
                   lambda: f"{len(paths) - w.remaining}/{len(paths)} visible in {self.b.name}")
        return started, wall, issued_s

    def warm_up(self, w: Watcher, paths: Sequence[str]) -> None:
        """The latency phase's load, not measured, until the servers' JIT compilers are idle.

        A production ensemble has run for days; these servers started minutes
        ago. Measured per thread (2026-12-03), their compilers still took
        0.6 to 1.2 core-seconds of every 5 s at 200 writes/s after the catch-up,
        for 15 to 20 s, and the p99 of those seconds was 112 to 226 ms against
        63 to 73 ms once they were done. Each round's p99 is kept: the cold figure.
        """
        rate = self.scale.latency_rate
        size = min(len(paths), int(rate * WARM_ROUND_S))
        jvms = self.jvms()
        step(f"Warm-up: {size} writes at {rate:.0f}/s per round, until the JIT compilers of "
             f"{', '.join(jvms)} use under {WARM_IDLE_JIT_S:.2f} s of CPU in "
             f"{WARM_IDLE_ROUNDS} rounds in a row (at most {WARM_MAX_ROUNDS} rounds)")
        rounds: list[dict[str, Any]] = []
        warm = False
        idle = 0  # idle rounds in a row
        t0 = time.monotonic()
        for k in range(WARM_MAX_ROUNDS):
            part = [paths[(k * size + j) % len(paths)] for j in range(size)]
            before = {name: jit_seconds(pid) for name, pid in jvms.items()}
            started, _, _ = self.timed_writes(w, part, f"w{k}", rate)
            jit = {name: round(jit_seconds(pid) - before[name], 2) for name, pid in jvms.items()}
            p99 = percentile([(w.seen_at[p] - started[p]) * 1000 for p in part], 99)
            rounds.append({"p99_ms": p99, "jit_s": jit})
            say(f"  round {k + 1}: p99 {p99:.0f} ms; JIT compiling "
                + ", ".join(f"{name} {v:.2f} s" for name, v in jit.items()))
            idle = idle + 1 if max(jit.values(), default=0.0) < WARM_IDLE_JIT_S else 0
            warm = idle >= WARM_IDLE_ROUNDS
            if warm and k + 1 >= WARM_MIN_ROUNDS:
                break
        self.res.bridge["latency_warmup"] = {
            "seconds": time.monotonic() - t0, "rounds": rounds, "warm": warm,
            "p99_first_ms": rounds[0]["p99_ms"]}
        if not warm:
            say(f"  the compilers were still busy after {len(rounds)} rounds: the figures "
                "below include them")
        time.sleep(1.0)  # the warm-up's outbox deletes land before the phase counts requests

    def server_latency(self) -> None:
        """What each ZooKeeper server saw of its own latency in the phase (``mntr``, reset
        before it): a tail there is the servers' (a slow fsync), not the bridges'."""
        keys = ("zk_p99_updatelatency", "zk_max_latency", "zk_max_fsynctime")
        got: dict[str, dict[str, float]] = {}
        for r in (self.a, self.b):
            stats = mntr(r.server)
            got[f"zk-{r.name[-1]}"] = {k: float(stats[k]) for k in keys if k in stats}
        self.res.bridge["latency_server_ms"] = got
        say("  the servers' own, in ms: " + "; ".join(
            f"{k} update p99 {fmt(v.get('zk_p99_updatelatency'))}, any request max "
            f"{fmt(v.get('zk_max_latency'))}, fsync max {fmt(v.get('zk_max_fsynctime'))}"
            for k, v in got.items()))

    def latency_split(self, paths: Sequence[str], started: Mapping[str, float],
                      wall: Mapping[str, float], seen: Mapping[str, float]) -> None:
        """Where the latency goes: A's side (write → record stamped by A's producer) and
        B's side (→ visible in B), and how A batched the writes, read back from A's topic."""
        wanted = {p[len(MOUNT):]: value("v2", i) for i, p in enumerate(paths)}
        topic = f"zkbridge.critical.{self.a.name}"
        got = asyncio.run(_published(self.broker.bootstrap, topic, wanted))
        if len(got) < len(paths):
            say(f"  only {len(got)}/{len(paths)} latency writes found on {topic}; no split")
            return
        a_ms, b_ms = [], []
        for p in paths:
            ts_ms, _batch = got[p[len(MOUNT):]]
            total = (seen[p] - started[p]) * 1000
            a_side = ts_ms - wall[p] * 1000
            a_ms.append(a_side)
            b_ms.append(total - a_side)
        batches = {b for _, b in got.values()}
        split = {"origin_p50_ms": percentile(a_ms, 50), "origin_p99_ms": percentile(a_ms, 99),
                 "receiver_p50_ms": percentile(b_ms, 50), "receiver_p99_ms": percentile(b_ms, 99),
                 "batches": len(batches), "events_per_batch": len(paths) / len(batches)}
        self.res.bridge["latency_split"] = split
        say(f"  split: write → published by A p50 {split['origin_p50_ms']:.0f} / p99 "
            f"{split['origin_p99_ms']:.0f} ms; published → visible in B p50 "
            f"{split['receiver_p50_ms']:.0f} / p99 {split['receiver_p99_ms']:.0f} ms; "
            f"{len(batches)} batches ({split['events_per_batch']:.1f} writes each)")

    # -- 2d. conflict storm ----------------------------------------------
    def conflicts(self) -> None:
        s, a, b = self.scale, self.a, self.b
        n = s.conflict_paths
        step(f"Conflict storm: {n:,} paths written concurrently in {a.name} and {b.name}")
        # Steady's paths again: new values on both sides make every one a conflict.
        paths = self.leaves(0, n)
        wa, wb = self.watcher(a.fast, paths), self.watcher(b.fast, paths)
        val_a = {p: value("ca", i) for i, p in enumerate(paths)}
        val_b = {p: value("cb", i) for i, p in enumerate(paths)}
        before = sum(len(r.log_events("conflict_resolved")) for r in (a, b))
        go = threading.Barrier(3)
        t_start: dict[str, float] = {}
        errors: list[BaseException] = []

        def write(r: Region, vals: dict[str, bytes]) -> None:
            try:
                go.wait()
                t_start[r.name] = time.monotonic()
                pipelined(lambda i: r.zk.set_async(paths[i], vals[paths[i]]), n)
            except BaseException as exc:
                errors.append(exc)

        def converged() -> bool:
            self.check_bridges()
            va, vb = wa.values, wb.values
            return all(va.get(p) == vb.get(p) and va.get(p) in (val_a[p], val_b[p])
                       for p in paths)

        def differing() -> str:
            va, vb = wa.values, wb.values
            return f"{sum(va.get(p) != vb.get(p) for p in paths):,}/{n:,} paths still differ"

        settings = [load_settings(r.config) for r in (a, b)]
        with self.phase("conflicts"):
            threads = [threading.Thread(target=write, args=(r, v))
                       for r, v in ((a, val_a), (b, val_b))]
            for t in threads:
                t.start()
            go.wait()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            t0 = min(t_start.values())
            t_conv = poll(converged, 600, "conflict storm", differing, interval=0.02)
            say(f"values identical in both regions after {t_conv - t0:.2f} s; "
                "running verify (meta=True)…")
            diffs: list[Any] = []
            verify_s = 0.0
            for _ in range(60):
                v0 = time.monotonic()
                diffs = asyncio.run(verify(settings, meta=True))
                verify_s = time.monotonic() - v0
                if not diffs:
                    break
                say(f"  … verify: {len(diffs)} differences, e.g. {diffs[0].path} "
                    f"{diffs[0].detail}; again")
                time.sleep(0.5)
            else:
                raise BenchError(f"verify still reports {len(diffs)} differences")
            t_verified = time.monotonic()
        wa.close()
        wb.close()
        events = 2 * n
        resolved = sum(len(r.log_events("conflict_resolved")) for r in (a, b)) - before
        self.res.bridge |= {
            "conflict_events": events,
            "conflict_converged_s": t_conv - t0,
            "conflict_per_s": events / (t_conv - t0),
            "conflict_verified_s": t_verified - t0,
            "conflict_verify_pass_s": verify_s,
            "conflicts_logged": resolved,
        }
        say(f"verify identical {t_verified - t0:.2f} s after the first write (its last "
            f"pass took {verify_s:.2f} s); {resolved:,} conflict_resolved log lines")

    # -- summary ---------------------------------------------------------
    def jit_share(self, phase: str) -> str:
        """Each JVM's compiler threads during ``phase``, in % of one core."""
        ph = self.res.phases.get(phase)
        if not ph or not ph["wall_s"]:
            return "n/a"
        return ", ".join(f"{k} {v / ph['wall_s']:.0%}" for k, v in ph["jit_s"].items())

    def summarise(self) -> list[Row]:
        raw, br = self.res.raw, self.res.bridge
        rows = [
            Row("raw: ZooKeeper sync create", raw.get("zk_sync_create_per_s"), "ops/s",
                note="kazoo, one at a time"),
            *(row for label in ("kazoo", "batched") for row in (
                Row(f"raw: ZooKeeper async set_data, {label}",
                    raw.get(f"zk_async_set_per_s_{label}"), "ops/s", note=f"{WINDOW} in flight"),
                Row(f"raw: ZooKeeper async 2-op multi, {label}",
                    raw.get(f"zk_async_multi_per_s_{label}"), "ops/s", note="check + set_data"),
                Row(f"raw: ZooKeeper async get, {label}", raw.get(f"zk_async_get_per_s_{label}"),
                    "ops/s",
                    note="stock kazoo" if label == "kazoo" else "the bridge's batched socket I/O"),
            )),
            Row(f"raw: Kafka produce ({self.kind})", raw.get("kafka_produce_per_s"), "records/s",
                note=f"{RECORD_BYTES} B, acks=all"),
            Row(f"raw: Kafka consume ({self.kind})", raw.get("kafka_consume_per_s"), "records/s"),
            Row("raw: Kafka produce→consume p50", raw.get("kafka_latency_p50_ms"), "ms",
                note="one record at a time; the bridge's fetch_max_wait_ms"),
        ]
        multi, get_, set_ = (raw.get(k) for k in ("zk_async_multi_per_s", "zk_async_get_per_s",
                                                   "zk_async_set_per_s"))
        if "zkshell_mirror_s" in br:
            zn = br["zkshell_znodes"]
            rows.append(Row(f"zk-shell mirror: {zn:,} znodes A→B", br["zkshell_mirror_s"], "s",
                            note=f"{zn / br['zkshell_mirror_s']:,.0f} znodes/s wall; it reports "
                                 f"{fmt(br['zkshell_mirror_own_s'])} s without start-up"))
        elif "zkshell_error" in br:
            rows.append(Row("zk-shell mirror", None, "s", note=br["zkshell_error"][:60]))
        if "catch_up_s" in br:
            zn = br["catch_up_znodes"]
            req = br["catch_up_zk_requests_per_znode"]
            vs_zks = ""
            if br.get("zkshell_mirror_s"):
                vs_zks = f"{br['catch_up_vs_zkshell']:.2f}x faster than zk-shell"
            rows += [
                Row(f"catch-up: {zn:,} znodes A→B, end to end", br["catch_up_per_s"], "znodes/s",
                    ratio(br["catch_up_per_s"], multi, "multi"),
                    f"{br['catch_up_s']:.1f} s from both bridges' start"),
                Row("catch-up: wall time", br["catch_up_s"], "s", vs_zks,
                    "bridge process start → B holds every znode"),
                Row("catch-up again: a second tree, at the end", br.get("catch_up_again_s"),
                    "s", f"{br['catch_up_again_vs_zkshell']:.2f}x faster than zk-shell again"
                    f" ({br['zkshell_again_s']:.1f} s)"
                    if br.get("catch_up_again_vs_zkshell") else "",
                    f"servers compiling: {self.jit_share('catch_up_again')} (first catch-up: "
                    f"{self.jit_share('catch_up')})"),
                Row("scan: A's scan_done seconds", br["scan_s"], "s",
                    ratio(br["scan_znodes"] / br["scan_s"] if br["scan_s"] else None, get_,
                          "get"),
                    f"{br['scan_znodes']:,} znodes; reads + watches only"),
                Row("scan → ready: A's startup capture", br["startup_capture_s"], "s",
                    ratio(br["scan_znodes"] / br["startup_capture_s"]
                          if br["startup_capture_s"] > 0 else None, multi, "multi"),
                    "scan_done → bridge_ready; publishing starts meanwhile"),
                Row("bridge A RSS after the scan", br["rss_a_after_scan_mb"], "MB"),
                Row("catch-up: ZooKeeper requests/znode A / B", req["zk-a"], "req",
                    note=f"B: {req['zk-b']:.3f}; the bridges' sessions only (cons)"),
            ]
        if "floor_both_s" in br:
            both, mirror = br["floor_both_s"], br.get("zkshell_mirror_s")
            rows += [
                Row("floor: origin's ZooKeeper work alone", br["floor_a_s"], "s",
                    note=f"read {br['floor_read_s']:.2f} s, getACL {br['floor_acl_s']:.2f} s, "
                         "then metadata + outbox multis"),
                Row("floor: receiver's ZooKeeper work alone", br["floor_b_s"], "s",
                    note="each znode and its metadata znode, a multi per batch"),
                Row("floor: both at once, bare client", both, "s",
                    f"{mirror / both:.2f}x zk-shell at best" if mirror else "",
                    f"servers' CPU {br['floor_both_server_cpu_s']:.2f} s; catch-up "
                    f"{br['catch_up_s'] / both:.2f}x this" if "catch_up_s" in br else ""),
            ]
        if "steady_s" in br:
            req = br["steady_zk_requests_per_update"]
            rows += [
                Row(f"steady: {br['steady_updates']:,} updates A→B", br["steady_per_s"],
                    "updates/s",
                    ratio(br["steady_per_s"], set_, "set_data") + ", "
                    + ratio(br["steady_per_s"], multi, "multi"),
                    f"{br['steady_s']:.2f} s until B shows all final values"),
                Row("steady: ZooKeeper requests/update A", req["zk-a"], "req",
                    note="bridge A's session only (cons), counted until quiet"),
                Row("steady: ZooKeeper requests/update B", req["zk-b"], "req",
                    note="bridge B's session only (cons), counted until quiet"),
            ]
            if "steady_again_per_s" in br:
                rows.append(Row("steady again: the same updates, new values",
                                br["steady_again_per_s"], "updates/s",
                                ratio(br["steady_again_per_s"], multi, "multi"),
                                f"servers compiling: {self.jit_share('steady_again')} "
                                f"(first time: {self.jit_share('steady')})"))
            if "steady_floor_both_s" in br:
                fl = br["steady_floor_both_s"]
                rows.append(Row("floor: steady's ZooKeeper work, both at once", fl, "s",
                                f"{br['steady_floor_vs_multi']:.3f}x multi at best",
                                f"alone: A {br['steady_floor_a_s']:.2f} s, B "
                                f"{br['steady_floor_b_s']:.2f} s; servers' CPU "
                                f"{br['steady_floor_server_cpu_s']:.2f} s"))
        if "latency_ms" in br:
            lat = br["latency_ms"]
            rate = br.get("latency_rate_achieved") or 0.0
            rows += [Row(f"latency A→B {k} at {rate:.0f} writes/s", lat[k], "ms",
                         ratio(lat[k], raw.get("kafka_latency_p50_ms"), "Kafka p50")
                         if k == "p50" else "",
                         "set_async() in A → seen in B (data watch)" if k == "p50" else "")
                     for k in ("p50", "p95", "p99", "max")]
            req = br["latency_zk_requests_per_update"]
            rows += [Row(f"latency phase: ZooKeeper requests/update {k[-1].upper()}", v, "req",
                         note="the bridge's session only (cons)") for k, v in req.items()]
            warm = br.get("latency_warmup")
            if warm:
                rows.append(Row("latency warm-up before it (not measured)", warm["seconds"], "s",
                                note=f"{len(warm['rounds'])} rounds until the JIT compilers "
                                f"{'were idle' if warm['warm'] else 'had run out of rounds'}; "
                                f"p99 {warm['p99_first_ms']:.0f} ms in the first"))
            rows += [Row(f"latency phase: {k}'s own update p99", v.get(
                "zk_p99_updatelatency"), "ms", note=f"any request max "
                f"{fmt(v.get('zk_max_latency'))} ms, fsync max {fmt(v.get('zk_max_fsynctime'))} "
                "ms (mntr)") for k, v in br.get("latency_server_ms", {}).items()]
        if "large_scan_s" in br:
            zn = br["large_znodes"]
            cap = br.get("large_capture_s")
            rows += [
                Row(f"large: full scan of {zn:,} znodes", br["large_scan_s"], "s",
                    ratio(zn / br["large_scan_s"], get_, "get"), "A's scan_done seconds"),
                Row("large: scan_done → bridge_ready", cap, "s",
                    ratio(zn / cap if cap else None, multi, "multi"),
                    "metadata + outbox for every znode" if cap else "the bridge never got ready"),
                Row("large: bridge RSS after scan / ready", br["large_rss_after_scan_mb"], "MB",
                    note=f"ready: {fmt(br.get('large_rss_ready_mb'))} MB"),
                Row("large: bridge_ready → all published", br.get("large_publish_s"), "s",
                    note="end offset of A's topic (its few heartbeats included)"),
                Row("large: bridge peak RSS (VmHWM)", br["large_rss_peak_mb"], "MB",
                    note="through publishing" if cap else "as of scan_done"),
                Row("large: ZooKeeper requests/znode", br.get("large_zk_requests_per_znode"),
                    "req", note="start → ready, bridge A's session (cons)"),
                Row("large: a periodic audit", br.get("large_audit_s"), "s",
                    note="every znode listed, against the metadata cache; no lock held"),
            ]
        if "conflict_per_s" in br:
            rows += [
                Row(f"conflict storm: {br['conflict_events']:,} writes on "
                    f"{br['conflict_events'] // 2:,} paths", br["conflict_per_s"], "events/s",
                    ratio(br["conflict_per_s"], multi, "multi"),
                    f"{br['conflict_converged_s']:.2f} s to identical values"),
                Row("conflict storm: until verify identical", br["conflict_verified_s"], "s",
                    note=f"incl. one verify --meta pass of {br['conflict_verify_pass_s']:.1f} s;"
                         f" {br['conflicts_logged']:,} conflicts logged"),
            ]
        return rows


def target_lines(bridge: Mapping[str, Any]) -> list[str]:
    """Issue #6's targets that this run measured, each with its figure and verdict."""
    out = []
    for key, op, limit, what in TARGETS:
        got = bridge.get(key)
        if got is None:
            continue
        ok = got >= limit if op == ">=" else got <= limit
        out.append(f"{'met   ' if ok else 'MISSED'}  {what}: {fmt(got)} (target {op} {limit:g})")
    return out


def cpu_table(phases: Mapping[str, Any]) -> str:
    """Per phase: wall seconds, the load average at its end, each process's CPU (% of one core)."""
    names: list[str] = []
    for ph in phases.values():
        names += [k for k in ph["cpu_s"] if k not in names]
    head = ["phase", "wall s", "load", *names]
    cells = [head]
    for name, ph in phases.items():
        wall = ph["wall_s"] or 1e-9
        load = ph.get("load")
        cells.append([name, f"{ph['wall_s']:.1f}", "" if load is None else f"{load:.1f}",
                      *(f"{ph['cpu_s'][k] / wall:.0%}" if k in ph["cpu_s"] else "" for k in names)])
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join("  ".join(f"{c[i]:>{widths[i]}}" if i else f"{c[i]:<{widths[i]}}"
                               for i in range(len(head))) for c in cells)


async def _raw_topic_and_producer(bootstrap: str, topic: str, idempotence: bool) -> Any:
    """A one-partition topic and a started producer with the bridge's settings
    (bridge/kafka/producing.py: acks=all, linger 2 ms, its batch size), so the raw ceiling is
    comparable."""
    # aiokafka is imported here so that --help stays quick.
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from bridge.kafka.values import PRODUCE_BATCH_BYTES

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                enable_idempotence=idempotence, linger_ms=2,
                                max_batch_size=PRODUCE_BATCH_BYTES)
    await producer.start()
    return producer


async def _kafka_rates(bootstrap: str, n: int, idempotence: bool) -> tuple[float, float]:
    # aiokafka is imported here so that --help stays quick.
    from aiokafka import AIOKafkaConsumer, TopicPartition

    topic = "bench.raw"
    producer = await _raw_topic_and_producer(bootstrap, topic, idempotence)
    payload = bytes(range(256)) + b"12345678"
    assert len(payload) == RECORD_BYTES
    try:
        await (await producer.send(topic, payload))  # metadata and connection: not timed
        t0 = time.perf_counter()
        futures = []
        for _ in range(n - 1):
            futures.append(await producer.send(topic, payload))
            if len(futures) >= 20_000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
        produce_s = time.perf_counter() - t0
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest",
                                max_partition_fetch_bytes=2 * 1_048_576,
                                fetch_max_bytes=8 * 1_048_576)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        got = 0
        t0 = time.perf_counter()
        deadline = time.monotonic() + 120
        while got < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            got += sum(len(msgs) for msgs in batches.values())
            if time.monotonic() > deadline:
                raise BenchError(f"consumed only {got:,}/{n:,} records in 120 s")
        consume_s = time.perf_counter() - t0
    finally:
        await consumer.stop()
    return produce_s, consume_s


async def _kafka_latency(bootstrap: str, samples: int, gap: float, idempotence: bool
                         ) -> list[float]:
    """Milliseconds from send() to the record arriving at a waiting consumer, one at a time."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from bridge.kafka.values import FETCH_MAX_WAIT_MS

    topic = "bench.latency"
    producer = await _raw_topic_and_producer(bootstrap, topic, idempotence)
    # The bridge's own bound on a fetch's wait: tansu answers a fetch only
    # when that timer runs out, so aiokafka's default (500 ms) would measure
    # the timer, not the broker.
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest",
                                fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
    await consumer.start()
    out = []
    try:
        await (await producer.send(topic, b"warm-up"))
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        payload = bytes(RECORD_BYTES)
        for _ in range(samples):
            await asyncio.sleep(gap)
            t0 = time.perf_counter()
            await producer.send(topic, payload)
            while not await consumer.getmany(tp, timeout_ms=5000):
                if time.perf_counter() - t0 > 30:
                    raise BenchError("a produced record did not arrive within 30 s")
            out.append((time.perf_counter() - t0) * 1000)
    finally:
        await consumer.stop()
        await producer.stop()
    return out


async def _end_offset(bootstrap: str, topic: str) -> int:
    """Records on partition 0 of ``topic`` so far (its end offset)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()


async def _published(bootstrap: str, topic: str, wanted: Mapping[str, bytes]
                     ) -> dict[str, tuple[float, int | None]]:
    """Per wanted (path, data): the producer timestamp (ms) and batch of its record on ``topic``."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from bridge import codec
    from bridge.errors import BridgeError

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    out: dict[str, tuple[float, int | None]] = {}
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        await consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + 60
        while await consumer.position(tp) < end and time.monotonic() < deadline:
            for msgs in (await consumer.getmany(tp, timeout_ms=1000, max_records=5000)).values():
                for m in msgs:
                    try:
                        ev = codec.decode(m.value)
                    except BridgeError:
                        continue
                    if wanted.get(ev.path) == ev.data:
                        out[ev.path] = (float(m.timestamp), ev.batch)
    finally:
        await consumer.stop()
    return out


def _json_default(obj: object) -> object:
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(type(obj).__name__)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller counts: about one minute")
    size.add_argument("--large", action="store_true",
                      help="a 100,000-znode subtree: the bridge's full scan time and RSS only")
    ap.add_argument("--json", metavar="FILE", type=Path, help="also write the numbers as JSON")
    ap.add_argument("--broker", choices=("tansu", "kafka"), default="tansu",
                    help="tansu (memory only, default) or Apache Kafka (KRaft, from the jars "
                         "scripts/bootstrap resolves)")
    ap.add_argument("--dirs", type=int, metavar="N",
                    help="directories of 100 leaves for the catch-up tree (default 100, "
                         "quick 10); the later steps need at least 50 (quick 10)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work directory (configs, server and bridge logs)")
    ap.add_argument("--profile", metavar="DIR", type=Path,
                    help="run both bridges under cProfile, writing DIR/<region>.prof "
                         "(DIR/<region>-again.prof for the second catch-up) "
                         "(slows the bridges: for finding bottlenecks, not for numbers)")
    args = ap.parse_args(argv)
    scale = QUICK if args.quick else LARGE if args.large else FULL
    mode = "quick" if args.quick else "large" if args.large else "full"
    if args.dirs:
        scale = replace(scale, dirs=args.dirs)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        args.profile = args.profile.resolve()
    workdir = Path(tempfile.mkdtemp(prefix="zkbridge-bench-"))
    bench = Bench(workdir, scale, args.profile, args.broker)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started = time.monotonic()
    failed: str | None = None
    say(f"zkbridge bench ({mode}, broker {args.broker}), "
        f"work directory {workdir}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    try:
        bench.up()
        bench.raw_zookeeper()
        if args.large:
            bench.large()
        else:
            bench.raw_kafka()
            bench.catch_up()
            bench.steady()
            bench.steady(again=True)
            bench.steady_floor()
            bench.latency()
            bench.conflicts()
            bench.catch_up_again()
    except KeyboardInterrupt:
        failed = "interrupted"
    except (BenchError, AssertionError) as exc:
        failed = str(exc)
    except Exception as exc:
        failed = f"{type(exc).__name__}: {exc}"
        import traceback

        traceback.print_exc()
    finally:
        step("Stopping everything")
        bench.res.bridge["loadavg_end"] = os.getloadavg()
        bench.down()
        keep = args.keep or failed is not None
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        say("stopped" + (f"; logs kept in {workdir}" if keep else ""))
    total = time.monotonic() - started
    rows = bench.summarise()
    step(f"Results ({mode} run on {args.broker}, {total:.0f} s in all)")
    print(table(rows))
    print("\nCPU per phase, % of one core (2 cores in all):\n" + cpu_table(bench.res.phases))
    targets = target_lines(bench.res.bridge)
    if targets:
        print("\nIssue #6 targets measured in this run:\n" + "\n".join(targets))
    if bench.res.bridge.get("foreign_processes"):
        print(f"\nnote: {bench.res.bridge['foreign_processes']} server/bridge processes from "
              "outside this run shared the machine; compare ratios rather than absolute rates.")
    if args.json:
        doc = {
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "mode": mode,
            "broker": args.broker,
            "scale": asdict(scale),
            "total_s": round(total, 1),
            "failed": failed,
            "raw": bench.res.raw,
            "bridge": bench.res.bridge,
            "phases": bench.res.phases,
            "rows": [asdict(r) for r in rows],
            "targets": targets,
        }
        args.json.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
        print(f"\nwrote {args.json}")
    if failed:
        print(f"\nbench failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
