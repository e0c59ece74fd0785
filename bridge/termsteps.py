"""How a leadership term runs its steps: two at once, and none past a lost session."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from bridge.errors import FencedError

A = TypeVar("A")
B = TypeVar("B")


async def both(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Run two steps at once; the first failure cancels the other and is raised as it is.

    (A TaskGroup would wrap it in an ExceptionGroup, which the term's
    handlers of fenced and retriable errors would not recognise.)
    """
    one, two = asyncio.ensure_future(first), asyncio.ensure_future(second)
    try:
        a, b = await asyncio.gather(one, two)  # a list at run time, whatever the stubs say
        return a, b
    finally:
        for task in (one, two):
            task.cancel()
        await asyncio.gather(one, two, return_exceptions=True)


async def unless_lost(step: Awaitable[None], lost: asyncio.Event) -> None:
    """Run a step of a term; the session lost meanwhile cancels it and ends the term.

    The candidate znode died with the session: another bridge may lead
    already. Going on would read on a new session what that leader wrote
    since (chaos seed 793460 took its stored position for lost records)
    until a fenced write failed: safe, but needless and misleading.
    """
    work = asyncio.ensure_future(step)
    waiting = asyncio.ensure_future(lost.wait())
    try:
        await asyncio.wait({work, waiting}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise FencedError("the ZooKeeper session was lost while the term started")
    work.result()
