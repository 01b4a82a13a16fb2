"""Persisted job transitions per second through a store's group commit (not a test).

    PYTHONPATH=. python tests/store/measure_throughput.py [--tasks 200] [--transitions 20000]
    PYTHONPATH=.:tests python tests/store/measure_throughput.py --backend postgres [--joined]
    PYTHONPATH=.:tests python tests/store/measure_throughput.py --backend postgres --url URL

Each task owns one job and drives it along the state machine, cycling
succeeded -> harvesting -> succeeded (harvest_retry) for as long as it needs. So every
write is a real, version-checked ``transition``, and each one is committed before its await
returns. Afterwards the store is reopened to confirm every job is at the expected version.

``--backend postgres`` without ``--url`` starts a throwaway server (tests/store/pgserver.py)
with PostgreSQL's durable defaults (fsync and synchronous_commit on), unlike the test suite's.
The password for ``--url`` comes from ``$HARVESTER_DB_PASSWORD``. ``--joined`` writes as a
replica that claimed every job, so each write also checks the owner, as the engine's are.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import anyio

from harvester.jobs import Event, Job
from harvester.store.base import NewJob, Store
from harvester.store.postgres import PostgresStore
from harvester.store.sqlite import SqliteStore

_PREFIX = (Event.SUBMIT, Event.ACCEPTED, Event.COMPLETED)
_CYCLE = (Event.HARVEST, Event.HARVEST_RETRY)


async def drive(store: Store, job: Job, n: int) -> None:
    for i in range(n):
        event = _PREFIX[i] if i < len(_PREFIX) else _CYCLE[(i - len(_PREFIX)) % 2]
        extra = {"remote_id": f"r-{job.key}"} if event is Event.ACCEPTED else {}
        job = await store.transition(job, event, now=time.time(), **extra)


async def measure(
    make: Callable[[], Any], label: str, tasks: int, transitions: int, joined: bool
) -> None:
    per_task = transitions // tasks
    async with make() as store:
        await store.add_jobs(
            [
                NewJob("bench", f"job-{i}", f"job-{i}", None, {"i": i}, "bench")
                for i in range(tasks)
            ],
            now=time.time(),
        )
        jobs = await store.jobs(provider="bench")
        if joined:
            await store.join("bench-replica", lease_s=30.0)
            jobs = await store.claim("bench", limit=tasks)
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for job in jobs:
                tg.start_soon(drive, store, job, per_task)
        elapsed = time.perf_counter() - start
        done = per_task * tasks
        print(
            f"{label}: {done} transitions from {tasks} tasks in {elapsed:.2f} s"
            f" = {done / elapsed:,.0f} transitions/s"
            f" ({store.commits} commits, {store.writes / max(store.commits, 1):.1f} writes each)"
        )
    async with make() as reopened:
        versions = {job.version for job in await reopened.jobs(provider="bench")}
        assert versions == {per_task}, f"expected every job at version {per_task}: {versions}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--transitions", type=int, default=20_000)
    parser.add_argument("--synchronous", choices=("NORMAL", "FULL"), default="NORMAL")
    parser.add_argument("--db", type=Path, help="sqlite file (default: a fresh temp dir)")
    parser.add_argument("--url", help="postgresql:// URL (default: a throwaway server)")
    parser.add_argument("--joined", action="store_true", help="postgres: write as a replica")
    args = parser.parse_args()
    if args.backend == "sqlite":
        sync: Literal["NORMAL", "FULL"] = args.synchronous
        with tempfile.TemporaryDirectory() as tmp:
            path = args.db or Path(tmp) / "bench.db"
            anyio.run(
                measure,
                lambda: SqliteStore(path, synchronous=sync),
                f"sqlite synchronous={sync}",
                args.tasks,
                args.transitions,
                False,
            )
        return
    label = "postgres" + (" (joined replica)" if args.joined else "")
    if args.url:
        password = os.environ.get("HARVESTER_DB_PASSWORD")
        anyio.run(
            measure,
            lambda: PostgresStore(args.url, password=password),
            label,
            args.tasks,
            args.transitions,
            args.joined,
        )
        return
    from store.pgserver import PgServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        raise SystemExit("no PostgreSQL binaries found; pass --url")
    server = PgServer(bindir)
    try:
        server.start(durable=True)
        url = server.url(server.create_database("bench"))
        anyio.run(
            measure,
            lambda: PostgresStore(url, password=server.password),
            f"{label}, fsync on",
            args.tasks,
            args.transitions,
            args.joined,
        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
