"""One ``with`` protocol for every server the harness runs: start on entry, close on exit."""

from __future__ import annotations

import signal
import subprocess
from typing import Any, Self

from tests.harness import procs


class Managed:
    def start(self) -> Self:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class ServerProcess(Managed):
    """A server run as one child process of ours, stopped or killed by its pid."""

    _proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, deadline: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``deadline`` seconds."""
        if self._proc is not None:
            procs.stop(self._proc, signal.SIGTERM, deadline)
            self._proc = None

    def kill(self) -> None:
        """SIGKILL: a crash, no shutdown hooks."""
        if self._proc is not None:
            procs.kill9(self._proc)
            self._proc = None
