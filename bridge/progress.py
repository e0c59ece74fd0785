"""Progress of long one-shot commands (``verify``, ``resync``): bars on a terminal, else nothing.

The commands report through :class:`Progress` whatever their output goes to;
only a terminal on stderr gets bars (znodes done, rate, time left), so pipes,
cron mails and ``--json`` consumers see just the result.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID


class Task:
    """One counted piece of work; a no-op when progress is not shown."""

    def __init__(self, bars: RichProgress | None, task: TaskID | None) -> None:
        self._bars, self._task = bars, task

    def advance(self, n: int = 1) -> None:
        if self._bars is not None and self._task is not None:
            self._bars.advance(self._task, n)

    def total(self, n: int | None) -> None:
        """Set once known (or estimated): the bar and the time left follow it."""
        if self._bars is not None and self._task is not None:
            self._bars.update(self._task, total=n)

    def done(self) -> None:
        if self._bars is not None and self._task is not None:
            task = self._bars.tasks[self._task]
            speed = task.speed
            # Setting a total resets rich's rate samples: keep the rate measured.
            self._bars.update(self._task, total=task.completed)
            task.finished_speed = task.finished_speed or speed


class Progress:
    """``with Progress(sys.stderr) as p: t = p.task("us-east critical")``."""

    def __init__(self, stream: TextIO | None) -> None:
        self._bars: RichProgress | None = None
        if stream is not None and stream.isatty():
            # rich only where bars are drawn: the daemon imports this module
            # (resync) and would pay for rich at every start.
            from bridge.progressbars import bars

            self._bars = bars(stream)

    @property
    def shown(self) -> bool:
        return self._bars is not None

    def task(self, description: str, total: int | None = None) -> Task:
        if self._bars is None:
            return Task(None, None)
        return Task(self._bars, self._bars.add_task(description, total=total))

    def __enter__(self) -> Progress:
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bars is not None:
            self._bars.stop()


QUIET = Progress(None)
