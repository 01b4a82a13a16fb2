from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
import pytest

from harvester.clock import Clock, FakeClock, SystemClock

pytestmark = pytest.mark.anyio


def waker(clock: FakeClock, woke: list[float]) -> Callable[[float], Awaitable[None]]:
    """A task that sleeps until ``deadline``, then notes the virtual time it woke at."""

    async def sleeper(deadline: float) -> None:
        await clock.sleep_until(deadline)
        woke.append(clock.monotonic())

    return sleeper


def test_both_clocks_satisfy_the_protocol() -> None:
    clocks: list[Clock] = [SystemClock(), FakeClock()]
    assert len(clocks) == 2


async def test_system_clock_times_and_sleeps() -> None:
    clock = SystemClock()
    assert abs(clock.wall() - time.time()) < 1.0
    start = clock.monotonic()
    with anyio.fail_after(2):
        await clock.sleep_until(start - 10)  # already past: returns at once
        await clock.sleep_until(start + 0.02)
    assert clock.monotonic() >= start + 0.02


async def test_fake_clock_starts_where_told_and_wall_moves_in_step() -> None:
    clock = FakeClock(start=50.0, wall_start=1_000_000.0)
    assert clock.monotonic() == 50.0
    assert clock.wall() == 1_000_000.0
    clock.advance(2.5)
    assert clock.monotonic() == 52.5
    assert clock.wall() == 1_000_002.5
    with pytest.raises(ValueError):
        clock.advance(-1)


async def test_advance_wakes_due_sleepers_in_deadline_order_ties_by_arrival() -> None:
    clock = FakeClock()
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, deadline: float) -> None:
        await clock.sleep_until(deadline)
        woke.append((name, clock.monotonic()))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for name, deadline in [("c", 1003.0), ("a", 1001.0), ("b1", 1002.0), ("b2", 1002.0)]:
                tg.start_soon(sleeper, name, deadline)
            await clock.settle()
            assert clock.sleepers == 4
            assert clock.next_deadline == 1001.0
            clock.advance(1.5)
            await clock.settle()
            assert woke == [("a", 1001.5)]
            clock.advance(10)
    assert [name for name, _ in woke] == ["a", "b1", "b2", "c"]
    assert clock.sleepers == 0


async def test_advance_to_next_jumps_exactly_to_each_deadline() -> None:
    clock = FakeClock()
    woke: list[float] = []
    sleeper = waker(clock, woke)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for d in (1007.0, 1000.5, 1003.0):
                tg.start_soon(sleeper, d)
            assert await clock.advance_to_next() == 1000.5
            assert await clock.advance_to_next() == 1003.0
            assert await clock.advance_to_next() == 1007.0
            with pytest.raises(RuntimeError, match="no task is sleeping"):
                await clock.advance_to_next()
    assert woke == [1000.5, 1003.0, 1007.0]  # in virtual time: fail_after(5) bounds the real


async def test_sleep_until_a_past_deadline_does_not_register_a_sleeper() -> None:
    clock = FakeClock()
    with anyio.fail_after(5):
        await clock.sleep_until(999.0)
        await clock.sleep_until(1000.0)
    assert clock.sleepers == 0


async def test_cancelled_sleeper_is_skipped() -> None:
    clock = FakeClock()
    woke: list[float] = []
    sleeper = waker(clock, woke)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async with anyio.create_task_group() as doomed:
                doomed.start_soon(sleeper, 1001.0)
                tg.start_soon(sleeper, 1005.0)
                await clock.settle()
                doomed.cancel_scope.cancel()
            await clock.settle()
            assert clock.sleepers == 1
            assert clock.next_deadline == 1005.0
            assert await clock.advance_to_next() == 1005.0
    assert woke == [1005.0]


async def test_run_until_steps_through_every_wakeup() -> None:
    clock = FakeClock()
    ticks: list[float] = []

    async def ticker() -> None:
        # Each tick schedules the next one, so a single jump to 1010 would skip them.
        for _ in range(5):
            await clock.sleep_until(clock.monotonic() + 2.0)
            ticks.append(clock.monotonic())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            await clock.run_until(1007.0)
            assert ticks == [1002.0, 1004.0, 1006.0]
            assert clock.monotonic() == 1007.0
            await clock.run_until(1100.0)
    assert ticks == [1002.0, 1004.0, 1006.0, 1008.0, 1010.0]


async def test_repr_shows_time_and_sleepers() -> None:
    clock = FakeClock()
    assert "now=1000.000000" in repr(clock)
    assert "sleepers=0" in repr(clock)
    assert repr(SystemClock()) == "SystemClock()"


async def test_settle_waits_for_callbacks_already_scheduled() -> None:
    """A finished child wakes its task group through a callback the loop has queued, not run
    yet: every task looks blocked at that instant, but the run is not settled."""
    clock = FakeClock()
    after: list[int] = []

    async def parent(i: int) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.lowlevel.checkpoint)
        after.append(i)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(parent, i)
            await clock.settle()
            assert sorted(after) == [0, 1, 2]
