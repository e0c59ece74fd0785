"""The service process: logging, signals, running the bridge, exit status."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import structlog

from bridge import log as logsetup
from bridge.config import Settings
from bridge.engine import Bridge
from bridge.errors import BridgeError, MassDeleteError

log = structlog.get_logger("bridge.daemon")


async def _serve(settings: Settings, allow_mass_delete: bool) -> int:
    bridge = Bridge(settings, allow_mass_delete=allow_mass_delete)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stopper(bridge, sig))
    try:
        await bridge.run()
    except MassDeleteError as exc:
        log.error("mass_delete_refused", error=str(exc))
        return 1
    except BridgeError as exc:
        log.error("bridge_stopped", error=str(exc), error_type=type(exc).__name__,
                  hint="see the error; systemd restarts the service")
        return 1
    log.info("bridge_stopped_cleanly")
    return 0


def _stopper(bridge: Bridge, sig: signal.Signals) -> Callable[[], None]:
    def stop() -> None:
        log.info("signal_received", signal=sig.name, action="draining and stopping")
        bridge.stop()

    return stop


def run(settings: Settings, *, allow_mass_delete: bool = False) -> int:
    logsetup.configure(settings.log_format, settings.log_level)
    return asyncio.run(_serve(settings, allow_mass_delete))
