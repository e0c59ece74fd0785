"""A stand-in for systemd's end of sd_notify: a datagram socket a bridge is pointed at
with ``NOTIFY_SOCKET``, and every message it sent, in order."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.harness.procs import wait_for


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.received: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.2)

    def drain(self) -> list[str]:
        """Every message so far (the ones waiting are read first)."""
        while True:
            try:
                self.received.append(self._sock.recv(4096).decode())
            except TimeoutError:
                return self.received

    def wait_ready(self, status: str, timeout: float = 30) -> str:
        """The READY=1 message, which must say ``status``."""
        wait_for(lambda: any("READY=1" in m for m in self.drain()), timeout,
                 message=lambda: f"no READY=1; heard {self.received[-3:]}")
        ready = next(m for m in self.received if "READY=1" in m)
        assert status in ready, ready
        return ready

    def close(self) -> None:
        self._sock.close()
