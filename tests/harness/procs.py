"""Child processes for the test harness: start with a log file, stop by pid, wait on conditions.

Every process started here is remembered until it is stopped, so an interpreter
that dies without running fixture finalizers still kills what it started
(atexit is the last resort, not the plan).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_live: dict[int, subprocess.Popen[bytes]] = {}
_live_lock = threading.Lock()


_handed_out: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Picked below the kernel's ephemeral range: a port from that range can be
    taken as the local port of any outgoing connection (a client of the
    servers started meanwhile) before the server meant to listen on it binds
    it, which failed chaos rounds with "address already in use".
    """
    low, high = 10000, _ephemeral_start()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, high) if high > low else 0
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen: int = s.getsockname()[1]
        _handed_out.add(chosen)
        return chosen
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        fallback: int = s.getsockname()[1]
        return fallback


def spawn(
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` with stdout and stderr appended to `log_path`.

    A new session keeps a Ctrl-C at the terminal from reaching the child before
    the fixtures have had a chance to stop it in order.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    with _live_lock:
        _live[proc.pid] = proc
    return proc


def alive(pid: int) -> bool:
    """Is ``pid`` a live process (one we may not signal counts as live)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stopped(pid: int) -> bool:
    """Is ``pid`` stopped (SIGSTOP): state T in /proc?"""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] in "Tt"


def stop(
    proc: subprocess.Popen[bytes] | int,
    sig: int = signal.SIGTERM,
    deadline: float = 10.0,
) -> int | None:
    """Send `sig` to one process by pid, SIGKILL it if still alive after `deadline` s.

    Returns the exit code when the process is our child (None otherwise or if it
    was already reaped). Never signals anything but this pid.
    """
    if isinstance(proc, int):
        with _live_lock:
            child = _live.get(proc)
        if child is None:
            _stop_foreign(proc, sig, deadline)
            return None
        proc = child
    try:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=deadline)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=deadline)
        return proc.returncode
    finally:
        with _live_lock:
            _live.pop(proc.pid, None)


def _stop_foreign(pid: int, sig: int, deadline: float) -> None:
    # Not our child: we cannot reap it, only watch it disappear.
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    end = time.monotonic() + deadline
    while alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def kill9(proc: subprocess.Popen[bytes] | int) -> int | None:
    """SIGKILL (a crash: no shutdown hooks, no flush) and reap."""
    return stop(proc, signal.SIGKILL, deadline=10.0)


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Poll `predicate` until it returns something truthy; return that value.

    Exceptions from the predicate count as "not yet" (a server still starting
    refuses connections); the last one is chained to the AssertionError raised
    at the deadline so the cause is visible.
    """
    end = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = predicate()
        except Exception as exc:
            last_exc = exc
        else:
            if result:
                return result
        if time.monotonic() >= end:
            text = message() if callable(message) else message
            raise AssertionError(f"{text} (after {timeout:.1f}s)") from last_exc
        time.sleep(interval)


def log_tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log file, for error messages."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    return "\n".join(data.splitlines()[-lines:])


def live_pids() -> list[int]:
    """Pids started by `spawn` and not yet stopped (tests assert this is empty)."""
    with _live_lock:
        return [pid for pid, p in _live.items() if p.poll() is None]


@atexit.register
def _kill_leftovers() -> None:
    with _live_lock:
        procs = list(_live.values())
    for p in procs:
        stop(p, signal.SIGKILL, deadline=5.0)
