"""One limiter per provider: a token bucket, a concurrency cap and a Retry-After gate.

Every request to a provider (submit, poll, resolve) enters through ``ProviderLimiter.slot()``.
A request starts only when all three agree at the same instant:

- the **gate** is open: a 429/503 closes it for every later request of that provider until the
  server's ``Retry-After`` deadline, or, when the server gives none (Cognite), until a delay from
  truncated exponential backoff with full jitter. It reopens half-way: one probe at a time
  until a request admitted since the last closure is answered without a 429/503 (anything
  that did not raise), then fully;
- the **bucket** holds a token (``rate_per_s``, up to ``burst`` saved up);
- fewer than ``max_concurrency`` requests are in flight.

Waiters queue in FIFO order. Only the head of the queue ever sleeps on the clock, so a thousand
waiting requests cost one timer, not a thousand polling tasks; everybody behind it waits on an
event until it becomes the head. ``stop(deadline)`` (the process is draining until
``deadline``) drops with ``NotSent``, at once, every request that could not start before that
deadline: one queued behind a gate closed for a day has nothing to finish, so a drain must not
wait for it, while the next request of a harvest still in flight, admitted now, goes ahead.
Retry backoffs sleep through ``pause_until`` for the same reason. The arithmetic
(``parse_retry_after``, ``backoff_delay``, ``TokenBucket``) is pure and takes time as an
argument.
"""

from __future__ import annotations

import email.utils
import math
import random
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC
from types import TracebackType
from typing import Final

import anyio
import anyio.lowlevel

from harvester.clock import Clock
from harvester.errors import NotSent

__all__ = [
    "MAX_RETRY_AFTER_S",
    "GateState",
    "LimiterStats",
    "ProviderLimiter",
    "TokenBucket",
    "backoff_delay",
    "parse_retry_after",
]

#: Longest gate any server answer may impose; a typo'd or hostile header must not park a
#: provider for a year.
MAX_RETRY_AFTER_S = 86_400.0

# Waits below a microsecond count as none. Float rounding at large monotonic values can leave
# a computed wake-up equal to "now"; the head waiter would then re-arm a 0 s sleep forever.
_TIME_EPS = 1e-6

_DELAY_SECONDS = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)")


