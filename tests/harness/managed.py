"""One ``with`` protocol for every server the harness runs: start on entry, close on exit."""

from __future__ import annotations

from typing import Any, Self


class Managed:
    def start(self) -> Self:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
