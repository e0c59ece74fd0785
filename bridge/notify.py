"""systemd's notify protocol (sd_notify) without libsystemd: one datagram per message.

Does nothing when ``NOTIFY_SOCKET`` is unset, so the daemon runs the same
under systemd, in a container or in a terminal.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("bridge.notify")


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        e = env if env is not None else dict(os.environ)
        addr = e.get("NOTIFY_SOCKET", "")
        # A leading '@' names a socket in the abstract namespace.
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = e.get("WATCHDOG_USEC", "")
        pid = e.get("WATCHDOG_PID", "")
        wanted = usec.isdigit() and (not pid or pid == str(os.getpid()))
        # Ping at half the deadline, as sd_watchdog_enabled(3) recommends.
        self.watchdog_interval = int(usec) / 2e6 if wanted else None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log.warning("sd_notify_failed", error=str(exc))

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def extend_start(self, status: str, seconds: float) -> None:
        """Still starting, and moving: allow ``seconds`` more (systemd >= 236; older ones
        ignore it and keep to TimeoutStartSec)."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}", f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def reloading(self) -> None:
        self.send("RELOADING=1")
