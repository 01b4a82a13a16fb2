"""Poll scheduling, simulated: detection latency under a rate budget, on a virtual clock.

A discrete-event simulation runs harvester's own scheduler (``harvester.pollsched``, the code
the engine uses, unmodified) against an in-memory provider: jobs arrive (all at once, or
spread over a window), run for a duration drawn from a distribution, and a poll at time t
sees a job finished iff its end is <= t. Polls pay for a token from ``ratelimit.TokenBucket``
at the budget's rate (burst 1): no strategy ever polls faster than the budget. Requests take
no time. Simulated hours take seconds.

Strategies, each run on the same jobs:

- **harvester**: ``PollScheduler`` (floor = ``poll_min_s`` or Bentley's rung; order by the
  learned hazard; ``c`` steered by the budget);
- **fixed**: every running job polled round robin (longest-unpolled first) as fast as the
  budget allows, never under the same floor;
- **before**: the engine before this scheduler: ``PollPolicy`` intervals growing x1.5 from
  ``poll_min_s`` to ``poll_max_s`` (Bentley's ladder), due jobs served earliest-due-first by
  ``DueQueue`` (the limiter's FIFO);
- **sdk**: the SDKs' way: one job at a time, polled every ``poll_min_s`` until it ends, then
  the next;
- **oracle**: a clairvoyant poller that knows every job's end: one poll per job, as soon
  after its end as the same budget and floor allow. Its p50 and p95 are each the least any
  poller reaches at this budget (for a quantile it skips to the back the jobs that would
  miss it; exact where no floor holds a job past its end, and reported with that floor
  relaxed too, a bound from below); its max is earliest-end-first's;
- **bound**: round robin's expected latency at each completion, ``max(n(t)/R, floor)/2``
  where n(t) is the number of jobs running then (the issue's n(t)/(2R)). It is a mean: where
  jobs end faster than the budget polls, the finished jobs queue and even the oracle's p95
  is above it (the figure "p95: oracle against the round-robin bound" says where).

Detection latency is (time a poll saw the job finished) - (its end). Requests per job are
polls / jobs. Budget use is polls / (R x time from the first arrival to the last detection).
The wait after the last completion is (last detection) - (latest end).

Targets (issue 18, as ratios in the same run): harvester's p50 and p95 <= the fixed poller's at
no more requests; where the budget is saturated (jobs at their floor would want more than R),
p95 <= 1.2x the bound's p95; where it is not, p95 <= 1.5x the floor; the wait after the last
completion <= 1.5x the fixed poller's. Every scenario is reported, including those that miss.

    .venv/bin/python bench/sim_schedule.py          # the small set `make bench` runs (2,000 jobs)
    .venv/bin/python bench/sim_schedule.py --full   # 10,000 and 100,000 jobs (minutes)
    .venv/bin/python bench/sim_schedule.py --only lognormal-tight-10k
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import heapq
import math
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench_common import Figure, bench_main, log

from harvester.durations import DurationStats
from harvester.pollsched import PollScheduler
from harvester.ratelimit import TokenBucket
from harvester.schedule import BENTLEY_LADDER, DueQueue, PollPolicy

MIN, HOUR, DAY = 60.0, 3600.0, 86400.0
#: each scenario runs on several draws of its jobs; the figures are the medians. Nine for the
#: small set: the wait after the last completion is one event per draw (where the last job's
#: last poll falls within its floor), and with three draws its median swung 17-112 s on the
#: same code; three for the 10,000- and 100,000-job runs of ``--full``, which take minutes each
SMALL_SEEDS = tuple(range(1, 10))
FULL_SEEDS = (1, 2, 3)


# -- workloads --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    n: int
    dist: str  #: uniform | lognormal | bimodal
    rate: float  #: the budget, requests/s
    floor: float  #: poll_min_s
    arrival_s: float = 0.0  #: jobs arrive uniformly over [0, arrival_s]; 0: one batch
    ladder: bool = False  #: Bentley's ladder as the floor
    #: progress reported in this many steps (Bentley: 100, a percentage; Modzy: its number of
    #: inputs, completed/total); 0: none
    progress_steps: int = 0
    times: bool = False  #: the provider reports its own end time (Cognite's statusTime)
    seed: int = 1
    params: tuple[float, ...] = ()

    @property
    def saturated(self) -> bool:
        """Would the jobs running at the busiest moment, each polled at its floor, want
        more than the budget?"""
        return self.peak_running / self.floor > self.rate

    @property
    def peak_running(self) -> float:
        return float(self.n)  # refined per run from the actual jobs (``Jobs.peak``)


def draw(sc: Scenario, rng: random.Random) -> list[float]:
    p = sc.params
    if sc.dist == "uniform":
        lo, hi = p
        return [rng.uniform(lo, hi) for _ in range(sc.n)]
    if sc.dist == "lognormal":
        median, sigma = p
        return [rng.lognormvariate(math.log(median), sigma) for _ in range(sc.n)]
    if sc.dist == "bimodal":
        share_short, m1, s1, m2, s2 = p
        return [
            rng.lognormvariate(math.log(m1), s1)
            if rng.random() < share_short
            else rng.lognormvariate(math.log(m2), s2)
            for _ in range(sc.n)
        ]
    raise ValueError(sc.dist)


@dataclass
class Jobs:
    arrive: list[float]
    end: list[float]
    #: Bentley-like progress curve exponent per job (progress = 100 * (elapsed/d) ** gamma)
    gamma: list[float]

    @classmethod
    def make(cls, sc: Scenario) -> Jobs:
        rng = random.Random(sc.seed)
        durations = draw(sc, rng)
        arrive = sorted(rng.uniform(0, sc.arrival_s) if sc.arrival_s else 0.0 for _ in durations)
        end = [a + d for a, d in zip(arrive, durations, strict=True)]
        gamma = [rng.uniform(0.7, 1.4) for _ in durations]
        return cls(arrive, end, gamma)

    def progress(self, i: int, t: float, steps: int) -> float:
        """Percent done, in ``steps`` steps, along a curve of the job's own (not linear)."""
        a, e = self.arrive[i], self.end[i]
        return 100.0 * int(steps * ((t - a) / (e - a)) ** self.gamma[i]) / steps

    def running_at(self) -> Callable[[float], int]:
        arrive, ends = self.arrive, sorted(self.end)
        return lambda t: bisect.bisect_right(arrive, t) - bisect.bisect_right(ends, t)

    @property
    def peak(self) -> int:
        events = sorted([(a, 1) for a in self.arrive] + [(e, -1) for e in self.end])
        run = best = 0
        for _, d in events:
            run += d
            best = max(best, run)
        return best


