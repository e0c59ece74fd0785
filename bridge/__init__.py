"""zkbridge: keep ZooKeeper subtrees identical across regions through Kafka."""

import sys

__version__ = "0.1.0"


def _structlog_without_rich() -> None:
    """Import structlog as it would be without rich installed.

    structlog imports rich, when it is there, for its pretty console
    tracebacks and repr of locals. The bridge renders exceptions as plain
    text in both its log formats (``bridge.log``), yet paid about 50 ms of
    CPU at each start importing rich's traceback and pretty-printing modules;
    a bridge's start is on the critical path of a catch-up. rich is installed
    for the CLI's live tables and progress bars, which import it themselves.
    """
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # `import rich` raises ImportError
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


_structlog_without_rich()
