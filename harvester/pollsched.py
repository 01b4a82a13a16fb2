"""Which running job a poll goes to, decided when the limiter has a token for it.

Pure: no tasks, no timers, time passed in. A lane asks ``pick(now)`` each time its limiter
would admit a request (late binding: the choice is made when the token exists, not when a
timer was set) and reports the answer with ``polled``, ``finished`` or ``defer``.

Two rules, one structure:

- **The floor.** A job is never polled sooner than its floor after its last poll:
  ``poll_min_s``, or for a provider with a polling ladder (Bentley: 15/30/60/120 s, back to
  the first rung when progress moves) its current rung, whatever budget is spare. Jobs
  waiting out their floor sit in a heap by the time they become eligible.
- **The order.** Among eligible jobs the one with the earliest *key* goes first. A job last
  seen running at age ``a`` gets the key ``origin + G⁻¹(G(a) + c)``, where ``G`` is its
  class's cumulative root hazard (``harvester.durations``): the jobs most likely to have
  finished since their last poll come first, and with nothing learned every key is ``last
  poll + constant``: the longest-unpolled job first, round robin. A job that reports progress
  (Bentley's percentage, Modzy's completed/total) gets a hazard of 1 / its extrapolated
  remaining time instead.

When the budget has room every eligible job is picked as soon as a token comes: each is
polled at its floor. When it does not, tokens go in key order, and ``c`` is the square-root
law's constant, ``sum(hazard ** alpha) / rate`` over the jobs: the intervals it gives spend
the rate exactly, and minimise the mean detection delay for it (with ``alpha = 1/2``). So
that a hazard learned wrong cannot park a job, no key is later than round robin would poll
it (``stretch`` times the cycle ``jobs / rate``; twice that for a job reporting progress).

``budget_share`` < 1 keeps polls to that share of the provider's rate (a key shared with
other clients, or paid per request): ``pick`` returns None when the share is spent. Every
operation is O(log n) in the number of jobs (amortised: keys are recomputed in bulk only
after about as many polls as there are jobs).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

from harvester.durations import DurationStats, Life
from harvester.ratelimit import TokenBucket

__all__ = ["PollScheduler"]

#: a job's key: hashable, and orderable among its kind (ties in time fall back on it)
K = TypeVar("K", bound=Hashable)


class _Job:
    __slots__ = ("entry", "last", "life", "origin", "progress", "rung", "seen", "slope")

    def __init__(self, life: Life, origin: float, last: float) -> None:
        self.life = life
        self.origin = origin  #: when its duration started counting (monotonic)
        self.last = last  #: when it was last seen running
        self.rung = 0
        self.progress: float | None = None
        self.seen = 0  #: life-table bins counted for it so far
        self.slope = 0.0  #: its hazard ** alpha when last seen (its share of ``c``)
        #: its live heap entry (``None`` while a poll of it is in flight)
        self.entry: tuple[float, object] | tuple[float, float, object] | None = None


class PollScheduler(Generic[K]):
    """The running jobs of one lane and which of them the next poll goes to."""

    __slots__ = (
        "_bucket",
        "_c",
        "_c_at_rekey",
        "_c_min",
        "_jobs",
        "_picks_since_rekey",
        "_rate",
        "_ready",
        "_share",
        "_slope_sum",
        "_waiting",
        "floor_s",
        "ladder",
        "stats",
        "stretch",
        "stretch_progress",
    )

    def __init__(
        self,
        *,
        floor_s: float,
        ladder: Sequence[float] | None = None,
        stats: DurationStats | None = None,
        rate_per_s: float = 0.0,
        burst: float = 1.0,
        budget_share: float = 1.0,
        stretch: float = 1.0,
        stretch_progress: float = 2.0,
    ) -> None:
        if not (math.isfinite(floor_s) and floor_s > 0):
            raise ValueError(f"floor_s must be > 0, got {floor_s!r}")
        if not 0 < budget_share <= 1:
            raise ValueError(f"budget_share must be in (0, 1], got {budget_share!r}")
        if ladder is not None and not (ladder and all(x > 0 for x in ladder)):
            raise ValueError(f"ladder must be non-empty positive seconds, got {ladder!r}")
        self.floor_s = float(floor_s)
        self.ladder = tuple(max(float(x), self.floor_s) for x in ladder) if ladder else None
        self.stats = stats if stats is not None else DurationStats()
        self.stretch = stretch
        self.stretch_progress = stretch_progress
        #: the polls' rate, for the round-robin cycle that caps every interval
        self._share = budget_share
        self._rate = rate_per_s * budget_share if 0 < rate_per_s < math.inf else 0.0
        self._bucket: TokenBucket | None = None
        if budget_share < 1 and 0 < rate_per_s < math.inf:
            share = rate_per_s * budget_share
            self._bucket = TokenBucket(share, max(1.0, burst * budget_share))
        self._jobs: dict[K, _Job] = {}
        self._waiting: list[tuple[float, K]] = []  #: (eligible at, key)
        self._ready: list[tuple[float, float, K]] = []  #: (key time, last poll, key)
        #: c never below a thousandth of what gives a job of the prior hazard its floor
        self._c_min: float = self.floor_s * self.stats.prior**self.stats.alpha / 1000
        self._c = self._c_min
        self._c_at_rekey = self._c
        self._picks_since_rekey = 0
        #: sum over jobs of hazard ** alpha, each as of its last poll
        self._slope_sum = 0.0

    def set_rate(self, rate_per_s: float) -> None:
        """The provider's rate changed (replicas share one limit, and the share moves)."""
        share = self._share
        self._rate = rate_per_s * share if 0 < rate_per_s < math.inf else 0.0
        if self._bucket is not None and self._rate:
            self._bucket.rate_per_s = self._rate

    @property
    def rate_per_s(self) -> float:
        """The rate polls may use (the provider's times ``budget_share``); 0: unlimited."""
        return self._rate

    # -- the jobs --------------------------------------------------------------------------
    def add(
        self,
        key: K,
        now: float,
        *,
        cls: str = "",
        origin: float | None = None,
        last_poll: float | None = None,
    ) -> None:
        """Track a running job. ``origin``: when its run began (the provider's start time if
        it gives one, else submission; default now). ``last_poll``: when it was last seen
        running (a create answer counts); None makes it eligible at once."""
        if key in self._jobs:
            raise ValueError(f"{key!r} is already scheduled")
        origin = now if origin is None else min(origin, now)
        job = _Job(self.stats.life(cls), origin, origin if last_poll is None else last_poll)
        self._jobs[key] = job
        if last_poll is None:
            self._push_waiting(key, job, now)
        else:
            job.seen = job.life.alive(0, last_poll - origin)
            self._push_waiting(key, job, last_poll + self.floor_of(key))
        self._set_slope(job)

    def remove(self, key: K) -> None:
        """Stop tracking a job that did not finish (failed, cancelled, given up, dropped)."""
        job = self._jobs.pop(key, None)
        if job is not None:
            self._slope_sum -= job.slope
            job.life.withdrawn(job.seen)

    def floor_of(self, key: K) -> float:
        """The shortest interval ``key`` may be polled at now."""
        job = self._jobs[key]
        if self.ladder is None:
            return self.floor_s
        return self.ladder[min(job.rung, len(self.ladder) - 1)]

    # -- the answers -----------------------------------------------------------------------
    def polled(
        self,
        key: K,
        now: float,
        *,
        progress: float | None = None,
        changed: bool = False,
        origin: float | None = None,
    ) -> None:
        """A poll answered: still running. ``progress`` in percent if the provider says;
        ``changed`` if anything else moved (restarts a polling ladder); ``origin`` if the
        provider says when the job began running (Cognite's startTime, after its queue)."""
        job = self._jobs[key]
        if origin is not None:
            job.origin = min(origin, now)
        job.seen = job.life.alive(job.seen, now - job.origin)
        if progress is not None and progress != job.progress:
            changed = True
            job.progress = progress
        if self.ladder is not None:
            job.rung = 0 if changed else min(job.rung + 1, len(self.ladder) - 1)
        job.last = now
        self._set_slope(job)
        self._push_waiting(key, job, now + self.floor_of(key))

    def finished(self, key: K, now: float, *, finished_at: float | None = None) -> None:
        """A poll saw the job end (success: its duration is learned). ``finished_at``: the
        provider's own end time, on this clock, if it gives one."""
        job = self._jobs.pop(key)
        self._slope_sum -= job.slope
        lo, hi = job.last - job.origin, now - job.origin
        if finished_at is None:
            duration = (lo + hi) / 2  # somewhere since the last poll; the middle is unbiased
        else:
            duration = min(max(finished_at - job.origin, 0.0), hi)
        job.life.finished(job.seen, duration)

    def defer(self, key: K, until: float) -> None:
        """Not eligible before ``until`` (a failed poll's backoff, a closed gate)."""
        job = self._jobs[key]
        self._push_waiting(key, job, until)

    # -- the choice ------------------------------------------------------------------------
    def pick(self, now: float) -> K | None:
        """The job a limiter token just granted at ``now`` should poll, or None if no job is
        eligible (or the polls' budget share is spent). The job is in flight until one of
        ``polled``, ``finished``, ``defer`` or ``remove`` is called for it."""
        bucket = self._bucket
        if bucket is not None and bucket.time_until(1, now) > 0:
            return None
        if not self._rate and not self._ready:
            return self._pick_unlimited(now)
        self._promote(now)
        ready, jobs = self._ready, self._jobs
        while ready:
            entry = heapq.heappop(ready)
            key = entry[2]
            job = jobs.get(key)
            if job is None or job.entry is not entry:
                continue  # stale: moved or removed since
            job.entry = None
            self._after_pick()
            if bucket is not None:
                bucket.take(1, now)
            return key
        return None

    def _pick_unlimited(self, now: float) -> K | None:
        # No rate to share out: every eligible job is polled at once, so the one that became
        # eligible first goes first, straight from the floor's heap.
        waiting, jobs = self._waiting, self._jobs
        while waiting and waiting[0][0] <= now:
            entry = heapq.heappop(waiting)
            job = jobs.get(entry[1])
            if job is None or job.entry is not entry:
                continue
            job.entry = None
            return entry[1]
        return None

    def next_eligible(self, now: float) -> float | None:
        """When ``pick`` could next return a job (``now`` if it can now), None if no job is
        waiting (all in flight, or none)."""
        self._promote(now)
        ready, waiting, jobs = self._ready, self._waiting, self._jobs
        while ready and _stale(jobs, ready[0]):
            heapq.heappop(ready)
        while waiting and _stale(jobs, waiting[0]):
            heapq.heappop(waiting)
        if ready:
            at = now
        elif waiting:
            at = waiting[0][0]
        else:
            return None
        if self._bucket is not None:
            at = max(at, now + self._bucket.time_until(1, now))
        return at

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, key: object) -> bool:
        return key in self._jobs

    # -- inside ----------------------------------------------------------------------------
    def _push_waiting(self, key: K, job: _Job, at: float) -> None:
        entry = (at, key)
        job.entry = entry
        heapq.heappush(self._waiting, entry)
        self._compact()

    def _promote(self, now: float) -> None:
        waiting, jobs = self._waiting, self._jobs
        while waiting and waiting[0][0] <= now:
            entry = heapq.heappop(waiting)
            key = entry[1]
            job = jobs.get(key)
            if job is None or job.entry is not entry:
                continue
            ready_entry = (self._key_time(job), job.last, key)
            job.entry = ready_entry
            heapq.heappush(self._ready, ready_entry)

    def _remaining(self, job: _Job) -> float | None:
        """Seconds left by the job's own progress report, if it gives one."""
        p = job.progress
        age = job.last - job.origin
        if p is not None and 0 < p < 100 and age > 0:
            return max(age * (100 - p) / p, 1e-3)
        return None

    def _set_slope(self, job: _Job) -> None:
        if not self._rate:
            return  # no budget to share out: c is not needed
        remaining = self._remaining(job)
        if remaining is not None:
            slope = float(remaining**-self.stats.alpha)
        else:
            slope = job.life.slope(job.last - job.origin)
        self._slope_sum += slope - job.slope
        job.slope = slope

    def _c_now(self) -> float:
        # The square-root law's constant: intervals c / hazard**alpha spend exactly the
        # rate when c = sum(hazard**alpha) / rate (the Lagrange multiplier of "minimise the
        # mean delay for R polls a second"). Unlimited rate: the floor is all there is.
        if not self._rate:
            return self._c_min
        return max(self._slope_sum / self._rate, self._c_min)

    def _key_time(self, job: _Job) -> float:
        if not self._rate:
            # No rate limit: every eligible job is polled at once, so the order is only a
            # tie-break, and the longest-unpolled first is the cheapest.
            return job.last
        remaining = self._remaining(job)
        c = self._c_now()
        if remaining is not None:
            key = job.last + c * float(remaining**self.stats.alpha)
            stretch = self.stretch_progress
        else:
            key = job.origin + job.life.advance(job.last - job.origin, c)
            stretch = self.stretch
        if self._rate:
            # No job waits much longer than round robin would make it: the hazard moves
            # polls earlier for the likely-finished, it never parks the unlikely for good.
            cycle = max(self.floor_s, len(self._jobs) / self._rate)
            key = min(key, job.last + stretch * cycle)
        return key

    def _after_pick(self) -> None:
        # Keys already in the heap were made with an older c; once c has moved by more
        # than a factor 2, and only after about as many picks as there are ready jobs,
        # they are all made again.
        self._c = self._c_now()
        self._picks_since_rekey += 1
        if self._picks_since_rekey >= len(self._ready) and abs(
            math.log(self._c / self._c_at_rekey)
        ) > math.log(2):
            self._rekey()

    def _rekey(self) -> None:
        """Recompute every ready job's key with today's ``c`` and tables (O(n), done only
        after about n picks, so O(1) per pick)."""
        jobs = self._jobs
        fresh: list[tuple[float, float, K]] = []
        for entry in self._ready:
            job = jobs.get(entry[2])
            if job is None or job.entry is not entry:
                continue
            new = (self._key_time(job), job.last, entry[2])
            job.entry = new
            fresh.append(new)
        heapq.heapify(fresh)
        self._ready = fresh
        self._slope_sum = sum(job.slope for job in jobs.values())  # no float drift
        self._c_at_rekey = self._c
        self._picks_since_rekey = 0

    def _compact(self) -> None:
        # Stale entries (a job deferred or removed while it waited) are dropped when they
        # surface; rebuild when they outnumber the live ones, so memory stays O(jobs).
        total = len(self._waiting) + len(self._ready)
        if total > 2 * len(self._jobs) + 1024:
            jobs = self._jobs
            self._waiting = [e for e in self._waiting if not _stale(jobs, e)]
            heapq.heapify(self._waiting)
            self._ready = [e for e in self._ready if not _stale(jobs, e)]
            heapq.heapify(self._ready)


def _stale(jobs: dict[K, _Job], entry: tuple[float, K] | tuple[float, float, K]) -> bool:
    job = jobs.get(entry[-1])
    return job is None or job.entry is not entry
