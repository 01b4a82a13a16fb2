"""Limiter accuracy, observed at the emulator: the request rate, and the Retry-After gate.

Both parts run ``harvester harvest`` (the real command line, its own process) tracking 300 jobs
that never finish, against the emulator (another process) with no server-side rate limit.
Every figure comes from the emulator's request log (``/_emulator/requests``: one record per
request with the emulator's ``time.monotonic()`` when the answer was decided; same clock as
this process).

**Rate.** ``rate_per_s = 100``, ``burst = 10``, ``max_concurrency = 64``, and jobs due every
0.5 s (600 polls/s wanted), so the limiter is the only brake. Window: 30 s (5 s with
``--quick``) starting 2 s after the first request (the saved-up burst is spent by then).
Observed rate = Playment API requests logged in the window / window length. Target: within
±2% of 100/s.

**Retry-After.** Rate unlimited, jobs due every 0.05 s, so harvester polls flat out. Once every
job has been polled, a 429 storm is injected (``POST /_emulator/faults``: every API request
for 6 s is answered 429 with ``Retry-After: 2``). The log is then cut into *closures*: a
closure starts at a 429 answered at time t0 that is not inside an earlier closure's window,
and its window is (t0, t0 + 2 s). A correct client sends nothing the emulator can log inside a
window, because its own deadline (receipt of that answer + 2 s) is later still. Requests
logged inside a window are counted as:

- *in flight* (excused) when they are among the first ``max_concurrency - 1`` requests logged
  after t0 and were logged at most 25 ms after t0: requests the client had already sent, or
  admitted, before that 429 could have reached it. With ``max_concurrency = 1`` nothing is
  ever in flight, so nothing is excused;
- *violations* otherwise: the figure, target 0.

Measured twice: ``max_concurrency = 1`` (the strict case) and ``max_concurrency = 64``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
from bench_common import (
    EmulatorProcess,
    Figure,
    bench_main,
    create_remote_jobs,
    emu_post,
    emu_request_count,
    emu_requests,
    harvester_config,
    harvester_process,
    log,
    scenario_toml,
    submit_tracking,
    tail,
)

N_JOBS = 300
RATE = 100.0
BURST = 10
TOLERANCE = 0.02
RETRY_AFTER_S = 2
STORM_S = 6.0
IN_FLIGHT_S = 0.025


def run(args: argparse.Namespace, work: Path) -> list[Figure]:
    window = 5.0 if args.quick else 30.0
    with EmulatorProcess(work, scenario_toml(job_duration_s=1e9)) as emu:
        jobs = asyncio.run(create_remote_jobs(emu, N_JOBS, prefix="lim"))
        figures = [_rate_figure(work, emu, jobs, window)]
        for concurrency in (1, 64):
            figures.append(_retry_after_figure(work, emu, jobs, concurrency))
    return figures


def _prepare(
    work: Path, emu: EmulatorProcess, jobs: list[tuple[str, str]], name: str, **kw: Any
) -> Path:
    cfg = harvester_config(work, emu, name=name, **kw)
    submit_tracking(cfg, jobs)
    return cfg


# -- rate ----------------------------------------------------------------------------------


def _rate_figure(
    work: Path, emu: EmulatorProcess, jobs: list[tuple[str, str]], window: float
) -> Figure:
    cfg = _prepare(
        work,
        emu,
        jobs,
        "rate",
        rate_per_s=RATE,
        burst=BURST,
        max_concurrency=64,
        poll_min_s=0.5,
        poll_max_s=0.5,
    )
    records = asyncio.run(_run_rate(emu, cfg, window))
    api = [r for r in records if r["provider"] == "playment"]
    if not api:
        raise RuntimeError(f"no requests logged: {tail(cfg.parent / 'harvester.log')}")
    t0 = api[0]["t"] + 2.0
    t1 = t0 + window
    inside = [r for r in api if t0 <= r["t"] < t1]
    if not api[-1]["t"] >= t1:
        raise RuntimeError("the run ended before the window closed")
    observed = len(inside) / window
    per_second = [0] * int(window)
    for r in inside:
        per_second[min(int(r["t"] - t0), len(per_second) - 1)] += 1
    fig = Figure(
        name=f"limiter: observed request rate over {window:g} s",
        value=round(observed, 2),
        unit="req/s",
        baseline="configured rate_per_s",
        baseline_value=RATE,
        target=f"within ±{TOLERANCE:.0%} of configured",
        detail={
            "requests_in_window": len(inside),
            "non_200": sum(1 for r in inside if r["status"] != 200),
            "per_second_min": min(per_second),
            "per_second_max": max(per_second),
            "burst": BURST,
        },
    ).with_ratio()
    assert fig.ratio is not None
    fig.met = abs(fig.ratio - 1) <= TOLERANCE
    fig.note = (
        f"rate_per_s {RATE:g}, burst {BURST}, 600 polls/s wanted; {len(inside):,} requests"
        f" logged by the emulator in a {window:g} s window starting 2 s after the first"
        f" (per-second counts {min(per_second)}..{max(per_second)});"
        f" error {fig.ratio - 1:+.2%}."
    )
    if not fig.met:
        fig.note += f" Missed: off by more than {TOLERANCE:.0%}."
    return fig


async def _run_rate(emu: EmulatorProcess, cfg: Path, window: float) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        since = await emu_request_count(session, emu)
        with harvester_process(cfg) as proc:
            await asyncio.sleep(2.0 + window + 1.0)
            if proc.poll() is not None:
                raise RuntimeError(f"harvester exited: {tail(cfg.parent / 'harvester.log')}")
        return await emu_requests(session, emu, since)


# -- Retry-After -----------------------------------------------------------------------------


def _retry_after_figure(
    work: Path, emu: EmulatorProcess, jobs: list[tuple[str, str]], concurrency: int
) -> Figure:
    cfg = _prepare(
        work,
        emu,
        jobs,
        f"retry-after-{concurrency}",
        rate_per_s=0,
        max_concurrency=concurrency,
        poll_min_s=0.05,
        poll_max_s=0.05,
        max_retries=100,
    )
    records = asyncio.run(_run_storm(emu, cfg))
    api = [r for r in records if r["provider"] == "playment"]
    result = analyse_gate(api, retry_after_s=RETRY_AFTER_S, concurrency=concurrency)
    log(
        f"Retry-After, max_concurrency {concurrency}: {result['closures']} closures,"
        f" {result['violations']} violations, {result['in_flight']} in flight"
    )
    if result["closures"] == 0:
        raise RuntimeError("no 429 was served: the storm did not happen")
    met = result["violations"] == 0
    note = (
        f"429 storm for {STORM_S:g} s with Retry-After: {RETRY_AFTER_S};"
        f" {result['served_429']} answers 429 in {result['closures']} gate closures;"
        f" {result['in_flight']} requests excused as in flight"
        f" (<= {concurrency - 1} per closure, logged <= {IN_FLIGHT_S * 1000:g} ms after the 429;"
        f" latest at {result['in_flight_latest_ms'] or 0:g} ms);"
        f" first request after each window came {result['reopen_delay_ms_median']:.0f} ms"
        " (median) after the window's end."
    )
    if not met:
        note += (
            f" Missed: {result['violations']} requests inside a window, the earliest"
            f" {result['earliest_violation_ms']:.0f} ms after its 429."
        )
    return Figure(
        name=f"limiter: requests inside a Retry-After window, max_concurrency {concurrency}",
        value=result["violations"],
        unit="requests",
        target="0",
        met=met,
        note=note,
        detail=result,
    )


async def _run_storm(emu: EmulatorProcess, cfg: Path) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        since = await emu_request_count(session, emu)
        with harvester_process(cfg) as proc:
            cursor, polled = since, set[str]()
            deadline = time.monotonic() + 60
            while len(polled) < N_JOBS:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"warm-up failed: {tail(cfg.parent / 'harvester.log')}")
                await asyncio.sleep(0.2)
                records = await emu_requests(session, emu, cursor)
                cursor += len(records)
                polled.update(r["path"] for r in records if "/jobs/" in r["path"])
            await emu_post(
                session,
                emu,
                "/faults",
                {
                    "kind": "429",
                    "provider": "playment",
                    "duration_s": STORM_S,
                    "retry_after_s": RETRY_AFTER_S,
                    "retry_after": "seconds",
                },
            )
            await asyncio.sleep(STORM_S + RETRY_AFTER_S + 1.0)
            if proc.poll() is not None:
                raise RuntimeError(f"harvester exited: {tail(cfg.parent / 'harvester.log')}")
        return await emu_requests(session, emu, since)


def analyse_gate(
    records: list[dict[str, Any]], *, retry_after_s: float, concurrency: int
) -> dict[str, Any]:
    """Count requests logged inside Retry-After windows (see the module docstring)."""
    records = sorted(records, key=lambda r: r["t"])
    closures = 0
    served_429 = sum(1 for r in records if r["status"] == 429)
    violations: list[float] = []
    in_flight: list[float] = []
    reopen: list[float] = []
    i = 0
    while i < len(records):
        r = records[i]
        if r["status"] != 429:
            i += 1
            continue
        closures += 1
        t0 = r["t"]
        end = t0 + retry_after_s
        j = i + 1
        after = 0
        while j < len(records) and records[j]["t"] < end:
            offset = records[j]["t"] - t0
            after += 1
            if after <= concurrency - 1 and offset <= IN_FLIGHT_S:
                in_flight.append(offset)
            else:
                violations.append(offset)
            j += 1
        if j < len(records):
            reopen.append(records[j]["t"] - end)
        i = j
    reopen.sort()
    return {
        "served_429": served_429,
        "closures": closures,
        "violations": len(violations),
        "in_flight": len(in_flight),
        "in_flight_latest_ms": round(max(in_flight) * 1000, 1) if in_flight else None,
        "earliest_violation_ms": round(min(violations) * 1000, 1) if violations else None,
        "reopen_delay_ms_median": round(reopen[len(reopen) // 2] * 1000, 1) if reopen else 0.0,
        "reopen_delay_ms_max": round(reopen[-1] * 1000, 1) if reopen else 0.0,
    }


if __name__ == "__main__":
    bench_main("limiter", run)
