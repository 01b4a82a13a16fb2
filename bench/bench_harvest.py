"""Wall time to harvest 1,000 jobs: harvester against "the SDK way", same emulator scenario.

Scenario: jobs take 2 s from create to ``completed`` (the emulator's default), one point-cloud
frame each with a small mask (1,000 points), no faults, no rate limit.

- **harvester**: ``harvester harvest -c CONFIG jobs.jsonl`` (the real command line, from an
  empty store to exit 0), 1,000 new jobs, ``poll_min_s = 1``, ``poll_max_s = 4``,
  ``max_concurrency = 64``, unlimited rate. Timed from process start to exit; every job must
  end harvested, and the emulator must have seen each created exactly once.
- **the SDK way**: what a script around a provider SDK does, in plain aiohttp: one job at a
  time, create it, poll it every 1 s (sleeping in between) until ``completed``, then download
  its result and its mask (attachments API, then the signed URL), decode the mask with
  ``orjson.loads`` + ``np.array`` and save it, then the next job. A full run would take about
  50 min, so it runs on a sample of 20 jobs (3 with ``--quick``) and is extrapolated
  linearly to 1,000: ``mean seconds per job x 1,000``.

``ratio`` is harvester time / SDK-way time (so 0.01 means 100x faster).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
from bench_common import (
    API_KEY,
    PROJECT,
    EmulatorProcess,
    Figure,
    bench_main,
    emu_stats,
    harvester_config,
    harvester_harvest,
    job_body,
    log,
    playment_attachment,
    scenario_toml,
    write_create_jobs,
)

POLL_S = 1.0
POINTS = 1000


def run(args: argparse.Namespace, work: Path) -> list[Figure]:
    n = 100 if args.quick else 1000
    sample = 3 if args.quick else 20
    with EmulatorProcess(work, scenario_toml(job_duration_s=2.0, points_per_frame=POINTS)) as emu:
        cfg = harvester_config(
            work,
            emu,
            name="harvest",
            rate_per_s=0,
            max_concurrency=64,
            poll_min_s=POLL_S,
            poll_max_s=4.0,
        )
        jobs_file = cfg.parent / "jobs.jsonl"
        write_create_jobs(jobs_file, (f"h-{i:05d}" for i in range(n)))
        harvester_s, summary = harvester_harvest(cfg, jobs_file, what="harvester harvest")
        stats = emu_stats(emu)
        harvested = summary["providers"]["playment"].get("harvested", 0)
        creates = stats["playment"]["creates"]
        dup = stats["playment"]["duplicate_creates"]
        log(f"harvester: {harvested} of {n} harvested in {harvester_s:.1f} s")
        if harvested != n or creates != n or dup:
            raise RuntimeError(
                f"harvester run incomplete: {harvested}/{n} harvested, {creates} creates,"
                f" {dup} duplicate creates"
            )
        out = work / "sdk-way"
        out.mkdir()
        per_job = asyncio.run(_sdk_way(emu, sample, out))
    mean = sum(per_job) / len(per_job)
    sdk_total = mean * n
    log(f"SDK way: {mean:.2f} s per job over {sample} jobs -> {sdk_total:,.0f} s for {n:,}")
    fig = Figure(
        name=f"wall time to harvest {n:,} jobs (1 frame of {POINTS:,} points each)",
        value=round(harvester_s, 2),
        unit="s",
        baseline=f"SDK way: one job at a time, poll every {POLL_S:g} s"
        f" (extrapolated from {sample} jobs)",
        baseline_value=round(sdk_total, 1),
        note=(
            f"harvester: `harvester harvest` from an empty store to exit 0, {n:,} jobs created,"
            f" polled (poll_min_s {POLL_S:g}) and harvested to .npy with manifests; jobs take"
            f" 2 s at the emulator. SDK way: {sample} jobs done sequentially took"
            f" {sum(per_job):.1f} s ({mean:.2f} s per job, min {min(per_job):.2f},"
            f" max {max(per_job):.2f}), times {n:,}. harvester is"
            f" {sdk_total / harvester_s:,.0f}x faster."
        ),
        detail={"sdk_seconds_per_job": [round(x, 3) for x in per_job], "jobs": n},
    ).with_ratio()
    return [fig]


# -- the SDK way -----------------------------------------------------------------------------


async def _sdk_way(emu: EmulatorProcess, sample: int, out: Path) -> list[float]:
    base = emu.urls["playment"]
    headers = {"x-api-key": API_KEY}
    times: list[float] = []
    async with aiohttp.ClientSession() as session:

        async def api(method: str, url: str, **kw: Any) -> Any:
            async with session.request(method, url, headers=headers, **kw) as resp:
                doc = orjson.loads(await resp.read())
                if resp.status != 200 or not doc.get("success"):
                    raise RuntimeError(f"{method} {url}: {resp.status} {doc}")
                return doc["data"]

        async def download(private_url: str) -> bytes:
            return await playment_attachment(session, base, headers, private_url)

        for i in range(sample):
            t0 = time.perf_counter()
            ref = f"sdk-{i:04d}"
            created = await api(
                "POST",
                f"{base}/v1/projects/{PROJECT}/jobs",
                data=orjson.dumps(job_body(ref, frames=1)),
            )
            job_id = created["job_id"]
            while True:
                job = await api("GET", f"{base}/v1/projects/{PROJECT}/jobs/{job_id}")
                if job["status"] == "completed":
                    break
                await asyncio.sleep(POLL_S)
            result = orjson.loads(await download(job["result"]))
            for mask in result["annotation_data"]["masks"]:
                labels = np.array(orjson.loads(await download(mask["label_url"])), dtype=np.uint8)
                np.save(out / f"{ref}-{mask['frame_id']}.npy", labels)
            times.append(time.perf_counter() - t0)
    return times


if __name__ == "__main__":
    bench_main("harvest", run)