# -- strategies ---------------------------------------------------------------------------


class Strategy(Protocol):
    def add(self, key: int, now: float) -> None: ...
    def pick(self, now: float) -> int | None: ...
    def next_eligible(self, now: float) -> float | None: ...
    def polled(self, key: int, now: float, progress: float | None) -> None: ...
    def finished(self, key: int, now: float, end: float | None) -> None: ...


class Harvester:
    def __init__(self, sc: Scenario) -> None:
        self.sched: PollScheduler[int] = PollScheduler(
            floor_s=sc.floor,
            ladder=BENTLEY_LADDER if sc.ladder else None,
            stats=DurationStats(),
            rate_per_s=sc.rate,
        )

    def add(self, key: int, now: float) -> None:
        self.sched.add(key, now, origin=now, last_poll=now)

    def pick(self, now: float) -> int | None:
        return self.sched.pick(now)

    def next_eligible(self, now: float) -> float | None:
        return self.sched.next_eligible(now)

    def polled(self, key: int, now: float, progress: float | None) -> None:
        self.sched.polled(key, now, progress=progress)

    def finished(self, key: int, now: float, end: float | None) -> None:
        self.sched.finished(key, now, finished_at=end)


class _Rungs:
    """Bentley's ladder for the baselines: a rung per job, back to the first on progress."""

    def __init__(self, sc: Scenario) -> None:
        self.ladder = tuple(max(x, sc.floor) for x in BENTLEY_LADDER) if sc.ladder else None
        self.floor = sc.floor
        self.rung: dict[int, int] = {}
        self.progress: dict[int, float | None] = {}

    def next_floor(self, key: int, progress: float | None) -> float:
        if self.ladder is None:
            return self.floor
        moved = progress is not None and progress != self.progress.get(key)
        self.progress[key] = progress
        r = 0 if moved else min(self.rung.get(key, -1) + 1, len(self.ladder) - 1)
        self.rung[key] = r
        return self.ladder[r]

    def forget(self, key: int) -> None:
        self.rung.pop(key, None)
        self.progress.pop(key, None)


