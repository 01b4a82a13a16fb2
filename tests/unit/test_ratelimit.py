from __future__ import annotations

import email.utils
import itertools
import math
import random
import statistics

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harvester.clock import FakeClock, SystemClock
from harvester.metrics import Metrics
from harvester.ratelimit import (
    MAX_RETRY_AFTER_S,
    ProviderLimiter,
    TokenBucket,
    backoff_delay,
    parse_retry_after,
)

NOW_WALL = 1_700_000_000.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _MaxRandom(random.Random):
    """Always the top of the range, so adaptive delays are exact."""

    def uniform(self, a: float, b: float) -> float:
        return b


def _limiter(clock: FakeClock, **kw: object) -> ProviderLimiter:
    args: dict[str, object] = {
        "rate_per_s": 0.0,
        "burst": 1,
        "max_concurrency": 100,
        "clock": clock,
        "rng": random.Random(7),
    }
    args.update(kw)
    return ProviderLimiter("test", **args)  # type: ignore[arg-type]


async def _drive(clock: FakeClock, done: anyio.Event, *, max_sleepers: int = 1) -> None:
    """Jump fake time from wake-up to wake-up until ``done``; never more than one sleeper."""
    await clock.settle()
    while not done.is_set():
        assert clock.sleepers <= max_sleepers
        await clock.advance_to_next()


class Entries:
    """Requests that go through ``lim``'s slot and note the virtual time each got in;
    ``done`` is set once ``expected`` of them have."""

    def __init__(self, lim: ProviderLimiter, clock: FakeClock, expected: int = 1) -> None:
        self.lim, self.clock, self.expected = lim, clock, expected
        self.times: list[float] = []
        self.done = anyio.Event()

    async def request(self) -> None:
        async with self.lim.slot():
            self.times.append(self.clock.monotonic())
        if len(self.times) == self.expected:
            self.done.set()


# -- parse_retry_after ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("120", 120.0), ("0", 0.0), ("1.5", 1.5), (" 7 ", 7.0), (".25", 0.25), ("3.", 3.0)],
)
def test_retry_after_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value, now_wall=NOW_WALL) == expected


def test_retry_after_http_date_in_the_future() -> None:
    header = email.utils.formatdate(NOW_WALL + 90, usegmt=True)
    assert parse_retry_after(header, now_wall=NOW_WALL) == pytest.approx(90.0)


def test_retry_after_http_date_in_the_past_is_zero() -> None:
    header = email.utils.formatdate(NOW_WALL - 3600, usegmt=True)
    assert parse_retry_after(header, now_wall=NOW_WALL) == 0.0


def test_retry_after_date_without_zone_is_gmt() -> None:
    header = email.utils.formatdate(NOW_WALL + 30, usegmt=True).replace("GMT", "-0000")
    assert parse_retry_after(header, now_wall=NOW_WALL) == pytest.approx(30.0)


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", "soon", "-5", "+5", "1e3", "NaN", "inf", "0x10", "Wed, 99 Foo 20x"],
)
def test_retry_after_garbage_is_none(value: str | None) -> None:
    assert parse_retry_after(value, now_wall=NOW_WALL) is None


def test_retry_after_huge_values_are_capped() -> None:
    assert parse_retry_after("999999999", now_wall=NOW_WALL) == MAX_RETRY_AFTER_S
    assert parse_retry_after("9" * 400, now_wall=NOW_WALL) == MAX_RETRY_AFTER_S
    far = email.utils.formatdate(NOW_WALL + 10 * 86_400, usegmt=True)
    assert parse_retry_after(far, now_wall=NOW_WALL) == MAX_RETRY_AFTER_S
    assert parse_retry_after("600", now_wall=NOW_WALL, cap=300.0) == 300.0


# -- backoff_delay --------------------------------------------------------------------------


def test_backoff_stays_within_truncated_bounds() -> None:
    rng = random.Random(1)
    for attempt in range(12):
        ceiling = min(60.0, 1.0 * 2**attempt)
        for _ in range(500):
            d = backoff_delay(attempt, base=1.0, cap=60.0, rng=rng)
            assert 0.1 <= d < ceiling


