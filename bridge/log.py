"""Logging set-up: structlog key/value events, JSON for journald, console on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    out = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: structlog.typing.Processor = (
        # Plain tracebacks (format_exc_info), whether or not structlog saw rich (bridge/__init__).
        structlog.dev.ConsoleRenderer(colors=out.isatty(),
                                      exception_formatter=structlog.dev.plain_traceback)
        if console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # kazoo and aiokafka log through the standard library: keep their warnings,
    # in one line each, on the same stream.
    logging.basicConfig(
        level=logging.WARNING,
        stream=out,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def quiet() -> None:
    """For one-shot commands: their output is the answer; libraries must not add to it."""
    configure("console", "error")
    logging.getLogger().setLevel(logging.CRITICAL)