class Fixed:
    """Round robin under the floor: the job polled longest ago among those past it."""

    def __init__(self, sc: Scenario) -> None:
        self.rungs = _Rungs(sc)
        self.waiting: list[tuple[float, float, int]] = []  # (eligible at, last poll, key)
        self.ready: list[tuple[float, int]] = []  # (last poll, key)

    def add(self, key: int, now: float) -> None:
        heapq.heappush(self.waiting, (now + self.rungs.next_floor(key, None), now, key))

    def _promote(self, now: float) -> None:
        while self.waiting and self.waiting[0][0] <= now:
            _, last, key = heapq.heappop(self.waiting)
            heapq.heappush(self.ready, (last, key))

    def pick(self, now: float) -> int | None:
        self._promote(now)
        return heapq.heappop(self.ready)[1] if self.ready else None

    def next_eligible(self, now: float) -> float | None:
        self._promote(now)
        if self.ready:
            return now
        return self.waiting[0][0] if self.waiting else None

    def polled(self, key: int, now: float, progress: float | None) -> None:
        heapq.heappush(self.waiting, (now + self.rungs.next_floor(key, progress), now, key))

    def finished(self, key: int, now: float, end: float | None) -> None:
        self.rungs.forget(key)


class Before:
    """The engine before issue 18: per-job growing interval, earliest due first."""

    def __init__(self, sc: Scenario) -> None:
        ladder = BENTLEY_LADDER if sc.ladder else None
        poll_max = max(120.0, 24 * sc.floor)
        self.policy = PollPolicy(min_s=sc.floor, max_s=poll_max, ladder=ladder)
        self.queue: DueQueue[int] = DueQueue()
        self.interval: dict[int, float] = {}
        self.progress: dict[int, float | None] = {}
        # not sc.seed: the jitter would replay the draws of the durations and know them
        self.rng = random.Random(f"before-{sc.seed}")

    def add(self, key: int, now: float) -> None:
        d = self.policy.first(self.rng)
        self.interval[key] = d
        self.queue.schedule(key, now + d)

    def pick(self, now: float) -> int | None:
        due = self.queue.pop_due(now, 1)
        return due[0] if due else None

    def next_eligible(self, now: float) -> float | None:
        return self.queue.next_due()

    def polled(self, key: int, now: float, progress: float | None) -> None:
        changed = progress is not None and progress != self.progress.get(key)
        self.progress[key] = progress
        d = self.policy.next(self.interval[key], changed=changed, rng=self.rng)
        self.interval[key] = d
        self.queue.schedule(key, now + d)

    def finished(self, key: int, now: float, end: float | None) -> None:
        self.interval.pop(key, None)
        self.progress.pop(key, None)


STRATEGIES: dict[str, Callable[[Scenario], Strategy]] = {
    "harvester": Harvester,
    "fixed": Fixed,
    "before": Before,
}


# -- running one ------------------------------------------------------------------------------


@dataclass
class Outcome:
    strategy: str
    latency: list[float]  #: per job, in job order
    polls: int
    first_arrival: float
    last_detect: float
    latest_end: float
    rate: float
    seconds: float = 0.0  #: wall time the simulation took
    floor_at_end: list[float] = field(default_factory=list)

    def q(self, p: float) -> float:
        return quantile(sorted(self.latency), p)

    @property
    def per_job(self) -> float:
        return self.polls / len(self.latency)

    @property
    def budget_use(self) -> float:
        span = self.last_detect - self.first_arrival
        return self.polls / (self.rate * span) if span > 0 else 0.0

    @property
    def last_wait(self) -> float:
        return self.last_detect - self.latest_end


def quantile(xs: Sequence[float], p: float) -> float:
    if not xs:
        return math.nan
    i = min(len(xs) - 1, max(0, math.ceil(p * len(xs)) - 1))
    return xs[i]


def simulate(sc: Scenario, jobs: Jobs, name: str) -> Outcome:
    started = time.perf_counter()
    strat = STRATEGIES[name](sc)
    bucket = TokenBucket(sc.rate, 1.0)
    arrive, end = jobs.arrive, jobs.end
    n = len(arrive)
    latency = [math.nan] * n
    polls = detected = ai = 0
    t = arrive[0]
    last = t
    report_end = sc.times
    steps = sc.progress_steps
    while detected < n:
        while ai < n and arrive[ai] <= t:
            strat.add(ai, arrive[ai])
            ai += 1
        wait = bucket.time_until(1, t)
        if wait > 0:
            t += wait
            continue
        key = strat.pick(t)
        if key is None:
            nxt = strat.next_eligible(t)
            na = arrive[ai] if ai < n else math.inf
            t = min(math.inf if nxt is None else nxt, na)
            if math.isinf(t):
                raise RuntimeError(f"{name} stalled with {n - detected} jobs undetected")
            continue
        bucket.take(1, t)
        polls += 1
        if end[key] <= t:
            strat.finished(key, t, end[key] if report_end else None)
            latency[key] = t - end[key]
            detected += 1
            last = t
        else:
            strat.polled(key, t, jobs.progress(key, t, steps) if steps else None)
    return Outcome(
        name,
        latency,
        polls,
        arrive[0],
        last,
        max(end),
        sc.rate,
        seconds=time.perf_counter() - started,
    )


