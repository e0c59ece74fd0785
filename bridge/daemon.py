"""The service process: logging, signals, systemd notification, metrics, exit status."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import structlog

from bridge import certexpiry
from bridge import log as logsetup
from bridge.config import Settings
from bridge.configload import load_settings
from bridge.engine import Bridge
from bridge.errors import BridgeError, ConfigError, DuplicateRegionError, MassDeleteError
from bridge.metrics import MetricsServer
from bridge.notify import Notifier

log = structlog.get_logger("bridge.daemon")

MASS_DELETE_EXIT = 3  # scripts/zkbridge@.service: RestartPreventExitStatus=3 4
# Another ensemble publishes as this region (a copied config): restarting
# would only make the two fight over the topic; an operator must rename one.
DUPLICATE_REGION_EXIT = 4
# A stop must end the process within 2 s whatever it is waiting for (a retry
# loop against an unreachable Kafka, a client's own timeouts). The bridge gets
# STOP_GRACE to drain and close; then its task is cancelled (ZooKeeper writes
# are single multis, so nothing is half-written, and whatever was not acked
# stays in the outbox); at STOP_DEADLINE the process exits regardless.
STOP_GRACE = 0.6
STOP_DEADLINE = 1.5
# How long systemd waits for the next sign of a moving start, once the start
# outlasts TimeoutStartSec (EXTEND_TIMEOUT_USEC); the unit's WatchdogSec.
START_EXTEND_S = 30.0
# Allocations (less frees) before a young-generation collection; the default is 700.
GC_THRESHOLD = 20_000


class Daemon:
    def __init__(self, settings: Settings, allow_mass_delete: bool) -> None:
        self.settings = settings
        self.bridge = Bridge(settings, allow_mass_delete=allow_mass_delete)
        self.notifier = Notifier()
        self.bridge.on_role = self._on_role
        self.bridge.start_up.on_progress = self._on_start_progress
        self._ready_sent = False
        self._run_task: asyncio.Task[None] | None = None
        self._stopping = False

    def _on_role(self, role: str) -> None:
        text = f"{role} in region {self.settings.region}"
        if role == "leader":
            text += ", caught up"
        if self._ready_sent:
            self.notifier.status(text)
        else:
            self.notifier.ready(text)
            self._ready_sent = True

    def _on_start_progress(self, text: str, moving: bool) -> None:
        if not self._ready_sent and self.bridge.start_up.waits_on_outage():
            # Restarted, it would wait the same; meanwhile it applies and publishes
            # all the rest. The alert and `status` name the partitions.
            if self.notifier.enabled:
                log.info("systemd_ready_before_caught_up", doing=text,
                         hint="bridge_ready follows once these partitions have a leader")
            self.notifier.ready(text)
            self._ready_sent = True
        elif moving and not self._ready_sent:
            # A leader is READY once caught up: a large subtree's start outlasts
            # TimeoutStartSec, and systemd would kill it, restart it, and kill it
            # again. Extended while it moves; one that stands still (waiting on
            # Kafka, stuck) is timed out and restarted as before.
            self.notifier.extend_start(text, START_EXTEND_S)
        else:
            self.notifier.status(text)

    def _stop(self, sig: signal.Signals) -> Callable[[], None]:
        def stop() -> None:
            log.info("signal_received", signal=sig.name, action="draining and stopping")
            if self._stopping:
                return
            self._stopping = True
            self.notifier.stopping()
            self.bridge.stop()
            loop = asyncio.get_running_loop()
            loop.call_later(STOP_GRACE, self._cancel_run)
            # A thread, not the loop: the loop itself may be what is stuck.
            deadline = threading.Timer(STOP_DEADLINE, _exit_now)
            deadline.daemon = True
            deadline.start()

        return stop

    def _cancel_run(self) -> None:
        if self._run_task is not None and not self._run_task.done():
            log.warning("stop_grace_exceeded", grace_s=STOP_GRACE,
                        action="cancelling; unpublished changes stay in the outbox")
            self._run_task.cancel()

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
        loop.set_exception_handler(_unawaited)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop(sig))
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        self.bridge.certificates = certexpiry.announce(self.settings)
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
        self._run_task = asyncio.ensure_future(self.bridge.run())
        try:
            await self._run_task
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        except MassDeleteError as exc:
            # A distinct status: restarting cannot help, the operator must decide.
            log.error("mass_delete_refused", error=str(exc))
            return MASS_DELETE_EXIT
        except DuplicateRegionError as exc:
            log.error("duplicate_region", error=str(exc))
            print(f"zkbridge: {exc}", file=sys.stderr)
            return DUPLICATE_REGION_EXIT
        except BridgeError as exc:
            if self._stopping and exc.retriable:
                # Asked to stop while retrying: the retry's last failure is not the story.
                log.info("bridge_stopped_while_retrying", error=str(exc))
                return 0
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


def _tune_gc() -> None:
    """Fewer, cheaper cycle collections.

    A capture or apply of thousands of events allocates millions of small
    objects that reference counting frees; the default thresholds still ran
    hundreds of collections over them (about a fifth of the bridge's CPU at
    the bench's catch-up, gc.callbacks). What the imports made lives as long
    as the process: frozen, later collections skip it.
    """
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
    gc.enable()  # off while the entry point imported (bridge.__main__)


def _unawaited(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's report of an error nobody awaited, for the connection errors only as a
    line at debug level.

    aiokafka never awaits a connection's own end: the TLS alert that closed
    one (a certificate the broker refused) came back as a traceback when the
    future was collected, after the bridge had named the refusal in one line.
    Anything else is reported as asyncio would.
    """
    exc = context.get("exception")
    if isinstance(exc, OSError) and "never retrieved" in str(context.get("message", "")):
        log.debug("connection_error_unawaited", error=f"{type(exc).__name__}: {exc}")
        return
    loop.default_exception_handler(context)


def _exit_now() -> None:
    log.warning("stop_deadline_exceeded", deadline_s=STOP_DEADLINE,
                action="exiting now; unpublished changes stay in the outbox")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def run(settings: Settings, *, allow_mass_delete: bool = False) -> int:
    logsetup.configure(settings.log_format, settings.log_level)
    _tune_gc()
    return asyncio.run(Daemon(settings, allow_mass_delete).serve())
