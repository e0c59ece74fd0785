"""The service process: logging, signals, systemd notification, metrics, exit status."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import structlog

from bridge import log as logsetup
from bridge.config import Settings, load_settings
from bridge.engine import Bridge
from bridge.errors import BridgeError, ConfigError, MassDeleteError
from bridge.metrics import MetricsServer
from bridge.notify import Notifier

log = structlog.get_logger("bridge.daemon")

MASS_DELETE_EXIT = 3  # scripts/zkbridge@.service: RestartPreventExitStatus=3


class Daemon:
    def __init__(self, settings: Settings, allow_mass_delete: bool) -> None:
        self.settings = settings
        self.bridge = Bridge(settings, allow_mass_delete=allow_mass_delete)
        self.notifier = Notifier()
        self.bridge.on_role = self._on_role
        self._ready_sent = False

    def _on_role(self, role: str) -> None:
        text = f"{role} in region {self.settings.region}"
        if role == "leader":
            text += ", caught up"
        if self._ready_sent:
            self.notifier.status(text)
        else:
            self.notifier.ready(text)
            self._ready_sent = True

    def _stop(self, sig: signal.Signals) -> Callable[[], None]:
        def stop() -> None:
            log.info("signal_received", signal=sig.name, action="draining and stopping")
            self.notifier.stopping()
            self.bridge.stop()

        return stop

    def _reload(self) -> None:
        self.notifier.reloading()
        source = self.settings.source
        try:
            new = load_settings(source)
        except ConfigError as exc:
            log.error("reload_rejected", config=source, problems=exc.problems,
                      hint="fix the file and reload again; the running settings are unchanged")
            self.notifier.ready("reload rejected: invalid config")
            return
        applied, restart = self.bridge.reload(new)
        logsetup.configure(new.log_format, new.log_level)
        self.settings = self.bridge.settings
        log.info("reloaded", config=source, applied=applied, needs_restart=restart)
        self.notifier.ready(f"reloaded; needs restart for: {', '.join(restart) or 'nothing'}")

    async def _watchdog(self, interval: float) -> None:
        while True:
            # The loop is alive if we get here; a wedged loop stops the pings
            # and systemd restarts us after WatchdogSec.
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop(sig))
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        metrics = None
        if self.settings.metrics_listen:
            metrics = MetricsServer(self.bridge, self.settings.metrics_listen)
            try:
                await metrics.start()
            except OSError as exc:
                log.error("metrics_listen_failed", address=self.settings.metrics_listen,
                          error=str(exc), hint="change metrics.listen or free the port")
                return 1
        dog = None
        if self.notifier.watchdog_interval:
            dog = asyncio.create_task(self._watchdog(self.notifier.watchdog_interval))
        try:
            await self.bridge.run()
        except MassDeleteError as exc:
            # A distinct status: restarting cannot help, the operator must decide.
            log.error("mass_delete_refused", error=str(exc))
            return MASS_DELETE_EXIT
        except BridgeError as exc:
            log.error("bridge_stopped", error=str(exc), error_type=type(exc).__name__,
                      hint="see the error; systemd restarts the service")
            return 1
        finally:
            if dog is not None:
                dog.cancel()
            if metrics is not None:
                await metrics.stop()
        log.info("bridge_stopped_cleanly")
        return 0


def run(settings: Settings, *, allow_mass_delete: bool = False) -> int:
    logsetup.configure(settings.log_format, settings.log_level)
    return asyncio.run(Daemon(settings, allow_mass_delete).serve())