def test_backoff_first_attempt_is_never_zero() -> None:
    # The Cognite SDK's int(0.5 * 2 * U[0,1)) retries after 0 s; ours is a float above a floor.
    rng = random.Random(2)
    delays = [backoff_delay(0, base=0.5, cap=30.0, rng=rng) for _ in range(10_000)]
    assert min(delays) >= 0.05
    assert max(delays) < 0.5


def test_backoff_cap_respected_for_huge_attempts() -> None:
    rng = random.Random(3)
    for attempt in (30, 64, 1100, 10_000):
        assert 0.1 <= backoff_delay(attempt, base=1.0, cap=60.0, rng=rng) < 60.0


def test_backoff_full_jitter_spreads_uniformly() -> None:
    rng = random.Random(4)
    delays = [backoff_delay(3, base=1.0, cap=60.0, rng=rng) for _ in range(20_000)]
    # Uniform over [0.1, 8): mean 4.05, about half below the midpoint, and well spread.
    assert statistics.fmean(delays) == pytest.approx(4.05, abs=0.1)
    below = sum(d < 4.05 for d in delays) / len(delays)
    assert below == pytest.approx(0.5, abs=0.02)
    assert statistics.pstdev(delays) == pytest.approx(7.9 / math.sqrt(12), rel=0.05)


def test_backoff_rejects_bad_arguments() -> None:
    rng = random.Random()
    with pytest.raises(ValueError):
        backoff_delay(-1, base=1.0, cap=60.0, rng=rng)
    with pytest.raises(ValueError):
        backoff_delay(0, base=0.0, cap=60.0, rng=rng)
    with pytest.raises(ValueError):
        backoff_delay(0, base=2.0, cap=1.0, rng=rng)