def parse_retry_after(
    value: str | None, *, now_wall: float, cap: float = MAX_RETRY_AFTER_S
) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value, or None if absent or unreadable.

    Accepts delay-seconds (``"120"``, and ``"1.5"`` which some servers send) and an HTTP-date,
    measured against ``now_wall`` (Unix time); a date in the past means 0. Capped at ``cap``.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELAY_SECONDS.fullmatch(text):
        seconds = float(text)
        return min(seconds, cap) if math.isfinite(seconds) else cap
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # HTTP dates are GMT by definition; a "-0000" zone comes back naive.
        when = when.replace(tzinfo=UTC)
    try:
        delta = when.timestamp() - now_wall
    except (OverflowError, OSError, ValueError):
        return None
    return min(max(0.0, delta), cap)


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Truncated exponential backoff with full jitter, never zero.

    Uniform over ``[base / 10, min(cap, base * 2**attempt))``. The floor is the point: a plain
    ``uniform(0, x)`` (or the Cognite SDK's ``int()`` of it) can retry immediately and hit the
    same overloaded server again.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    if not (math.isfinite(base) and base > 0):
        raise ValueError(f"base must be a positive number of seconds, got {base!r}")
    if not (math.isfinite(cap) and cap >= base):
        raise ValueError(f"cap must be >= base ({base}), got {cap!r}")
    try:
        ceiling = min(cap, math.ldexp(base, min(attempt, 4096)))
    except OverflowError:
        ceiling = cap
    floor = base / 10.0
    return rng.uniform(floor, ceiling)


@dataclass(slots=True)
class TokenBucket:
    """Tokens refill at ``rate_per_s`` up to ``burst``; one token per request.

    Pure: the caller passes ``now`` (monotonic seconds). A rate of 0 or less means unlimited.
    The bucket starts full.
    """

    rate_per_s: float
    burst: float = 1.0
    tokens: float = field(init=False)
    updated_at: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if math.isnan(self.rate_per_s) or math.isnan(self.burst):
            raise ValueError("rate_per_s and burst must be numbers")
        if self.rate_per_s > 0:
            self.burst = max(1.0, float(self.burst))
        self.tokens = float(self.burst)

    @property
    def unlimited(self) -> bool:
        return self.rate_per_s <= 0 or math.isinf(self.rate_per_s)

    def level(self, now: float) -> float:
        """Tokens available at ``now``."""
        if self.unlimited:
            return math.inf
        if self.updated_at is None:
            return self.tokens
        elapsed = max(0.0, now - self.updated_at)
        return min(self.burst, self.tokens + elapsed * self.rate_per_s)

    def time_until(self, n: float, now: float) -> float:
        """Seconds from ``now`` until ``n`` tokens are available; 0 if they are."""
        if self.unlimited:
            return 0.0
        if n > self.burst:
            raise ValueError(f"{n} tokens can never fit a bucket of burst {self.burst}")
        wait = (n - self.level(now)) / self.rate_per_s
        return wait if wait > _TIME_EPS else 0.0

    def take(self, n: float, now: float) -> None:
        """Remove ``n`` tokens at ``now``; ValueError if they are not there (ask time_until)."""
        if self.unlimited:
            return
        if self.time_until(n, now) > 0:
            raise ValueError(f"{n} tokens not available at {now}: level {self.level(now):.6f}")
        self.tokens = max(0.0, self.level(now) - n)
        self.updated_at = now if self.updated_at is None else max(self.updated_at, now)


@dataclass(frozen=True, slots=True)
class LimiterStats:
    """A snapshot for metrics and logs."""

    admitted: int  #: requests let through since creation
    rate_limited: int  #: close_gate() calls (429/503 answers)
    gate_wait_s: float  #: seconds admitted requests spent queued while the gate was closed
    waiting: int  #: requests queued now
    in_use: int  #: requests in flight now
    consecutive_failures: int  #: the adaptive backoff's attempt number


@dataclass(frozen=True, slots=True)
class GateState:
    """A read-only view of the gate, for the status page: open or closed, until when, why."""

    open: bool
    #: seconds until it opens (0 when open); the caller turns it into a wall-clock time
    seconds_left: float
    #: reopened after a closure, letting one probe request through until one is answered
    probing: bool
    #: what closed it last: the HTTP status (429, 503) and the Retry-After it carried, in
    #: seconds (None: the server sent none, so the delay was our own backoff)
    last_status: int | None
    last_retry_after_s: float | None
    #: how long the last closure was set for, and how long ago it began
    last_closed_for_s: float | None
    last_closed_ago_s: float | None
    consecutive_failures: int
    rate_limited: int  #: closures so far (429/503 answers)


class _Waiter:
    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = anyio.Event()


#: what ``_acquire`` returns for a request that is not a half-open probe
_NOT_A_PROBE: Final = -1


class _Slot:
    """``async with`` for one admission. A plain class, not an ``asynccontextmanager``: at
    thousands of requests per second the generator machinery was measurable CPU."""

    __slots__ = ("_limiter", "_probe")

    def __init__(self, limiter: ProviderLimiter) -> None:
        self._limiter = limiter
        self._probe = _NOT_A_PROBE

    async def __aenter__(self) -> None:
        self._probe = await self._limiter._acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # An answer that raised nothing is not a 429/503: the provider takes requests again.
        self._limiter._release(self._probe, answered=exc is None)


class ProviderLimiter:
    """Admission control for every request to one provider.

    ``async with limiter.slot(): ...`` waits for the gate, a token and a concurrency slot,
    FIFO among waiters. ``close_gate()`` after a 429/503, ``note_success()`` after a good answer.
    """

    __slots__ = (
        "_admitted",
        "_backoff_base",
        "_backoff_cap",
        "_bucket",
        "_clock",
        "_closed_before",
        "_closures",
        "_failures",
        "_gate_retry_after",
        "_gate_since",
        "_gate_status",
        "_gate_until",
        "_gate_wait_s",
        "_in_use",
        "_max_concurrency",
        "_probe_out",
        "_probing",
        "_rate_limited",
        "_rng",
        "_sleeps",
        "_stop_at",
        "_waiters",
        "name",
        "on_release",
    )

    def __init__(
        self,
        name: str,
        *,
        rate_per_s: float,
        burst: int,
        max_concurrency: int,
        clock: Clock,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"{name}: max_concurrency must be >= 1, got {max_concurrency}")
        if math.isnan(rate_per_s):
            raise ValueError(f"{name}: rate_per_s must be a number")
        if not (math.isfinite(backoff_base) and backoff_base > 0):
            raise ValueError(f"{name}: backoff_base must be > 0, got {backoff_base!r}")
        if not (math.isfinite(backoff_cap) and backoff_cap >= backoff_base):
            raise ValueError(f"{name}: backoff_cap must be >= backoff_base, got {backoff_cap!r}")
        self.name = name
        self._clock = clock
        self._bucket = TokenBucket(rate_per_s, burst)
        self._max_concurrency = max_concurrency
        self._in_use = 0
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._rng = rng if rng is not None else random.Random()
        # Insertion-ordered with O(1) removal of a cancelled waiter anywhere in the queue.
        self._waiters: OrderedDict[_Waiter, None] = OrderedDict()
        # The gate is closed while now < _gate_until. Closed time is tracked as finished
        # closures (_closed_before) plus the current one [_gate_since, _gate_until], so a
        # waiter's gate wait is a difference of two readings, whatever happened in between.
        self._gate_until = -math.inf
        self._gate_since = -math.inf
        self._closed_before = 0.0
        self._failures = 0
        self._admitted = 0
        self._rate_limited = 0
        self._gate_wait_s = 0.0
        # After a 429/503 the gate reopens half-way: one probe request at a time until one is
        # answered without throttling, so the queue behind the gate does not all go at once.
        self._probing = False
        self._probe_out = False
        self._closures = 0  #: gate closures so far: a probe counts only if none came after it
        #: set by stop(): a request that cannot start before this is dropped
        self._stop_at = math.inf
        #: the clock sleeps (head waiter, retry backoffs) that stop() must cut short
        self._sleeps: set[anyio.CancelScope] = set()
        self._gate_status: int | None = None  #: the answer that closed the gate last ...
        self._gate_retry_after: float | None = None  #: ... and its Retry-After (s), if any
        #: called whenever a request ends: whoever hands out work per free slot (a lane's
        #: poll scheduler) looks again then, rather than on a timer
        self.on_release: Callable[[], None] | None = None

    # -- admission -------------------------------------------------------------------------

    def slot(self) -> _Slot:
        """Hold one admission for the duration of one request (``async with``)."""
        return _Slot(self)

    async def _acquire(self) -> int:
        """Wait for admission; returns the gate closure count if admitted as a probe."""
        now = self._clock.monotonic()
        closed_at_entry = self._closed_total(now)
        if not self._waiters and self._admissible(now):
            # Uncontended: no checkpoint here, the request that follows is one anyway.
            return self._admit(now, closed_at_entry)
        await anyio.lowlevel.checkpoint_if_cancelled()
        me = _Waiter()
        self._waiters[me] = None
        try:
            while True:
                # State is re-read after every wake-up, so a nudge that raced with the check
                # below is never lost: it changed the state first, then set the old event.
                if me.event.is_set():
                    me.event = anyio.Event()
                if next(iter(self._waiters)) is not me:
                    await me.event.wait()
                    continue
                now = self._clock.monotonic()
                if self._in_use >= self._max_concurrency or (self._probing and self._probe_out):
                    await me.event.wait()
                    continue
                ready_at = self._ready_at(now)
                if ready_at > now:
                    if ready_at > self._stop_at:
                        raise self._not_sent()
                    await self._sleep(ready_at)
                    continue
                # No await between this check and the caller's request: nothing starts inside
                # a window that closed while we slept.
                return self._admit(now, closed_at_entry)
        finally:
            was_head = next(iter(self._waiters)) is me
            del self._waiters[me]
            if was_head:
                self._nudge_head()

    # -- shutting down ---------------------------------------------------------------------

    def stop(self, deadline: float) -> None:
        """The process stops at ``deadline`` (monotonic): from now on a request that could not
        start before it (a closed gate, a long backoff) gets ``NotSent`` at once."""
        self._stop_at = min(self._stop_at, deadline)
        for scope in self._sleeps:
            scope.cancel()  # each sleeper looks again at what it waits for

    async def pause_until(self, deadline: float) -> None:
        """Sleep until ``deadline`` (a retry's backoff); ``NotSent`` at once if that is past
        the stop deadline, now or once ``stop()`` is called."""
        while self._clock.monotonic() < deadline:
            if deadline > self._stop_at:
                raise self._not_sent()
            await self._sleep(deadline)

    async def _sleep(self, deadline: float) -> None:
        with anyio.CancelScope() as scope:
            self._sleeps.add(scope)
            try:
                await self._clock.sleep_until(deadline)
            finally:
                self._sleeps.discard(scope)

    def _not_sent(self) -> NotSent:
        return NotSent("stopping: request dropped before it was sent", provider=self.name)

    def _release(self, probe: int, *, answered: bool) -> None:
        self._in_use -= 1
        if probe != _NOT_A_PROBE:
            self._probe_out = False
            if answered and probe == self._closures:
                self._probing = False  # the provider answers again: open fully
        self._nudge_head()
        if self.on_release is not None:
            self.on_release()

    def _nudge_head(self) -> None:
        if self._waiters:
            next(iter(self._waiters)).event.set()

    def _admit(self, now: float, closed_at_entry: float) -> int:
        self._bucket.take(1, now)
        self._in_use += 1
        self._admitted += 1
        self._gate_wait_s += self._closed_total(now) - closed_at_entry
        if not self._probing:
            return _NOT_A_PROBE
        self._probe_out = True
        return self._closures

    def _ready_at(self, now: float) -> float:
        return max(self._gate_until, now + self._bucket.time_until(1, now))

    def _admissible(self, now: float) -> bool:
        return (
            self._in_use < self._max_concurrency
            and not (self._probing and self._probe_out)
            and self._ready_at(now) <= now
        )

    def set_rate(
        self, rate_per_s: float, burst: float, *, max_concurrency: int | None = None
    ) -> None:
        """Change the bucket (and the concurrency cap) in place, keeping queue and gate.

        Replicas sharing one provider limit each take a share of it, and the share changes as
        replicas come and go. Tokens saved above the new burst are dropped, so a smaller share
        holds from now on rather than after the old burst is spent; a sleeping head waiter
        wakes at its old time and then waits by the new rate.
        """
        if math.isnan(rate_per_s) or math.isnan(burst):
            raise ValueError(f"{self.name}: rate_per_s and burst must be numbers")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"{self.name}: max_concurrency must be >= 1, got {max_concurrency}")
        now = self._clock.monotonic()
        level = self._bucket.level(now)
        bucket = TokenBucket(rate_per_s, burst)
        if not bucket.unlimited and math.isfinite(level):
            bucket.tokens = min(level, bucket.burst)
            bucket.updated_at = now
        self._bucket = bucket
        if max_concurrency is not None:
            self._max_concurrency = max_concurrency
        self._nudge_head()

    @property
    def rate_per_s(self) -> float:
        return self._bucket.rate_per_s

    @property
    def max_concurrency(self) -> int:
        return self._max_concurrency

    def has_capacity(self) -> bool:
        """Would a request be admitted right now without waiting (and without queue-jumping)?"""
        return not self._waiters and self._admissible(self._clock.monotonic())

    def free_now(self) -> int:
        """How many requests would be admitted right now, one after the other, without
        waiting or jumping the queue: what a caller may hand out at once (poll scheduler)."""
        now = self._clock.monotonic()
        if self._waiters or not self._admissible(now):
            return 0
        if self._probing:
            return 1
        room = self._max_concurrency - self._in_use
        level = self._bucket.level(now)
        return room if math.isinf(level) else max(0, min(room, int(level + _TIME_EPS)))

    def free_at(self) -> float | None:
        """When a request could next be admitted as far as the gate and the bucket know;
        None while requests are queued or the concurrency cap is reached (free_now() says
        when that ends: the caller looks again when one of its requests is answered)."""
        if self._waiters or self._in_use >= self._max_concurrency:
            return None
        return self._ready_at(self._clock.monotonic())

    # -- the gate --------------------------------------------------------------------------

    def close_gate(self, retry_after: float | None, *, status: int | None = None) -> float:
        """Stop all requests of this provider after a 429/503; return the gate's deadline.

        With ``retry_after`` the gate stays closed that many seconds (capped); without it the
        delay comes from ``backoff_delay`` on the count of consecutive failures. A deadline
        already further out is never shortened.

        A failure counts only when it finds the gate open: answers to requests that were
        already in flight when the gate closed are the same congestion, and counting each would
        inflate the backoff by the concurrency level.
        """
        now = self._clock.monotonic()
        self._rate_limited += 1
        self._closures += 1
        self._gate_status = status
        self._gate_retry_after = retry_after
        self._probing = True
        gate_open = now >= self._gate_until
        if retry_after is not None and not math.isnan(retry_after):
            delay = min(max(retry_after, 0.0), MAX_RETRY_AFTER_S)
        elif gate_open:
            delay = backoff_delay(
                self._failures, base=self._backoff_base, cap=self._backoff_cap, rng=self._rng
            )
        else:
            delay = 0.0
        if gate_open:
            self._failures += 1
            if self._gate_since > -math.inf:
                self._closed_before += self._gate_until - self._gate_since
            self._gate_since = now
            self._gate_until = now + delay
        else:
            self._gate_until = max(self._gate_until, now + delay)
        return self._gate_until

    def note_success(self) -> None:
        """A good answer: the next failure starts the adaptive backoff from the beginning."""
        self._failures = 0

    @property
    def gate_deadline(self) -> float | None:
        """Monotonic time the gate opens, or None if it is open."""
        return self._gate_until if self._clock.monotonic() < self._gate_until else None

    def closed_s(self) -> float:
        """Seconds the gate has been closed so far, over every closure (the one under way
        counted up to now): ``harvester_retry_after_wait_seconds_total``."""
        return self._closed_total(self._clock.monotonic())

    def _closed_total(self, now: float) -> float:
        if self._gate_since == -math.inf or now <= self._gate_since:
            return self._closed_before
        return self._closed_before + min(now, self._gate_until) - self._gate_since

    # -- introspection ---------------------------------------------------------------------

    def gate_state(self) -> GateState:
        now = self._clock.monotonic()
        closed = now < self._gate_until
        since = self._gate_since if self._gate_since > -math.inf else None
        return GateState(
            open=not closed,
            seconds_left=self._gate_until - now if closed else 0.0,
            probing=self._probing and not closed,
            last_status=self._gate_status,
            last_retry_after_s=self._gate_retry_after,
            last_closed_for_s=None if since is None else self._gate_until - since,
            last_closed_ago_s=None if since is None else now - since,
            consecutive_failures=self._failures,
            rate_limited=self._rate_limited,
        )

    def stats(self) -> LimiterStats:
        return LimiterStats(
            admitted=self._admitted,
            rate_limited=self._rate_limited,
            gate_wait_s=self._gate_wait_s,
            waiting=len(self._waiters),
            in_use=self._in_use,
            consecutive_failures=self._failures,
        )

    def __repr__(self) -> str:
        now = self._clock.monotonic()
        if self._bucket.unlimited:
            bucket = "rate=unlimited"
        else:
            bucket = (
                f"tokens={self._bucket.level(now):.2f}/{self._bucket.burst:g} "
                f"rate={self._bucket.rate_per_s:g}/s"
            )
        gate = f"closed {self._gate_until - now:.2f}s" if now < self._gate_until else "open"
        return (
            f"<ProviderLimiter {self.name!r} {bucket} in_use={self._in_use}/"
            f"{self._max_concurrency} waiting={len(self._waiters)} gate={gate} "
            f"failures={self._failures}>"
        )
