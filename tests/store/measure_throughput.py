"""Persisted job transitions per second through SqliteStore's group commit (not a test).

    PYTHONPATH=. python tests/store/measure_throughput.py [--tasks 200] [--transitions 20000]

Each task owns one job and drives it along the state machine, cycling
succeeded -> harvesting -> succeeded (harvest_retry) for as long as it needs. So every
write is a real, version-checked ``transition``, and each one is committed before its await
returns. Afterwards the file is reopened to confirm every job is at the expected version.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Literal

import anyio

from harvester.jobs import Event, Job
from harvester.store.base import NewJob
from harvester.store.sqlite import SqliteStore

_PREFIX = (Event.SUBMIT, Event.ACCEPTED, Event.COMPLETED)
_CYCLE = (Event.HARVEST, Event.HARVEST_RETRY)


async def drive(store: SqliteStore, job: Job, n: int) -> None:
    for i in range(n):
        event = _PREFIX[i] if i < len(_PREFIX) else _CYCLE[(i - len(_PREFIX)) % 2]
        extra = {"remote_id": f"r-{job.key}"} if event is Event.ACCEPTED else {}
        job = await store.transition(job, event, now=time.time(), **extra)


async def measure(
    path: Path, tasks: int, transitions: int, synchronous: Literal["NORMAL", "FULL"]
) -> None:
    per_task = transitions // tasks
    async with SqliteStore(path, synchronous=synchronous) as store:
        await store.add_jobs(
            [
                NewJob("bench", f"job-{i}", f"job-{i}", None, {"i": i}, "bench")
                for i in range(tasks)
            ],
            now=time.time(),
        )
        jobs = await store.jobs(provider="bench")
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for job in jobs:
                tg.start_soon(drive, store, job, per_task)
        elapsed = time.perf_counter() - start
        done = per_task * tasks
        print(
            f"synchronous={synchronous}: {done} transitions from {tasks} tasks in {elapsed:.2f} s"
            f" = {done / elapsed:,.0f} transitions/s"
            f" ({store.commits} commits, {store.writes / max(store.commits, 1):.1f} writes each)"
        )
    async with SqliteStore(path) as reopened:
        versions = {job.version for job in await reopened.jobs(provider="bench")}
        assert versions == {per_task}, f"expected every job at version {per_task}: {versions}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--transitions", type=int, default=20_000)
    parser.add_argument("--synchronous", choices=("NORMAL", "FULL"), default="NORMAL")
    parser.add_argument("--db", type=Path, help="database file (default: a fresh temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db or Path(tmp) / "bench.db"
        anyio.run(measure, path, args.tasks, args.transitions, args.synchronous)


if __name__ == "__main__":
    main()
