"""Time as a dependency: the real clock, and a fake one that tests move by hand.

Everything that waits on time (the rate limiter, the engine's lanes and drain, the replica's
lease and claims) takes a ``Clock``, so tests run the real code on virtual time and assert exact
wake-up times without sleeping. A wait is either a sleep (``sleep_until``, ``sleep``) or a
limit on a block (``move_on_at``, ``move_on_after``: a cancel scope that the clock cancels when
its deadline comes, and whose deadline may move); ``wait_for`` waits for an event with a limit.
``monotonic()`` is the one time base of every deadline; ``wall()`` is Unix time, needed only to
turn an HTTP-date ``Retry-After`` into a delay and to stamp records.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from types import TracebackType
from typing import Protocol

import anyio
import anyio.lowlevel

__all__ = ["Clock", "FakeClock", "SystemClock", "TimeLimit", "wait_for"]


class TimeLimit(Protocol):
    """A cancel scope whose deadline is on its clock's time base (``Clock.move_on_at``)."""

    deadline: float  #: settable: the block is cancelled once the clock reaches it

    @property
    def cancelled_caught(self) -> bool:
        """Whether the deadline (or ``cancel()``) ended the block."""
        ...

    def cancel(self) -> None: ...

    def __enter__(self) -> TimeLimit: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...


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

    async def sleep(self, seconds: float) -> None:
        """``sleep_until(monotonic() + seconds)``."""
        ...

    def move_on_at(self, deadline: float, *, shield: bool = False) -> TimeLimit:
        """A cancel scope that ends its block when ``monotonic()`` reaches ``deadline``."""
        ...

    def move_on_after(self, seconds: float, *, shield: bool = False) -> TimeLimit:
        """``move_on_at(monotonic() + seconds)``."""
        ...


async def wait_for(clock: Clock, event: anyio.Event, seconds: float) -> bool:
    """Wait for ``event`` at most ``seconds`` of ``clock``; whether it is set."""
    if not event.is_set():
        with clock.move_on_after(seconds):
            await event.wait()
    return event.is_set()


class _ScopeLimit:
    """What both limits pass straight to the ``anyio.CancelScope`` they wrap."""

    __slots__ = ("_scope",)

    _scope: anyio.CancelScope

    @property
    def cancelled_caught(self) -> bool:
        return self._scope.cancelled_caught

    def cancel(self) -> None:
        self._scope.cancel()


class _SystemLimit(_ScopeLimit):
    """``anyio.CancelScope`` with its deadline converted between ``time.monotonic()`` and the
    event loop's clock (the same on asyncio, not on trio)."""

    __slots__ = ("_offset",)

    def __init__(self, deadline: float, shield: bool) -> None:
        self._offset = anyio.current_time() - time.monotonic()
        self._scope = anyio.CancelScope(deadline=deadline + self._offset, shield=shield)

    @property
    def deadline(self) -> float:
        return self._scope.deadline - self._offset

    @deadline.setter
    def deadline(self, value: float) -> None:
        self._scope.deadline = value + self._offset

    def __enter__(self) -> _SystemLimit:
        self._scope.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return bool(self._scope.__exit__(exc_type, exc, tb))


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

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(time.monotonic() + seconds)

    def move_on_at(self, deadline: float, *, shield: bool = False) -> TimeLimit:
        return _SystemLimit(deadline, shield)

    def move_on_after(self, seconds: float, *, shield: bool = False) -> TimeLimit:
        return _SystemLimit(time.monotonic() + seconds, shield)

    def __repr__(self) -> str:
        return "SystemClock()"


class _Sleeper:
    __slots__ = ("alive", "deadline", "event")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.event = anyio.Event()
        self.alive = True

    def fire(self) -> None:
        self.event.set()


class _Timer:
    """A heap entry that cancels a scope when its deadline comes."""

    __slots__ = ("alive", "scope")

    def __init__(self, scope: anyio.CancelScope) -> None:
        self.scope = scope
        self.alive = True

    def fire(self) -> None:
        self.scope.cancel()