def sdk(sc: Scenario, jobs: Jobs) -> Outcome:
    """One job at a time, in submission order, polled every floor until it ends."""
    started = time.perf_counter()
    bucket = TokenBucket(sc.rate, 1.0)
    latency, polls, t = [], 0, jobs.arrive[0]
    for a, e in zip(jobs.arrive, jobs.end, strict=True):
        t = max(t, a)
        while True:
            t += bucket.time_until(1, t)
            bucket.take(1, t)
            polls += 1
            if e <= t:
                latency.append(t - e)
                break
            t += sc.floor
    return Outcome(
        "sdk",
        latency,
        polls,
        jobs.arrive[0],
        t,
        max(jobs.end),
        sc.rate,
        seconds=time.perf_counter() - started,
    )


def bound(sc: Scenario, jobs: Jobs) -> list[float]:
    """Round robin's expected latency at each job's end: max(n(t)/R, floor) / 2."""
    running = jobs.running_at()
    return sorted(max(running(e) / sc.rate, sc.floor) / 2 for e in jobs.end)


# -- the clairvoyant poller -------------------------------------------------------------------


def first_floor(sc: Scenario) -> float:
    """The least time from a job's submission to its first poll, for every strategy: the
    create's answer counts as a poll, so the first poll waits out the floor (Bentley: its
    first rung)."""
    return max(BENTLEY_LADDER[0], sc.floor) if sc.ladder else sc.floor


def releases(sc: Scenario, jobs: Jobs) -> list[float]:
    """Per job, the earliest a poll can see it finished: its end, or its first floor."""
    f = first_floor(sc)
    return [max(e, a + f) for a, e in zip(jobs.arrive, jobs.end, strict=True)]


def oracle(sc: Scenario, jobs: Jobs) -> Outcome:
    """A clairvoyant poller: it knows every job's end, so it polls each job exactly once, the
    first moment the budget allows after the job can be seen finished (its end, or its first
    floor after submission), earliest end first. Tokens come from the same ``TokenBucket``
    as every strategy's.

    Earliest end first, never idle while a finished job waits, is optimal for the *maximum*
    latency where every job is pollable from its end (Jackson's rule: due date = end +
    latency, all windows the same length). It is not optimal for a quantile: at a saturated
    budget it spends tokens on jobs already hopelessly late where skipping them to the back
    lets more jobs in under the quantile. ``least_quantile`` answers that question; the
    oracle's p50 and p95 reported are each that least value (see ``oracle_metrics``)."""
    started = time.perf_counter()
    release = releases(sc, jobs)
    end = jobs.end
    order = sorted(range(len(end)), key=release.__getitem__)
    bucket = TokenBucket(sc.rate, 1.0)
    n = len(end)
    latency = [math.nan] * n
    ready: list[tuple[float, int]] = []
    k = polls = 0
    t = release[order[0]]
    while polls < n:
        while k < n and release[order[k]] <= t:
            heapq.heappush(ready, (end[order[k]], order[k]))
            k += 1
        if not ready:
            t = release[order[k]]
            continue
        wait = bucket.time_until(1, t)
        if wait > 0:
            t += wait
            continue
        _, i = heapq.heappop(ready)
        bucket.take(1, t)
        latency[i] = t - end[i]
        polls += 1
    return Outcome(
        "oracle",
        latency,
        polls,
        jobs.arrive[0],
        t,
        max(end),
        sc.rate,
        seconds=time.perf_counter() - started,
    )


