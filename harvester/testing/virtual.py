"""Running the engine on virtual time: nothing sleeps for real, every run is the same.

A ``FakeClock`` moves from one wake-up to the next only once every task waits
(``FakeClock.settle``). Work in worker threads would break that (the clock could jump while a
store write is still running), so ``threads_inline`` runs ``anyio.to_thread.run_sync`` calls
on the event loop instead while it is active: the store's SQLite calls, the harvest's file
work. They are short on the small jobs of a test; the point is that every step happens at a
definite virtual instant.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from harvester.clock import FakeClock

__all__ = ["VirtualTimeout", "run_until", "threads_inline"]

T = TypeVar("T")


class VirtualTimeout(AssertionError):
    """The condition did not come true within the virtual time allowed."""


@contextmanager
def threads_inline() -> Iterator[None]:
    """While active, ``anyio.to_thread.run_sync(f, ...)`` runs ``f`` on the event loop."""
    real = anyio.to_thread.run_sync

    async def inline(func: Callable[..., T], *args: Any, **_: Any) -> T:
        await anyio.lowlevel.checkpoint()
        return func(*args)

    anyio.to_thread.run_sync = inline  # type: ignore[assignment]
    try:
        yield
    finally:
        anyio.to_thread.run_sync = real


async def run_until(clock: FakeClock, done: Callable[[], bool], *, within_s: float) -> float:
    """Move ``clock`` from wake-up to wake-up until ``done()``; the virtual seconds it took.

    Raises ``VirtualTimeout`` if it is not done within ``within_s`` virtual seconds, and
    ``RuntimeError`` if nothing waits on the clock while it is not done (a deadlock)."""
    start = clock.monotonic()
    await clock.settle()
    while not done():
        nxt = clock.next_deadline
        if nxt is None:
            raise RuntimeError("nothing waits on the clock, and the condition is not met")
        if nxt - start > within_s:
            raise VirtualTimeout(f"not done within {within_s:g} virtual seconds")
        await clock.advance_to_next()
    return clock.monotonic() - start