class _FakeLimit(_ScopeLimit):
    """A cancel scope that ``FakeClock.advance`` cancels once its deadline is reached."""

    __slots__ = ("_clock", "_deadline", "_timer")

    def __init__(self, clock: FakeClock, deadline: float, shield: bool) -> None:
        self._clock = clock
        self._deadline = deadline
        self._scope = anyio.CancelScope(shield=shield)
        self._timer: _Timer | None = None  #: armed while the block runs

    @property
    def deadline(self) -> float:
        return self._deadline

    @deadline.setter
    def deadline(self, value: float) -> None:
        self._deadline = value
        if self._timer is not None:
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._timer = _Timer(self._scope)
        if self._deadline <= self._clock.monotonic():
            self._scope.cancel()
        else:
            self._clock._push(self._deadline, self._timer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.alive = False  # skipped when its deadline comes up in the heap

    def __enter__(self) -> _FakeLimit:
        self._scope.__enter__()
        self._arm()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self._disarm()
        self._timer = None
        return bool(self._scope.__exit__(exc_type, exc, tb))


# A test whose tasks never stop yielding would otherwise make settle() spin forever.
_MAX_SETTLE_ROUNDS = 100_000


class FakeClock:
    """A clock that moves only when a test says so.

    Sleepers (and time limits, ``move_on_at``) are kept in a heap ordered by (deadline,
    arrival), each with its own event (or cancel scope), so ``advance()`` wakes them in
    deadline order (ties in arrival order) and a run is deterministic. Wall time moves in step
    with monotonic time.
    """

    __slots__ = ("_now", "_seq", "_sleepers", "_start", "_wall_start")

    def __init__(self, start: float = 1000.0, wall_start: float = 1_700_000_000.0) -> None:
        self._start = start
        self._now = start
        self._wall_start = wall_start
        self._seq = itertools.count()
        self._sleepers: list[tuple[float, int, _Sleeper | _Timer]] = []

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._wall_start + (self._now - self._start)

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            await anyio.lowlevel.checkpoint()
            return
        sleeper = _Sleeper(deadline)
        self._push(deadline, sleeper)
        try:
            await sleeper.event.wait()
        finally:
            # A cancelled sleeper stays in the heap; marking it dead lets advance_to_next()
            # skip its deadline instead of jumping time for nobody.
            sleeper.alive = False

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self._now + seconds)

    def move_on_at(self, deadline: float, *, shield: bool = False) -> TimeLimit:
        return _FakeLimit(self, deadline, shield)

    def move_on_after(self, seconds: float, *, shield: bool = False) -> TimeLimit:
        return _FakeLimit(self, self._now + seconds, shield)

    def _push(self, deadline: float, entry: _Sleeper | _Timer) -> None:
        heapq.heappush(self._sleepers, (deadline, next(self._seq), entry))

    @property
    def sleepers(self) -> int:
        """How many tasks are asleep (or in a time limit) on this clock now."""
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
                sleeper.fire()

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
        loop = asyncio.get_running_loop()
        for _ in range(_MAX_SETTLE_ROUNDS):
            await anyio.lowlevel.checkpoint()
            # A callback the loop has queued (a finished task waking its task group) can
            # still wake a task that looks blocked now: settled means none is left either.
            if not _queued(loop) and all(
                task is this or _blocked(task) for task in asyncio.all_tasks()
            ):
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


def _queued(loop: asyncio.AbstractEventLoop) -> bool:
    # The loop's queue of callbacks ready to run (private, as _fut_waiter below; a loop
    # without one counts as empty, which is what settle() assumed before looking).
    ready = getattr(loop, "_ready", None)
    return bool(ready)


def _blocked(task: asyncio.Task[object]) -> bool:
    # asyncio keeps no public "is this task waiting" flag; _fut_waiter is the future a task is
    # suspended on (what anyio's own wait_all_tasks_blocked inspects too).
    waiter = getattr(task, "_fut_waiter", None)
    return waiter is not None and not waiter.done()
