"""Time as a dependency: the real clock, and a fake one that tests move by hand.

Everything that waits on time (the rate limiter, the scheduler's lanes) takes a ``Clock`` so
tests can assert exact wake-up times without sleeping. ``monotonic()`` and ``sleep_until()``
share one time base; ``wall()`` is Unix time, needed only to turn an HTTP-date ``Retry-After``
into a delay and to stamp records.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol

import anyio
import anyio.lowlevel

__all__ = ["Clock", "FakeClock", "SystemClock"]


class Clock(Protocol):
    """What harvester needs from time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards; the base of every deadline."""
        ...

    def wall(self) -> float:
        """Unix time in seconds (for HTTP dates and timestamps, never for deadlines)."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``monotonic() >= deadline``; a checkpoint even if already past."""
        ...


class SystemClock:
    """The real clock.

    ``time.monotonic()`` rather than ``anyio.current_time()``: the latter needs a running event
    loop, and ``has_capacity()`` or a ``repr()`` may be called from synchronous code. On asyncio
    both are the same clock anyway.
    """

    __slots__ = ()

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            await anyio.lowlevel.checkpoint()
            return
        # The event loop may fire a timer up to its clock resolution early; callers rely on
        # "deadline reached" when this returns, so keep sleeping until it really is.
        while remaining > 0:
            await anyio.sleep(remaining)
            remaining = deadline - time.monotonic()

    def __repr__(self) -> str:
        return "SystemClock()"


class _Sleeper:
    __slots__ = ("alive", "deadline", "event")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.event = anyio.Event()
        self.alive = True


# A test whose tasks never stop yielding would otherwise make settle() spin forever.
_MAX_SETTLE_ROUNDS = 100_000


class FakeClock:
    """A clock that moves only when a test says so.

    Sleepers are kept in a heap ordered by (deadline, arrival), each with its own event, so
    ``advance()`` wakes them in deadline order (ties in arrival order) and a run is
    deterministic. Wall time moves in step with monotonic time.
    """

    __slots__ = ("_now", "_seq", "_sleepers", "_start", "_wall_start")

    def __init__(self, start: float = 1000.0, wall_start: float = 1_700_000_000.0) -> None:
        self._start = start
        self._now = start
        self._wall_start = wall_start
        self._seq = itertools.count()
        self._sleepers: list[tuple[float, int, _Sleeper]] = []

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._wall_start + (self._now - self._start)

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            await anyio.lowlevel.checkpoint()
            return
        sleeper = _Sleeper(deadline)
        heapq.heappush(self._sleepers, (deadline, next(self._seq), sleeper))
        try:
            await sleeper.event.wait()
        finally:
            # A cancelled sleeper stays in the heap; marking it dead lets advance_to_next()
            # skip its deadline instead of jumping time for nobody.
            sleeper.alive = False

    @property
    def sleepers(self) -> int:
        """How many tasks are asleep on this clock now."""
        return sum(1 for _, _, s in self._sleepers if s.alive)

    @property
    def next_deadline(self) -> float | None:
        """The earliest deadline anyone sleeps until, or None if nobody sleeps."""
        self._drop_dead()
        return self._sleepers[0][0] if self._sleepers else None

    def advance(self, dt: float) -> None:
        """Move time forward by ``dt`` and wake, in deadline order, everyone now due."""
        if not dt >= 0:
            raise ValueError(f"time only moves forward, got dt={dt!r}")
        self._now += dt
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, sleeper = heapq.heappop(self._sleepers)
            if sleeper.alive:
                sleeper.event.set()

    async def settle(self) -> None:
        """Let every runnable task run until all of them wait (on this clock or anything else)."""
        try:
            this = asyncio.current_task()
        except RuntimeError:
            this = None
        if this is None:
            # Not asyncio: trio's wait_all_tasks_blocked is exact and never sleeps for real.
            await anyio.wait_all_tasks_blocked()
            return
        # anyio's asyncio version sleeps 0.1 s of real time per busy round; tests here must not
        # really sleep, so yield to the loop instead until nothing is left to run.
        for _ in range(_MAX_SETTLE_ROUNDS):
            await anyio.lowlevel.checkpoint()
            if all(task is this or _blocked(task) for task in asyncio.all_tasks()):
                return
        raise RuntimeError("FakeClock.settle(): tasks kept running without ever waiting")

    async def advance_to_next(self) -> float:
        """Settle, jump to the earliest sleeper's deadline, wake it, settle; return the time.

        Raises RuntimeError when nobody sleeps on the clock: in a test that is a deadlock.
        """
        await self.settle()
        deadline = self.next_deadline
        if deadline is None:
            raise RuntimeError("FakeClock.advance_to_next(): no task is sleeping on this clock")
        self.advance(max(0.0, deadline - self._now))
        await self.settle()
        return self._now

    async def run_until(self, deadline: float) -> None:
        """Step through every wake-up up to ``deadline`` in order, then stop at ``deadline``."""
        await self.settle()
        while (nxt := self.next_deadline) is not None and nxt <= deadline:
            await self.advance_to_next()
        if deadline > self._now:
            self.advance(deadline - self._now)
        await self.settle()

    def _drop_dead(self) -> None:
        while self._sleepers and not self._sleepers[0][2].alive:
            heapq.heappop(self._sleepers)

    def __repr__(self) -> str:
        return (
            f"FakeClock(now={self._now:.6f}, sleepers={self.sleepers}, "
            f"next_deadline={self.next_deadline})"
        )


def _blocked(task: asyncio.Task[object]) -> bool:
    # asyncio keeps no public "is this task waiting" flag; _fut_waiter is the future a task is
    # suspended on (what anyio's own wait_all_tasks_blocked inspects too).
    waiter = getattr(task, "_fut_waiter", None)
    return waiter is not None and not waiter.done()
