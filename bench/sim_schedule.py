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
- **bound**: round robin's expected latency at each completion, ``max(n(t)/R, floor)/2``
  where n(t) is the number of jobs running then (the issue's n(t)/(2R)).

Detection latency is (time a poll saw the job finished) - (its end). Requests per job are
polls / jobs. Budget use is polls / (R x time from the first arrival to the last detection).
The wait after the last completion is (last detection) - (latest end).

Targets (issue 18, as ratios in the same run): harvester's p50 and p95 <= the fixed poller's at
no more requests; where the budget is saturated (jobs at their floor would want more than R),
p95 <= 1.2x the bound's p95; where it is not, p95 <= 1.5x the floor; the wait after the last
completion <= 1.5x the fixed poller's. Every scenario is reported, including those that miss.

    .venv/bin/python bench/sim_schedule.py                 # the full set (10,000 and 100,000 jobs)
    .venv/bin/python bench/sim_schedule.py --quick         # the small set `make bench` runs
    .venv/bin/python bench/sim_schedule.py --only lognormal-tight-10k
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import math
import random
import time
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


# -- workloads --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    n: int
    dist: str  #: uniform | lognormal | bimodal
    rate: float  #: the budget, requests/s
    floor: float  #: poll_min_s
    arrival_s: float = 0.0  #: jobs arrive uniformly over [0, arrival_s]; 0: one batch
    ladder: bool = False  #: Bentley's ladder as the floor, and progress reported
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

    def progress(self, i: int, t: float) -> float:
        a, e = self.arrive[i], self.end[i]
        return float(int(100 * ((t - a) / (e - a)) ** self.gamma[i]))

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
        self.rng = random.Random(sc.seed)

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
    with_progress = sc.ladder
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
            strat.polled(key, t, jobs.progress(key, t) if with_progress else None)
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


# -- the scenarios ----------------------------------------------------------------------------


def scenarios(quick: bool) -> list[Scenario]:
    uni = ("uniform", (5.0, 90.0))  # Cognite / Playment auto-annotation: seconds
    logn = ("lognormal", (20 * MIN, 1.0))  # Bentley reality analysis: minutes to hours
    bim = ("bimodal", (0.8, 3 * MIN, 0.5, 1 * DAY, 0.4))  # Playment human: minutes or a day
    out: list[Scenario] = []

    def add(name: str, n: int, dist: tuple[str, tuple[float, ...]], **kw: Any) -> None:
        out.append(Scenario(name, n, dist[0], params=dist[1], **kw))

    if quick:
        n = 2000
        add("uniform-starved-2k", n, uni, rate=4.0, floor=5.0)
        add("uniform-ample-2k", n, uni, rate=800.0, floor=5.0)
        add("lognormal-tight-2k", n, logn, rate=4.0, floor=60.0, arrival_s=HOUR)
        add("bentley-ladder-2k", n, logn, rate=5.0, floor=15.0, arrival_s=HOUR, ladder=True)
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
    add("bentley-ladder-10k", n, logn, rate=20.0, floor=15.0, arrival_s=HOUR, ladder=True)
    add("bimodal-starved-10k", n, bim, rate=1.0, floor=300.0, arrival_s=HOUR)
    add("bimodal-tight-10k", n, bim, rate=5.0, floor=300.0, arrival_s=HOUR)
    add("lognormal-tight-100k", 100_000, logn, rate=150.0, floor=60.0, arrival_s=HOUR)
    return out


# -- reporting --------------------------------------------------------------------------------


@dataclass
class Checked:
    name: str
    ok: bool
    text: str


def check(sc: Scenario, peak: int, res: dict[str, Outcome], rr: list[float]) -> list[Checked]:
    h, f = res["harvester"], res["fixed"]
    saturated = peak / sc.floor > sc.rate
    out = [
        Checked(
            "p50 <= fixed",
            h.q(0.5) <= f.q(0.5),
            f"p50 {h.q(0.5):.1f} s vs fixed {f.q(0.5):.1f} s",
        ),
        Checked(
            "p95 <= fixed",
            h.q(0.95) <= f.q(0.95),
            f"p95 {h.q(0.95):.1f} s vs fixed {f.q(0.95):.1f} s",
        ),
        Checked("requests <= fixed", h.polls <= f.polls, f"{h.polls:,} vs fixed {f.polls:,}"),
        Checked(
            "last wait <= 1.5x fixed",
            h.last_wait <= 1.5 * max(f.last_wait, 1e-9),
            f"{h.last_wait:.1f} s vs fixed {f.last_wait:.1f} s",
        ),
    ]
    if saturated:
        b95 = quantile(rr, 0.95)
        out.append(
            Checked(
                "p95 <= 1.2x bound",
                h.q(0.95) <= 1.2 * b95,
                f"p95 {h.q(0.95):.1f} s vs bound p95 {b95:.1f} s ({h.q(0.95) / b95:.2f}x)",
            )
        )
    else:
        fl = sc.floor if not sc.ladder else BENTLEY_LADDER[-1]
        out.append(
            Checked(
                "p95 <= 1.5x floor",
                h.q(0.95) <= 1.5 * fl,
                f"p95 {h.q(0.95):.1f} s vs floor {fl:g} s",
            )
        )
    return out


def run_scenario(sc: Scenario) -> dict[str, Any]:
    jobs = Jobs.make(sc)
    peak = jobs.peak
    res = {name: simulate(sc, jobs, name) for name in STRATEGIES}
    res["sdk"] = sdk(sc, jobs)
    rr = bound(sc, jobs)
    checks = check(sc, peak, res, rr)
    log(
        f"{sc.name}: "
        + ", ".join(f"{k} {v.seconds:.1f}s" for k, v in res.items())
        + " | "
        + "; ".join(f"{c.name}: {'ok' if c.ok else 'MISS'} ({c.text})" for c in checks)
    )
    rows = {
        k: {
            "p50_s": v.q(0.5),
            "p95_s": v.q(0.95),
            "max_s": v.q(1.0),
            "requests_per_job": v.per_job,
            "budget_use": v.budget_use,
            "last_wait_s": v.last_wait,
            "sim_seconds": v.seconds,
        }
        for k, v in res.items()
    }
    rows["bound"] = {
        "p50_s": quantile(rr, 0.5),
        "p95_s": quantile(rr, 0.95),
        "max_s": rr[-1],
    }
    return {
        "scenario": sc.name,
        "jobs": sc.n,
        "distribution": f"{sc.dist} {sc.params}",
        "rate_per_s": sc.rate,
        "floor_s": sc.floor,
        "ladder": sc.ladder,
        "arrival_s": sc.arrival_s,
        "saturated": peak / sc.floor > sc.rate,
        "peak_running": peak,
        "simulated_s": res["harvester"].last_detect - jobs.arrive[0],
        "strategies": rows,
        "checks": [{"name": c.name, "ok": c.ok, "text": c.text} for c in checks],
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | strategy | latency p50 / p95 / max (s) | requests/job | budget use |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for k in ("harvester", "fixed", "before", "sdk", "bound"):
            s = r["strategies"][k]
            lat = f"{s['p50_s']:.1f} / {s['p95_s']:.1f} / {s['max_s']:.1f}"
            per = f"{s['requests_per_job']:.1f}" if "requests_per_job" in s else ""
            use = f"{s['budget_use']:.2f}" if "budget_use" in s else ""
            lines.append(f"| {r['scenario']} | {k} | {lat} | {per} | {use} |")
    return "\n".join(lines)


def run(args: argparse.Namespace, work: Path) -> list[Figure]:
    chosen = [s for s in scenarios(args.quick) if not args.only or s.name in args.only]
    results = [run_scenario(sc) for sc in chosen]
    print(table(results))
    figures = []
    for r in results:
        h, f = r["strategies"]["harvester"], r["strategies"]["fixed"]
        missed = [c for c in r["checks"] if not c["ok"]]
        figures.append(
            Figure(
                name=f"sched {r['scenario']}: p95 detection latency",
                value=round(h["p95_s"], 2),
                unit="s",
                baseline="fixed-interval poller",
                baseline_value=round(f["p95_s"], 2),
                target="issue 18 item 3: " + ", ".join(c["name"] for c in r["checks"]),
                met=not missed,
                note=(
                    f"{r['jobs']:,} jobs, {r['distribution']}, {r['rate_per_s']:g} req/s, floor"
                    f" {r['floor_s']:g} s{' (Bentley ladder, progress)' if r['ladder'] else ''},"
                    f" {'saturated' if r['saturated'] else 'spare budget'};"
                    f" {r['simulated_s'] / 3600:.1f} h simulated. "
                    + "; ".join(
                        f"{c['name']}: {'ok' if c['ok'] else 'MISSED'} ({c['text']})"
                        for c in r["checks"]
                    )
                ),
                detail=r,
            ).with_ratio()
        )
    return figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", action="append", help="run only this scenario (repeatable)")


if __name__ == "__main__":
    bench_main("schedule", run, add_arguments)