def on_time(
    release: Sequence[float], end: Sequence[float], rate: float, within: float, need: int
) -> list[float | None]:
    """A clairvoyant schedule that polls as many jobs as it can no later than ``within``
    after their end: per job its poll time, None for those it leaves late (polled after
    all the others, whenever; they do not count). Polls are ``1 / rate`` apart at least (the
    budget's bucket of burst 1 allows exactly that). Stops once ``need`` jobs are in.

    Greedy: at each moment a token comes, the released job with the earliest end that can
    still make its deadline (end + ``within``); one that cannot is skipped. Where every job
    is pollable from its end, all windows [end, end + within] have the same length, and for
    windows in the same order at both ends, with one token per job, this greedy is optimal
    (the exchange argument of interval scheduling: taking the earliest-deadline feasible job
    never leaves the next token later than any other choice would). Where a floor holds a
    job back past its end (its window is shorter), the schedule is still one a clairvoyant
    poller could follow: the least quantile found is then an estimate from above, and
    ``least_quantile(..., floors=False)`` a bound from below."""
    n = len(end)
    order = sorted(range(n), key=release.__getitem__)
    gap = 1.0 / rate if rate > 0 else 0.0
    out: list[float | None] = [None] * n
    ready: list[tuple[float, int]] = []
    k = count = 0
    t = -math.inf
    while count < need:
        while k < n and release[order[k]] <= t:
            heapq.heappush(ready, (end[order[k]], order[k]))
            k += 1
        while ready and ready[0][0] + within < t:
            heapq.heappop(ready)  # too late for it: left to the end
        if not ready:
            if k == n:
                break
            t = release[order[k]] if math.isinf(t) else max(release[order[k]], t)
            continue
        _, i = heapq.heappop(ready)
        out[i] = t
        count += 1
        t += gap
    return out


def least_quantile(
    sc: Scenario, jobs: Jobs, q: float, *, floors: bool = True, rel: float = 1e-3
) -> float:
    """The least latency quantile ``q`` (as ``quantile`` counts: the ceil(q n)-th smallest)
    a clairvoyant poller reaches at this budget: bisection on the latency L for which
    ``on_time`` gets ceil(q n) jobs in, to ``rel`` of it. ``floors=False`` drops the
    floor's hold on the first poll: a relaxation, so a bound from below."""
    release = releases(sc, jobs) if floors else list(jobs.end)
    end = jobs.end
    n = len(end)
    need = min(n, max(1, math.ceil(q * n)))

    def enough(within: float) -> bool:
        return sum(x is not None for x in on_time(release, end, sc.rate, within, need)) >= need

    lo, hi = 0.0, max(r - e for r, e in zip(release, end, strict=True)) + n / sc.rate
    if enough(lo):
        return lo
    while not enough(hi):  # not expected (no job waits more than n polls): made sure of
        lo, hi = hi, 2 * hi
    while hi - lo > rel * hi + 1e-6:
        mid = (lo + hi) / 2
        if enough(mid):
            hi = mid
        else:
            lo = mid
    return hi


# -- the scenarios ----------------------------------------------------------------------------


def scenarios(full: bool) -> list[Scenario]:
    uni = ("uniform", (5.0, 90.0))  # Cognite / Playment auto-annotation: seconds
    logn = ("lognormal", (20 * MIN, 1.0))  # Bentley reality analysis: minutes to hours
    bim = ("bimodal", (0.8, 3 * MIN, 0.5, 1 * DAY, 0.4))  # Playment human: minutes or a day
    modzy = ("lognormal", (5 * MIN, 0.8))  # Modzy batch inference: minutes
    bentley: dict[str, Any] = {"ladder": True, "progress_steps": 100}
    out: list[Scenario] = []

    def add(name: str, n: int, dist: tuple[str, tuple[float, ...]], **kw: Any) -> None:
        out.append(Scenario(name, n, dist[0], params=dist[1], **kw))

    if not full:
        n = 2000
        add("uniform-starved-2k", n, uni, rate=4.0, floor=5.0)
        add("uniform-ample-2k", n, uni, rate=800.0, floor=5.0)
        add("lognormal-tight-2k", n, logn, rate=4.0, floor=60.0, arrival_s=HOUR)
        add("bentley-ladder-2k", n, logn, rate=5.0, floor=15.0, arrival_s=HOUR, **bentley)
        add("modzy-progress-2k", n, modzy, rate=10.0, floor=5.0, arrival_s=HOUR, progress_steps=8)
        add("cognite-stream-2k", n, uni, rate=10.0, floor=5.0, arrival_s=HOUR / 6, times=True)
        add("bimodal-starved-2k", n, bim, rate=0.2, floor=300.0, arrival_s=HOUR)
        return out
    n = 10_000
    add("uniform-starved-10k", n, uni, rate=20.0, floor=5.0)
    add("uniform-tight-10k", n, uni, rate=200.0, floor=5.0)
    add("uniform-ample-10k", n, uni, rate=4000.0, floor=5.0)
    add("uniform-stream-10k", n, uni, rate=50.0, floor=5.0, arrival_s=HOUR / 2, times=True)
    add("lognormal-starved-10k", n, logn, rate=5.0, floor=60.0, arrival_s=HOUR)
    add("lognormal-tight-10k", n, logn, rate=20.0, floor=60.0, arrival_s=HOUR)
    add("lognormal-ample-10k", n, logn, rate=400.0, floor=60.0, arrival_s=HOUR)
    add("bentley-ladder-10k", n, logn, rate=20.0, floor=15.0, arrival_s=HOUR, **bentley)
    add("modzy-progress-10k", n, modzy, rate=50.0, floor=5.0, arrival_s=HOUR, progress_steps=8)
    add("bimodal-starved-10k", n, bim, rate=1.0, floor=300.0, arrival_s=HOUR)
    add("bimodal-tight-10k", n, bim, rate=5.0, floor=300.0, arrival_s=HOUR)
    add("lognormal-tight-100k", 100_000, logn, rate=150.0, floor=60.0, arrival_s=HOUR)
    return out


