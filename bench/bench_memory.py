"""RSS of one harvester process tracking 100,000 jobs, above the bare interpreter.

1. The emulator (its own process) runs jobs that never finish (``job_duration_s`` = 1e9), and
   100,000 of them are created on it with a bare aiohttp loop.
2. A jobs file tracks them (``job_id`` lines); ``harvester submit`` stores them in a fresh
   sqlite store, in its own process.
3. ``harvester harvest`` (the real command line, a third process) loads all of them, moves each
   from new to running (one store transition each) and polls each once; polls answer "still in
   progress" and the next poll is an hour away (``poll_min_s`` 3600), so the process then just
   holds 100,000 tracked jobs.
4. Once the emulator has seen a poll for every one of the jobs (distinct job paths in
   ``/_emulator/requests``), and one second later, the harvester's VmRSS is read from
   /proc. The figure is that minus the VmRSS of ``python -c "import harvester.engine"`` (the
   bare interpreter with harvester's modules loaded; the best of three).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import aiohttp
from bench_common import (
    EmulatorProcess,
    Figure,
    bare_interpreter_rss_kb,
    bench_main,
    create_remote_jobs,
    emu_post,
    emu_requests,
    harvester_config,
    harvester_process,
    log,
    proc_status_kb,
    scenario_toml,
    submit_tracking,
    tail,
)

TARGET_MB = 100.0
TIMEOUT_S = 400.0


def run(args: argparse.Namespace, work: Path) -> list[Figure]:
    n = 10_000 if args.quick else 100_000
    with EmulatorProcess(work, scenario_toml(job_duration_s=1e9)) as emu:
        t0 = time.perf_counter()
        jobs = asyncio.run(create_remote_jobs(emu, n, prefix="mem"))
        log(f"created {n:,} jobs on the emulator in {time.perf_counter() - t0:.1f} s")
        baseline_kb = bare_interpreter_rss_kb()
        one_kb, _, _, _, _ = _tracked(work, emu, jobs[:1], "memory-1")
        rss_kb, hwm_kb, elapsed, samples, submit_s = _tracked(work, emu, jobs, "memory")
    above_mb = (rss_kb - baseline_kb) / 1024
    per_job = (rss_kb - one_kb) * 1024 / (n - 1)
    met = above_mb < TARGET_MB
    note = (
        f"`harvester harvest` tracking {n:,} running jobs, each loaded, moved to running and"
        f" polled once ({elapsed:.1f} s from process start); VmRSS {rss_kb / 1024:.1f} MB minus"
        f" {baseline_kb / 1024:.1f} MB for `python -c 'import harvester.engine'`."
        f" The same command tracking 1 job holds {(one_kb - baseline_kb) / 1024:.1f} MB above"
        f" that floor, so the jobs cost {(rss_kb - one_kb) / 1024:.1f} MB"
        f" ({per_job:,.0f} bytes per job). Peak (VmHWM) {(hwm_kb - baseline_kb) / 1024:.1f} MB"
        " above the floor."
    )
    if not met:
        note += f" Missed: {above_mb:.1f} MB >= {TARGET_MB:g} MB."
    return [
        Figure(
            name=f"RSS tracking {n:,} jobs, above bare interpreter",
            value=round(above_mb, 1),
            unit="MB",
            baseline="python -c 'import harvester.engine' VmRSS",
            baseline_value=round(baseline_kb / 1024, 1),
            target=f"< {TARGET_MB:g} MB",
            met=met,
            note=note,
            detail={
                "jobs": n,
                "vmrss_kb": rss_kb,
                "vmhwm_kb": hwm_kb,
                "baseline_vmrss_kb": baseline_kb,
                "one_job_vmrss_kb": one_kb,
                "bytes_per_job": round(per_job),
                "seconds_to_poll_all": round(elapsed, 2),
                "submit_s": round(submit_s, 2),
                "rss_samples_mb": samples,
            },
        ),
        Figure(
            name=f"RSS per tracked job ({n:,} jobs vs 1)",
            value=round(per_job),
            unit="bytes",
            note="(VmRSS tracking all jobs - VmRSS tracking 1 job) / (jobs - 1); no target.",
        ),
    ]


def _tracked(
    work: Path, emu: EmulatorProcess, jobs: list[tuple[str, str]], name: str
) -> tuple[int, int, float, list[tuple[float, float]], float]:
    cfg = harvester_config(
        work, emu, name=name, poll_min_s=3600.0, poll_max_s=7200.0, max_concurrency=64
    )
    submit_s = submit_tracking(cfg, jobs)
    log(f"harvester submit stored {len(jobs):,} jobs in {submit_s:.1f} s")
    rss, hwm, elapsed, samples = asyncio.run(_measure(emu, cfg, len(jobs)))
    log(f"{len(jobs):,} jobs: VmRSS {rss / 1024:.1f} MB, VmHWM {hwm / 1024:.1f} MB")
    return rss, hwm, elapsed, samples, submit_s


async def _measure(
    emu: EmulatorProcess, cfg: Path, n: int
) -> tuple[int, int, float, list[tuple[float, float]]]:
    polled: set[str] = set()
    samples: list[tuple[float, float]] = []
    async with aiohttp.ClientSession() as session:
        await emu_post(session, emu, "/reset-stats")  # the log holds only harvester's requests
        since = 0
        with harvester_process(cfg) as proc:
            start = time.monotonic()
            while True:
                await asyncio.sleep(0.5)
                now = time.monotonic() - start
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"harvester exited ({proc.returncode}) before polling every job:"
                        f" {tail(cfg.parent / 'harvester.log')}"
                    )
                samples.append((round(now, 1), round(proc_status_kb(proc.pid, "VmRSS") / 1024, 1)))
                records = await emu_requests(session, emu, since)
                since += len(records)
                for r in records:
                    if r["method"] == "GET" and "/jobs/" in r["path"] and r["status"] == 200:
                        polled.add(r["path"])
                if len(polled) >= n:
                    break
                if now > TIMEOUT_S:
                    raise RuntimeError(f"only {len(polled):,} of {n:,} jobs polled in {now:.0f} s")
            elapsed = time.monotonic() - start
            log(f"every job polled once after {elapsed:.1f} s; settling 1 s")
            await asyncio.sleep(1.0)
            rss = proc_status_kb(proc.pid, "VmRSS")
            hwm = proc_status_kb(proc.pid, "VmHWM")
    step = max(1, len(samples) // 40)
    return rss, hwm, elapsed, samples[::step]


if __name__ == "__main__":
    bench_main("memory", run)
