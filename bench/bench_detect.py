"""Detection latency in real time, against the emulator (issue 18's measurement).

300 Playment jobs (60 with ``--quick``) are created on the emulator (another process) with a
bare aiohttp loop, all at once; the emulator's ``job_duration_max_s`` spreads their
durations uniformly over 5-90 s (2-20 s with ``--quick``), fixed by job id, so each job's end
is known here (the answer time of its create + its duration, on the same monotonic clock as
the emulator's request log). Two clients then follow the same kind of jobs, each against its
own emulator, at the same time, under the same provider limit (20 and 50 req/s):

- **harvester**: ``harvester harvest`` (the real command line, its own process) tracking the
  jobs by ``job_id``, ``rate_per_s`` = the limit, ``poll_min_s = 0.5``; it also harvests
  each job's results (those requests come out of the same budget);
- **fixed**: every running job polled round robin at a fixed interval, ``jobs / limit`` (the
  whole budget while every job runs), bare aiohttp; a finished job's results are fetched
  the SDK way (attachments API, redirect followed by hand), and every API request, poll or
  fetch, takes a token of the same limit.

From each emulator's request log: a job is *detected* by the first poll of it logged at or
after its end; detection latency = that time - its end. Polls per job = polls of the job's
URL / jobs; requests per job = every API request from the first poll on / jobs. Budget use =
API requests between the first poll and the last detection / (limit x that time).
Target (issue 18 item 3): harvester's p50 and p95 <= the fixed poller's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from bench_common import (
    API_KEY,
    PROJECT,
    EmulatorProcess,
    Figure,
    bench_main,
    emu_requests,
    harvester_config,
    harvester_process,
    job_body,
    log,
    playment_attachment,
    submit_tracking,
    tail,
)

from harvester.emulator.playment_model import job_duration
from harvester.ratelimit import TokenBucket

RATES = (20.0, 50.0)
#: harvester's floor: a user who wants results soon (the fixed poller has none)
POLL_MIN_S = 0.5


def scenario(low: float, high: float) -> str:
    return (
        "seed = 1\n\n[playment]\n"
        f"job_duration_s = {low!r}\njob_duration_max_s = {high!r}\npoints_per_frame = 200\n"
    )


async def create_jobs(emu: EmulatorProcess, n: int, low: float, high: float) -> dict[str, float]:
    """Create ``n`` jobs; {job_id: its end (monotonic, at most the create's round trip
    early)}."""
    url = f"{emu.urls['playment']}/v1/projects/{PROJECT}/jobs"
    headers = {"x-api-key": API_KEY, "Content-Type": "application/json"}
    ends: dict[str, float] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:

        async def one(i: int) -> None:
            body = orjson.dumps(job_body(f"det-{i:05d}", frames=1))
            sent = time.monotonic()
            async with session.post(url, data=body, headers=headers) as resp:
                doc = orjson.loads(await resp.read())
                if resp.status != 200:
                    raise RuntimeError(f"create {i}: {resp.status} {doc}")
                job_id = doc["data"]["job_id"]
                # made between sending and the answer (milliseconds on loopback): the end is
                # taken at the earliest, so the poll that saw it finished is never missed
                ends[job_id] = sent + job_duration(low, high, job_id)

        sem = asyncio.Semaphore(32)

        async def bounded(i: int) -> None:
            async with sem:
                await one(i)

        async with asyncio.TaskGroup() as tg:
            for i in range(n):
                tg.create_task(bounded(i))
    return ends


class _Tokens:
    """The provider limit on this side: one token per API request, ``rate`` a second."""

    def __init__(self, rate: float) -> None:
        self.bucket = TokenBucket(rate, 1.0)
        self.lock = asyncio.Lock()

    async def take(self) -> None:
        async with self.lock:
            now = time.monotonic()
            await asyncio.sleep(self.bucket.time_until(1, now))
            self.bucket.take(1, max(now, time.monotonic()))


async def fixed_poller(emu: EmulatorProcess, ends: dict[str, float], rate: float) -> None:
    """Every running job polled round robin, each every len(jobs)/rate seconds; a finished
    job's results fetched as the SDKs do (attachments API, redirect followed by hand), its
    API requests out of the same budget as the polls."""
    base = emu.urls["playment"]
    jobs_url = f"{base}/v1/projects/{PROJECT}/jobs/"
    headers = {"x-api-key": API_KEY}
    tokens = _Tokens(rate)
    running = list(ends)
    interval = len(running) / rate
    async with aiohttp.ClientSession() as session:

        async def download(private_url: str) -> bytes:
            await tokens.take()
            return await playment_attachment(session, base, headers, private_url)

        async def harvest(job: dict[str, Any], limit: asyncio.Semaphore) -> None:
            async with limit:
                result = orjson.loads(await download(job["result"]))
                for mask in result["annotation_data"]["masks"]:
                    await download(mask["label_url"])

        limit = asyncio.Semaphore(8)
        async with asyncio.TaskGroup() as harvests:
            while running:
                t0 = time.monotonic()
                still = []
                for i, job_id in enumerate(running):
                    due = t0 + i * interval / len(running)
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    await tokens.take()
                    async with session.get(jobs_url + job_id, headers=headers) as resp:
                        job = orjson.loads(await resp.read())["data"]
                    if job["status"] == "completed":
                        harvests.create_task(harvest(job, limit))
                    else:
                        still.append(job_id)
                await asyncio.sleep(max(0.0, t0 + interval - time.monotonic()))
                running = still


def measure(records: list[dict[str, Any]], ends: dict[str, float], rate: float) -> dict[str, float]:
    api = [r for r in records if r["provider"] == "playment"]
    polls: dict[str, list[float]] = {}
    for r in api:
        if r["method"] == "GET" and "/jobs/" in r["path"]:
            polls.setdefault(r["path"].rsplit("/", 1)[-1], []).append(r["t"])
    detected: dict[str, float] = {}
    for job_id, end in ends.items():
        seen = [t for t in polls.get(job_id, []) if t >= end]
        if not seen:
            raise RuntimeError(f"job {job_id} was never seen finished")
        detected[job_id] = min(seen)
    latency = sorted(detected[j] - ends[j] for j in ends)
    first = min(t for ts in polls.values() for t in ts)
    last_detect = max(detected.values())
    used = sum(1 for r in api if first <= r["t"] <= last_detect)
    return {
        "p50_s": statistics.median(latency),
        "p95_s": latency[min(len(latency) - 1, int(0.95 * len(latency)))],
        "max_s": latency[-1],
        "polls_per_job": sum(len(polls.get(j, [])) for j in ends) / len(ends),
        "requests_per_job": sum(1 for r in api if r["t"] >= first) / len(ends),
        "budget_use": used / (rate * max(1e-9, last_detect - first)),
        "last_wait_s": last_detect - max(ends.values()),
    }


def run_rate(
    work: Path, rate: float, n: int, low: float, high: float
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    with (
        EmulatorProcess(work, scenario(low, high), name=f"emu-h{rate:g}") as emu_h,
        EmulatorProcess(work, scenario(low, high), name=f"emu-f{rate:g}") as emu_f,
    ):
        cfg = harvester_config(
            work,
            emu_h,
            name=f"harvester-{rate:g}",
            rate_per_s=rate,
            burst=max(1, int(rate // 5)),
            max_concurrency=16,
            poll_min_s=POLL_MIN_S,
            poll_max_s=30.0,
        )
        ends_h = asyncio.run(create_jobs(emu_h, n, low, high))
        submit_tracking(cfg, [(f"det-{i:05d}", j) for i, j in enumerate(ends_h)])
        ends_f = asyncio.run(create_jobs(emu_f, n, low, high))
        fixed = threading.Thread(target=lambda: asyncio.run(fixed_poller(emu_f, ends_f, rate)))
        with harvester_process(cfg) as proc:
            fixed.start()
            try:
                proc.wait(timeout=high * 6 + 120)
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(
                    f"harvester did not finish: {tail(cfg.parent / 'harvester.log')}"
                ) from exc
            if proc.returncode != 0:
                raise RuntimeError(
                    f"harvester exited {proc.returncode}: {tail(cfg.parent / 'harvester.log')}"
                )
            fixed.join(timeout=high * 6 + 120)

        async def logs() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            async with aiohttp.ClientSession() as session:
                return await emu_requests(session, emu_h), await emu_requests(session, emu_f)

        rec_h, rec_f = asyncio.run(logs())
        out["harvester"] = measure(rec_h, ends_h, rate)
        out["fixed"] = measure(rec_f, ends_f, rate)
    for k, v in out.items():
        log(
            f"{rate:g} req/s {k}: p50 {v['p50_s']:.1f} p95 {v['p95_s']:.1f} max {v['max_s']:.1f} s,"
            f" {v['polls_per_job']:.1f} polls/job, budget use {v['budget_use']:.2f}"
        )
    return out


def run(args: argparse.Namespace, work: Path) -> list[Figure]:
    n, low, high = (60, 2.0, 20.0) if args.quick else (300, 5.0, 90.0)
    figures = []
    for rate in RATES:
        res = run_rate(work, rate, n, low, high)
        h, f = res["harvester"], res["fixed"]
        about = (
            f"{n} Playment jobs, durations uniform {low:g}-{high:g} s, {rate:g} req/s;"
            f" harvester p50/p95/max {h['p50_s']:.1f}/{h['p95_s']:.1f}/{h['max_s']:.1f} s,"
            f" {h['polls_per_job']:.1f} polls/job ({h['requests_per_job']:.1f} requests with"
            f" the harvest), budget use {h['budget_use']:.2f}, last wait {h['last_wait_s']:.1f} s;"
            f" fixed poller {f['p50_s']:.1f}/{f['p95_s']:.1f}/{f['max_s']:.1f} s,"
            f" {f['polls_per_job']:.1f} polls/job, budget use {f['budget_use']:.2f},"
            f" last wait {f['last_wait_s']:.1f} s"
        )
        for q in ("p50", "p95"):
            figures.append(
                Figure(
                    name=f"detection latency {q}, {n} jobs at {rate:g} req/s (emulator)",
                    value=round(h[f"{q}_s"], 2),
                    unit="s",
                    baseline="fixed-interval poller",
                    baseline_value=round(f[f"{q}_s"], 2),
                    target="<= fixed poller's",
                    met=h[f"{q}_s"] <= f[f"{q}_s"],
                    note=about,
                    detail=res if q == "p50" else {},
                ).with_ratio()
            )
    return figures


if __name__ == "__main__":
    bench_main("detect", run)