@given(
    attempt=st.integers(min_value=0, max_value=5000),
    base=st.floats(min_value=1e-3, max_value=100.0),
    extra=st.floats(min_value=0.0, max_value=1000.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_backoff_property(attempt: int, base: float, extra: float, seed: int) -> None:
    cap = base + extra
    d = backoff_delay(attempt, base=base, cap=cap, rng=random.Random(seed))
    assert base / 10 <= d <= cap
    assert d > 0


# -- TokenBucket ----------------------------------------------------------------------------


def test_bucket_starts_full_and_refills_at_rate() -> None:
    b = TokenBucket(rate_per_s=2.0, burst=3)
    t = 100.0
    for _ in range(3):
        assert b.time_until(1, t) == 0.0
        b.take(1, t)
    assert b.level(t) == 0.0
    assert b.time_until(1, t) == pytest.approx(0.5)
    assert b.level(t + 0.25) == pytest.approx(0.5)
    assert b.time_until(1, t + 0.25) == pytest.approx(0.25)
    b.take(1, t + 0.5)
    assert b.level(t + 0.5) == 0.0
    assert b.level(t + 100) == 3.0  # refill stops at burst


def test_bucket_refuses_what_it_does_not_have() -> None:
    b = TokenBucket(rate_per_s=1.0, burst=1)
    b.take(1, 0.0)
    with pytest.raises(ValueError, match="not available"):
        b.take(1, 0.5)
    with pytest.raises(ValueError, match="never fit"):
        b.time_until(2, 0.0)


def test_bucket_unlimited_and_small_burst() -> None:
    free = TokenBucket(rate_per_s=0.0, burst=0)
    assert free.unlimited
    for _ in range(1000):
        free.take(1, 0.0)
    assert free.time_until(1, 0.0) == 0.0
    assert TokenBucket(rate_per_s=-1.0).unlimited
    assert TokenBucket(rate_per_s=5.0, burst=0).burst == 1.0


def test_bucket_ignores_time_going_backwards() -> None:
    b = TokenBucket(rate_per_s=1.0, burst=2)
    b.take(1, 10.0)
    assert b.level(5.0) == 1.0
    assert b.level(11.0) == 2.0


# -- ProviderLimiter: admission -------------------------------------------------------------


@pytest.mark.anyio
async def test_requests_admitted_at_exact_rate_times_in_fifo_order() -> None:
    clock = FakeClock()
    lim = _limiter(clock, rate_per_s=4.0, burst=2)
    entered: list[tuple[int, float]] = []
    done = anyio.Event()
    n = 10

    async def request(i: int) -> None:
        async with lim.slot():
            entered.append((i, clock.monotonic()))
        if len(entered) == n:
            done.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(request, i)
            await _drive(clock, done)
    assert [i for i, _ in entered] == list(range(n))
    # Two from the burst at once, then one every 1/4 s.
    expected = [1000.0, 1000.0] + [1000.0 + 0.25 * k for k in range(1, n - 1)]
    assert [t for _, t in entered] == pytest.approx(expected)
    assert lim.stats().admitted == n


@pytest.mark.anyio
async def test_irregular_rate_times_do_not_drift() -> None:
    clock = FakeClock(start=1e6)
    lim = _limiter(clock, rate_per_s=3.0, burst=1)
    entries = Entries(lim, clock, 31)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(31):
                tg.start_soon(entries.request)
            await _drive(clock, entries.done)
    assert entries.times[-1] == pytest.approx(1e6 + 10.0, abs=1e-6)


@pytest.mark.anyio
async def test_max_concurrency_never_exceeded() -> None:
    clock = FakeClock()
    lim = _limiter(clock, max_concurrency=3)
    inside = 0
    peak = 0
    entered: list[float] = []
    done = anyio.Event()

    async def request() -> None:
        nonlocal inside, peak
        async with lim.slot():
            inside += 1
            peak = max(peak, inside)
            entered.append(clock.monotonic())
            await clock.sleep_until(clock.monotonic() + 1.0)
            inside -= 1
        if len(entered) == 10 and inside == 0:
            done.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(request)
            await _drive(clock, done, max_sleepers=3)
    assert peak == 3
    assert entered == [1000.0] * 3 + [1001.0] * 3 + [1002.0] * 3 + [1003.0]
    assert lim.stats().in_use == 0


@pytest.mark.anyio
async def test_unlimited_rate_admits_everyone_at_once() -> None:
    clock = FakeClock()
    lim = _limiter(clock, rate_per_s=0.0)
    entered: list[float] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(_enter_and_record, lim, clock, entered)
    assert entered == [1000.0] * 50


async def _enter_and_record(lim: ProviderLimiter, clock: FakeClock, out: list[float]) -> None:
    async with lim.slot():
        out.append(clock.monotonic())


@pytest.mark.anyio
async def test_works_on_the_real_clock() -> None:
    clock = SystemClock()
    lim = ProviderLimiter("real", rate_per_s=100.0, burst=1, max_concurrency=2, clock=clock)
    start = clock.monotonic()
    with anyio.fail_after(5):
        for _ in range(5):
            async with lim.slot():
                pass
    assert clock.monotonic() - start >= 0.04 - 1e-3


# -- ProviderLimiter: the gate -------------------------------------------------------------


@pytest.mark.anyio
async def test_closed_gate_holds_every_waiter_until_its_deadline() -> None:
    clock = FakeClock()
    lim = _limiter(clock, max_concurrency=1)
    entered: list[tuple[str, float]] = []
    done = anyio.Event()

    async def holder() -> None:
        async with lim.slot():
            entered.append(("holder", clock.monotonic()))
            await clock.sleep_until(1002.0)

    async def request(name: str) -> None:
        async with lim.slot():
            entered.append((name, clock.monotonic()))
        if len(entered) == 5:
            done.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await clock.settle()
            for name in "abcd":
                tg.start_soon(request, name)
            await clock.settle()
            clock.advance(1.0)
            assert lim.close_gate(5.0) == 1006.0
            # A later, shorter Retry-After never reopens the gate early.
            clock.advance(0.5)
            assert lim.close_gate(1.0) == 1006.0
            assert lim.gate_deadline == 1006.0
            assert not lim.has_capacity()
            await _drive(clock, done)
    assert entered[0] == ("holder", 1000.0)
    assert entered[1:] == [("a", 1006.0), ("b", 1006.0), ("c", 1006.0), ("d", 1006.0)]
    stats = lim.stats()
    assert stats.rate_limited == 2
    # Each of the four queued through the whole 5 s closure.
    assert stats.gate_wait_s == pytest.approx(20.0)
    assert lim.gate_deadline is None


@pytest.mark.anyio
async def test_longer_retry_after_extends_the_gate_for_a_sleeping_head() -> None:
    clock = FakeClock()
    lim = _limiter(clock)
    lim.close_gate(2.0)
    entries = Entries(lim, clock)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(entries.request)
            await clock.run_until(1001.0)
            assert lim.close_gate(9.0) == 1010.0
            await _drive(clock, entries.done)
    assert entries.times == [1010.0]


@pytest.mark.anyio
async def test_gate_also_stops_requests_waiting_for_a_token() -> None:
    clock = FakeClock()
    lim = _limiter(clock, rate_per_s=1.0, burst=1)
    entries = Entries(lim, clock, 3)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(entries.request)
            await clock.settle()
            lim.close_gate(5.0)  # the first request got a 429 right away
            await _drive(clock, entries.done)
    assert entries.times == [1000.0, 1005.0, 1006.0]


@pytest.mark.anyio
async def test_adaptive_gate_grows_with_consecutive_failures_and_resets() -> None:
    clock = FakeClock()
    lim = _limiter(clock, backoff_base=1.0, backoff_cap=10.0, rng=_MaxRandom())
    delays = []
    for _ in range(6):
        deadline = lim.close_gate(None)
        delays.append(deadline - clock.monotonic())
        clock.advance(deadline - clock.monotonic())
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert lim.stats().consecutive_failures == 6
    lim.note_success()
    assert lim.close_gate(None) - clock.monotonic() == 1.0


@pytest.mark.anyio
async def test_adaptive_gate_uses_seeded_full_jitter() -> None:
    clock = FakeClock()
    lim = _limiter(clock, backoff_base=1.0, backoff_cap=60.0, rng=random.Random(11))
    expect_rng = random.Random(11)
    for attempt in range(4):
        deadline = lim.close_gate(None)
        expected = backoff_delay(attempt, base=1.0, cap=60.0, rng=expect_rng)
        assert deadline - clock.monotonic() == pytest.approx(expected)
        assert deadline > clock.monotonic()
        clock.advance(deadline - clock.monotonic())


@pytest.mark.anyio
async def test_in_flight_429s_during_a_closed_gate_count_once() -> None:
    clock = FakeClock()
    lim = _limiter(clock, rng=_MaxRandom())
    first = lim.close_gate(None)
    for _ in range(5):
        assert lim.close_gate(None) == first
    assert lim.stats().consecutive_failures == 1
    assert lim.stats().rate_limited == 6


@pytest.mark.anyio
async def test_retry_after_values_are_sanitised() -> None:
    clock = FakeClock()
    lim = _limiter(clock)
    assert lim.close_gate(-5.0) == 1000.0
    assert lim.gate_deadline is None
    assert lim.close_gate(10 * 86_400.0) == 1000.0 + MAX_RETRY_AFTER_S


# -- ProviderLimiter: fairness, cancellation, introspection ----------------------------------


@pytest.mark.anyio
async def test_one_sleeper_however_many_waiters() -> None:
    clock = FakeClock()
    lim = _limiter(clock, rate_per_s=1.0, burst=1)
    lim.close_gate(3.0)
    count = 0
    done = anyio.Event()

    async def request() -> None:
        nonlocal count
        async with lim.slot():
            count += 1
        if count == 200:
            done.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(request)
            await clock.settle()
            assert clock.sleepers == 1
            assert lim.stats().waiting == 200
            await _drive(clock, done)
    assert clock.monotonic() == pytest.approx(1003.0 + 199)


@pytest.mark.anyio
async def test_cancelled_waiters_leave_the_queue_without_blocking_it() -> None:
    clock = FakeClock()
    lim = _limiter(clock, max_concurrency=1)
    entered: list[str] = []
    release = anyio.Event()

    async def holder() -> None:
        async with lim.slot():
            entered.append("holder")
            await release.wait()

    async def request(name: str) -> None:
        async with lim.slot():
            entered.append(name)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await clock.settle()
            async with anyio.create_task_group() as doomed:
                doomed.start_soon(request, "head")
                await clock.settle()
                tg.start_soon(request, "survivor")
                await clock.settle()
                doomed.start_soon(request, "tail")
                await clock.settle()
                assert lim.stats().waiting == 3
                doomed.cancel_scope.cancel()
            assert lim.stats().waiting == 1
            release.set()
    assert entered == ["holder", "survivor"]
    assert lim.stats().in_use == 0


@pytest.mark.anyio
async def test_cancelling_the_sleeping_head_passes_the_timer_on() -> None:
    clock = FakeClock()
    lim = _limiter(clock)
    lim.close_gate(4.0)
    entries = Entries(lim, clock)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async with anyio.create_task_group() as doomed:
                doomed.start_soon(entries.request)
                await clock.settle()
                tg.start_soon(entries.request)
                await clock.settle()
                doomed.cancel_scope.cancel()
            await _drive(clock, entries.done)
    assert entries.times == [1004.0]


@pytest.mark.anyio
async def test_exception_in_the_body_releases_the_slot() -> None:
    clock = FakeClock()
    lim = _limiter(clock, max_concurrency=1)
    with anyio.fail_after(5):
        with pytest.raises(RuntimeError):
            async with lim.slot():
                raise RuntimeError("boom")
        assert lim.has_capacity()


@pytest.mark.anyio
async def test_has_capacity_reflects_gate_tokens_slots_and_queue() -> None:
    clock = FakeClock()
    lim = _limiter(clock, rate_per_s=1.0, burst=2, max_concurrency=1)
    assert lim.has_capacity()
    with anyio.fail_after(5):
        async with lim.slot():
            assert not lim.has_capacity()  # every slot in use
        assert lim.has_capacity()
        async with lim.slot():
            pass
        assert not lim.has_capacity()  # bucket empty
        clock.advance(1.0)
        assert lim.has_capacity()
        lim.close_gate(2.0)
        assert not lim.has_capacity()  # gate closed
        clock.advance(2.0)
        assert lim.has_capacity()

        async with anyio.create_task_group() as tg:
            async with lim.slot():
                tg.start_soon(_enter_and_record, lim, clock, [])
                await clock.settle()
                assert lim.stats().waiting == 1
            # Slot free and tokens there, but someone queued first.
            assert not lim.has_capacity()


@pytest.mark.anyio
async def test_repr_is_one_debuggable_line() -> None:
    clock = FakeClock()
    lim = _limiter(clock, rate_per_s=2.0, burst=5, max_concurrency=4)
    lim.close_gate(5.0)
    text = repr(lim)
    assert "\n" not in text
    for part in ("'test'", "tokens=5.00/5", "rate=2/s", "in_use=0/4", "waiting=0"):
        assert part in text
    assert "gate=closed 5.00s" in text
    assert "failures=1" in text
    clock.advance(6)
    assert "gate=open" in repr(lim)
    assert "rate=unlimited" in repr(_limiter(clock, rate_per_s=0))


def test_constructor_validates() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match="max_concurrency"):
        _limiter(clock, max_concurrency=0)
    with pytest.raises(ValueError, match="rate_per_s"):
        _limiter(clock, rate_per_s=math.nan)
    with pytest.raises(ValueError, match="backoff_base"):
        _limiter(clock, backoff_base=0.0)
    with pytest.raises(ValueError, match="backoff_cap"):
        _limiter(clock, backoff_base=2.0, backoff_cap=1.0)
    assert "tokens=1.00/1" in repr(_limiter(clock, rate_per_s=1.0, burst=0))


# -- set_rate: a replica's share of a provider limit ----------------------------------------


@pytest.mark.anyio
async def test_set_rate_changes_the_pace_of_queued_requests() -> None:
    clock = FakeClock()
    lim = _limiter(clock, rate_per_s=4.0, burst=4, max_concurrency=8)
    entries = Entries(lim, clock, 8)

    # Three replicas now share the limit: a third of the rate, a third of the burst (its
    # saved tokens cut to the new burst at once), a third of the concurrency.
    lim.set_rate(4.0 / 3, 4 / 3, max_concurrency=2)
    assert (lim.rate_per_s, lim.max_concurrency) == (pytest.approx(4 / 3), 2)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(entries.request)
            await _drive(clock, entries.done)
    gaps = [b - a for a, b in itertools.pairwise(entries.times)]
    # 4/3 tokens kept: one now, the rest of a second token after (2/3) / (4/3) = 0.5 s
    assert entries.times[0] == 1000.0 and entries.times[1] == pytest.approx(1000.5)
    assert gaps[1:] == pytest.approx([0.75] * 6)


@pytest.mark.anyio
async def test_set_rate_back_to_unlimited_and_to_a_limit_again() -> None:
    clock = FakeClock()
    lim = _limiter(clock, rate_per_s=1.0, burst=1)
    lim.set_rate(0.0, 1)
    async with lim.slot(), lim.slot():
        pass  # unlimited: neither waits
    lim.set_rate(2.0, 2)
    assert lim.has_capacity()
    with pytest.raises(ValueError, match="max_concurrency"):
        lim.set_rate(1.0, 1, max_concurrency=0)
    assert "rate=2/s" in repr(lim)


# -- half-open gate --------------------------------------------------------------------------


class _Throttled(Exception):
    """Stands for the RateLimited a 429 raises inside the slot."""


@pytest.mark.anyio
async def test_reopened_gate_sends_one_probe_before_the_queue() -> None:
    clock = FakeClock()
    lim = _limiter(clock, max_concurrency=8)
    started: list[tuple[str, float]] = []
    probe_answered = anyio.Event()
    done = anyio.Event()

    async def request(name: str, answer_at: float | None) -> None:
        async with lim.slot():
            started.append((name, clock.monotonic()))
            if answer_at is not None:
                await clock.sleep_until(answer_at)
                probe_answered.set()
        if len(started) == 5:
            done.set()

    with anyio.fail_after(5):
        lim.close_gate(2.0)  # a 429 with Retry-After: 2 at t=1000
        async with anyio.create_task_group() as tg:
            tg.start_soon(request, "probe", 1003.0)
            await clock.settle()
            for name in "abcd":
                tg.start_soon(request, name, None)
            await clock.settle()
            await _drive(clock, done, max_sleepers=2)
    # The first waiter goes when the gate opens; the rest only once it was answered.
    assert started == [
        ("probe", 1002.0),
        ("a", 1003.0),
        ("b", 1003.0),
        ("c", 1003.0),
        ("d", 1003.0),
    ]


@pytest.mark.anyio
async def test_a_throttled_probe_keeps_the_gate_half_open() -> None:
    clock = FakeClock()
    lim = _limiter(clock, max_concurrency=8)
    lim.close_gate(1.0)
    clock.advance(1.0)
    assert lim.has_capacity()
    with pytest.raises(_Throttled):
        async with lim.slot():
            assert not lim.has_capacity()  # the probe is out: nobody else goes
            lim.close_gate(1.0)  # what the transport does on a second 429
            raise _Throttled
    clock.advance(1.0)
    # Still half-open: one probe at a time until one is answered without throttling.
    async with lim.slot():
        assert not lim.has_capacity()
    assert lim.has_capacity()
    async with lim.slot():
        assert lim.has_capacity()  # open fully: concurrency is back to 8


@pytest.mark.anyio
async def test_an_answer_to_a_request_sent_before_the_429_does_not_end_probing() -> None:
    clock = FakeClock()
    lim = _limiter(clock, max_concurrency=8)
    async with lim.slot():  # in flight when the gate closes ...
        lim.close_gate(1.0)
    # ... and answered: that says nothing about the provider after the 429.
    clock.advance(1.0)
    async with lim.slot():
        assert not lim.has_capacity()


@pytest.mark.anyio
async def test_a_probe_answered_after_a_newer_429_does_not_open_the_gate_fully() -> None:
    clock = FakeClock()
    lim = _limiter(clock, max_concurrency=8)
    lim.close_gate(1.0)
    clock.advance(1.0)
    async with lim.slot():
        lim.close_gate(1.0)  # another request's 429 arrives while the probe is out
    clock.advance(1.0)
    async with lim.slot():
        assert not lim.has_capacity()  # a new probe was needed
    assert lim.has_capacity()


def test_gate_wait_metric_counts_the_seconds_the_gate_stays_closed() -> None:
    """``harvester_retry_after_wait_seconds_total`` grows while the gate is shut, as time
    passes (not all at once when it closes), and stops when it opens."""
    clock = FakeClock()
    lim = _limiter(clock)
    metrics = Metrics()
    metrics.watch_gate("test", lim.closed_s)

    def reported() -> float | None:
        return metrics.registry.get_sample_value(
            "harvester_retry_after_wait_seconds_total", {"provider": "test"}
        )

    assert reported() == 0.0
    lim.close_gate(5.0, status=429)
    clock.advance(2.0)
    assert reported() == pytest.approx(2.0)
    clock.advance(1.0)
    lim.close_gate(4.0, status=429)  # extended to 7 s in all
    clock.advance(100.0)
    assert reported() == pytest.approx(7.0)
    lim.close_gate(3.0, status=503)  # a second closure adds its own
    clock.advance(10.0)
    assert reported() == pytest.approx(10.0)