# -- reporting --------------------------------------------------------------------------------


@dataclass
class Checked:
    metric: str  #: what is compared, e.g. "p95 detection latency"
    target: str  #: e.g. "<= fixed poller's"
    value: float
    baseline: str
    baseline_value: float
    factor: float  #: met when value <= factor * baseline_value
    unit: str = "s"
    remark: str = ""

    @property
    def ok(self) -> bool:
        return self.value <= self.factor * self.baseline_value

    @property
    def text(self) -> str:
        return (
            f"{self.metric} {self.value:,.1f} {self.unit} vs {self.baseline}"
            f" {self.baseline_value:,.1f} {self.unit}{self.remark}"
        )


def check(sc: Scenario, saturated: bool, m: dict[str, dict[str, float]]) -> list[Checked]:
    """Issue 18's targets on the metrics ``m`` (per strategy, medians over the seeds)."""
    h, f, b = m["harvester"], m["fixed"], m["bound"]
    floor = BENTLEY_LADDER[-1] if sc.ladder else sc.floor  # the highest rung it may be on
    fixed = "fixed poller"
    phase = max(h["last_wait_s"], f["last_wait_s"]) <= floor
    out = [
        Checked("p50 latency", "<= fixed poller's", h["p50_s"], fixed, f["p50_s"], 1.0),
        Checked("p95 latency", "<= fixed poller's", h["p95_s"], fixed, f["p95_s"], 1.0),
        Checked("requests", "<= fixed poller's", h["requests"], fixed, f["requests"], 1.0, unit=""),
        Checked(
            "wait after the last completion",
            "<= 1.5x fixed poller's",
            h["last_wait_s"],
            fixed,
            f["last_wait_s"],
            1.5,
            remark=f" (both within the {floor:g} s floor: where the last poll falls decides)"
            if phase
            else "",
        ),
    ]
    if saturated:
        o = m["oracle"]["p95_s"]
        reach = (
            "out of any poller's reach"
            if m["oracle"]["p95_relaxed_s"] > 1.2 * b["p95_s"]
            else "within a clairvoyant's reach"
        )
        out.append(
            Checked(
                "p95 latency against the bound",
                "<= 1.2x round-robin bound (saturated)",
                h["p95_s"],
                "round-robin bound p95",
                b["p95_s"],
                1.2,
                remark=f" (a clairvoyant poller at this budget: {o:,.1f} s; 1.2x the bound is"
                f" {reach})",
            )
        )
    else:
        out.append(
            Checked(
                "p95 latency against the floor",
                "<= 1.5x the floor (spare budget)",
                h["p95_s"],
                "floor",
                floor,
                1.5,
            )
        )
    return out


def metrics(o: Outcome) -> dict[str, float]:
    return {
        "p50_s": o.q(0.5),
        "p95_s": o.q(0.95),
        "max_s": o.q(1.0),
        "requests": float(o.polls),
        "requests_per_job": o.per_job,
        "budget_use": o.budget_use,
        "last_wait_s": o.last_wait,
        "sim_seconds": o.seconds,
    }


