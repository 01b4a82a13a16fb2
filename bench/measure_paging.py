"""Paging a large sqlite store: N jobs (default 1,000,000) walked with ``Store.page`` 1,000 at a
time; prints the time per page and the peak RSS growth during the walk.

    .venv/bin/python bench/measure_paging.py /tmp/paging.db [N]

Run it twice: the first run also adds the jobs, and its walk pays for the write-ahead log the
bulk insert left (about 70 ms a page); a second run walks a checkpointed file (the figure that
counts: about 5.5 ms a page at 1,000,000 jobs, the same as at 20,000). A ``.filled`` file next
to the store tells the second run not to add again."""

import asyncio
import resource
import sys
import time
from pathlib import Path

from harvester.store.base import NewJob
from harvester.store.sqlite import SqliteStore

N = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000


async def main(path: Path, fill: bool) -> None:
    async with SqliteStore(path) as store:
        t0 = time.perf_counter()
        for start in range(0, N if fill else 0, 50_000):
            await store.add_jobs(
                [
                    NewJob(
                        "modzy" if i % 3 else "bentley",
                        f"j-{i:07d}",
                        f"j-{i:07d}",
                        None,
                        {"x": i},
                        "t",
                    )
                    for i in range(start, min(N, start + 50_000))
                ],
                now=1.0,
            )
        print(f"added {N} in {time.perf_counter() - t0:.1f} s")
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        after, pages, seen, slowest = 0, 0, 0, 0.0
        t0 = time.perf_counter()
        while True:
            t = time.perf_counter()
            page = await store.page(provider="modzy", after=after, limit=1000)
            slowest = max(slowest, time.perf_counter() - t)
            pages += 1
            seen += len(page.jobs)
            if page.next_after is None:
                break
            after = page.next_after
        walk = time.perf_counter() - t0
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        per_page = walk / pages * 1000
        growth = (rss1 - rss0) / 1024
        print(
            f"walked {seen} modzy jobs in {pages} pages, {walk:.1f} s, mean {per_page:.2f} ms"
            f"/page, slowest {slowest * 1000:.1f} ms; peak RSS growth in the walk {growth:.1f} MiB"
        )


if __name__ == "__main__":
    filled = Path(sys.argv[1] + ".filled")
    asyncio.run(main(Path(sys.argv[1]), fill=not filled.exists()))
    filled.touch()
