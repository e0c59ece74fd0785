"""Progress bars: only on a terminal, with counts and a rate."""

from __future__ import annotations

import io

from bridge.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_quiet_unless_a_terminal() -> None:
    stream = io.StringIO()
    with Progress(stream) as p:
        task = p.task("us-east critical", 10)
        task.advance(10)
        task.done()
    assert not p.shown and stream.getvalue() == ""
    assert not Progress(None).shown


def test_a_terminal_gets_counts_and_a_rate_even_without_a_total() -> None:
    stream = Terminal()
    with Progress(stream) as p:
        known = p.task("eu-west critical", 4)
        unknown = p.task("us-east critical")
        for _ in range(4):
            known.advance()
            unknown.advance()
        unknown.done()
    out = stream.getvalue()
    assert p.shown
    assert "eu-west critical" in out and "4/4" in out
    assert "us-east critical" in out and "znodes/s" in out