def oracle_metrics(sc: Scenario, jobs: Jobs) -> dict[str, float]:
    """The oracle's p50 and p95: each the least a clairvoyant poller reaches at this budget
    (not both by one schedule); ``p95_relaxed_s``: the same without the floor's hold on the
    first poll, a bound from below where the floor holds jobs back."""
    return {
        "p50_s": least_quantile(sc, jobs, 0.5),
        "p95_s": least_quantile(sc, jobs, 0.95),
        "p95_relaxed_s": least_quantile(sc, jobs, 0.95, floors=False),
    }


def run_scenario(sc: Scenario, seeds: Sequence[int]) -> dict[str, Any]:
    runs: list[dict[str, dict[str, float]]] = []
    peaks = []
    simulated = []
    for seed in seeds:
        one = dataclasses.replace(sc, seed=seed)
        jobs = Jobs.make(one)
        peaks.append(jobs.peak)
        res = {name: simulate(one, jobs, name) for name in STRATEGIES}
        res["sdk"] = sdk(one, jobs)
        res["oracle"] = oracle(one, jobs)
        rr = bound(one, jobs)
        row = {k: metrics(v) for k, v in res.items()}
        row["oracle"] |= oracle_metrics(one, jobs)
        row["bound"] = {"p50_s": quantile(rr, 0.5), "p95_s": quantile(rr, 0.95), "max_s": rr[-1]}
        runs.append(row)
        simulated.append(res["harvester"].last_detect - jobs.arrive[0])
    med = {k: {f: statistics.median(r[k][f] for r in runs) for f in runs[0][k]} for k in runs[0]}
    saturated = statistics.median(peaks) / sc.floor > sc.rate
    checks = check(sc, saturated, med)
    log(
        f"{sc.name}: "
        + "; ".join(f"{c.target}: {'ok' if c.ok else 'MISS'} ({c.text})" for c in checks)
    )
    return {
        "scenario": sc.name,
        "jobs": sc.n,
        "distribution": f"{sc.dist} {sc.params}",
        "rate_per_s": sc.rate,
        "floor_s": sc.floor,
        "ladder": sc.ladder,
        "progress_steps": sc.progress_steps,
        "times": sc.times,
        "arrival_s": sc.arrival_s,
        "saturated": saturated,
        "peak_running": statistics.median(peaks),
        "simulated_s": statistics.median(simulated),
        "seeds": list(seeds),
        "strategies": med,
        "per_seed": runs,
        "checks": [
            {"metric": c.metric, "target": c.target, "ok": c.ok, "text": c.text} for c in checks
        ],
        "_checked": checks,
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | strategy | latency p50 / p95 / max (s) | requests/job | budget use |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for k in ("harvester", "fixed", "before", "sdk", "oracle", "bound"):
            s = r["strategies"][k]
            lat = f"{s['p50_s']:.1f} / {s['p95_s']:.1f} / {s['max_s']:.1f}"
            per = f"{s['requests_per_job']:.1f}" if "requests_per_job" in s else ""
            use = f"{s['budget_use']:.2f}" if "budget_use" in s else ""
            lines.append(f"| {r['scenario']} | {k} | {lat} | {per} | {use} |")
    return "\n".join(lines)


def oracle_figure(r: dict[str, Any], about: str) -> Figure:
    """Where the budget is saturated: the least p95 a clairvoyant poller reaches, against
    the round-robin bound, so that a reader sees where 1.2x the bound is out of reach."""
    o, b = r["strategies"]["oracle"], r["strategies"]["bound"]
    h = r["strategies"]["harvester"]
    limit = 1.2 * b["p95_s"]
    verdict = (
        f"1.2x the bound ({limit:,.1f} s) is below what even a clairvoyant poller reaches: no"
        " poller can meet that target here"
        if o["p95_relaxed_s"] > limit
        else f"1.2x the bound ({limit:,.1f} s) is within a clairvoyant poller's reach"
    )
    return Figure(
        name=f"sched {r['scenario']}: p95: oracle against the round-robin bound",
        value=round(o["p95_s"], 2),
        unit="s",
        baseline="round-robin bound p95",
        baseline_value=round(b["p95_s"], 2),
        note=f"{about}. The oracle knows every job's end and polls each once, as early as the"
        " same budget and floors allow, skipping to the back the jobs that would miss the"
        " quantile: the least p95 a poller can reach (exact where no floor holds a job past"
        f" its end; {o['p95_relaxed_s']:,.1f} s with the floor's hold on the first poll"
        f" relaxed, a bound from below whatever the floors). {verdict};"
        f" harvester's p95 {h['p95_s']:,.1f} s.",
    ).with_ratio()


def cost(n: int, picks: int) -> tuple[float, float, float]:
    """The scheduler alone, saturated, with n jobs: (microseconds per pick + answer, bytes per
    job it holds, bytes per job of the engine's structures before it: DueQueue + interval)."""
    sched: PollScheduler[str] = PollScheduler(floor_s=1.0, rate_per_s=100.0)
    keys = [f"job-{i:07d}" for i in range(n)]  # made before measuring: the engine has them
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i, k in enumerate(keys):
        sched.add(k, 0.0, origin=-float(i % 3600), last_poll=0.0)
    sched.next_eligible(2.0)
    held = (tracemalloc.get_traced_memory()[0] - base) / n
    tracemalloc.stop()
    t, end, started = 2.0, {k: 2.0 + (i * 7919 % 50_000) / 10 for i, k in enumerate(keys)}, 0.0
    started = time.perf_counter()
    for i in range(picks):
        t = 2.0 + i / 100.0
        key = sched.pick(t)
        assert key is not None
        if end[key] <= t:
            sched.finished(key, t)
            sched.add(key, t, last_poll=t)
        else:
            sched.polled(key, t)
    per_pick = (time.perf_counter() - started) / picks * 1e6
    queue: DueQueue[str] = DueQueue()
    interval: dict[str, float] = {}
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for k in keys:
        queue.schedule(k, 5.0)
        interval[k] = 5.0
    before = (tracemalloc.get_traced_memory()[0] - base) / n
    tracemalloc.stop()
    return per_pick, held, before


def cost_figures(big: int) -> list[Figure]:
    small_us, _, _ = cost(1000, 50_000)
    big_us, held, before = cost(big, 50_000)
    return [
        Figure(
            name=f"poll scheduler: time per poll with {big:,} jobs",
            value=round(big_us, 2),
            unit="us",
            baseline="with 1,000 jobs",
            baseline_value=round(small_us, 2),
            target="<= 2x (no scan per poll)",
            met=big_us <= 2 * small_us,
            note="PollScheduler alone, saturated (every pick overdue), 50,000 picks each"
            " answered polled or finished (a finished job is replaced), CPU time of this process",
        ).with_ratio(),
        Figure(
            name=f"poll scheduler: memory per job with {big:,} jobs",
            value=round(held),
            unit="bytes",
            baseline="DueQueue + interval dict (before)",
            baseline_value=round(before),
            note="tracemalloc growth while adding the jobs (keys made beforehand); the learned"
            " duration tables are fixed-size whatever the number of jobs"
            f" ({len(DurationStats().to_bytes())} bytes serialised when empty,"
            " two arrays of 90 bins per job class, at most 256 classes)",
        ).with_ratio(),
    ]


def run(args: argparse.Namespace, work: Path) -> list[Figure]:
    chosen = [s for s in scenarios(args.full) if not args.only or s.name in args.only]
    results = [run_scenario(sc, SMALL_SEEDS if sc.n <= 2_000 else FULL_SEEDS) for sc in chosen]
    print(table(results))
    figures = []
    for r in results:
        about = (
            f"{r['jobs']:,} jobs, {r['distribution']}, {r['rate_per_s']:g} req/s, floor"
            f" {r['floor_s']:g} s{' on Bentley ladder' if r['ladder'] else ''}"
            f"{', progress reported' if r['progress_steps'] else ''}"
            f"{', end times reported' if r['times'] else ''},"
            f" {'saturated' if r['saturated'] else 'spare budget'}, arrivals over"
            f" {r['arrival_s']:g} s; {r['simulated_s'] / 3600:.1f} h simulated; medians of"
            f" {len(r['seeds'])} draws"
        )
        checks: list[Checked] = r.pop("_checked")
        for i, c in enumerate(checks):
            figures.append(
                Figure(
                    name=f"sched {r['scenario']}: {c.metric}",
                    value=round(c.value, 2),
                    unit=c.unit,
                    baseline=c.baseline,
                    baseline_value=round(c.baseline_value, 2),
                    target=c.target,
                    met=c.ok,
                    note=f"{about}. {c.text}",
                    detail=r if i == 0 else {},
                ).with_ratio()
            )
        if r["saturated"]:
            figures.append(oracle_figure(r, about))
    if not args.only:
        figures += cost_figures(10_000 if args.quick else 100_000)
    return figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", action="append", help="run only this scenario (repeatable)")
    parser.add_argument(
        "--full", action="store_true", help="the full set: 10,000 and 100,000 jobs (minutes)"
    )


if __name__ == "__main__":
    bench_main("schedule", run, add_arguments)
