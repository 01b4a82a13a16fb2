"""Where a harvest's blocking work runs: decoding, hashing, writes, ``fsync``, renames.

On the event loop, one big mask would stall every poll of every provider for as long as it
takes to decode; so each such step (one chunk at a time, so memory stays flat) runs in a
worker thread, at most ``threads`` of them at once across the whole process. numpy, zlib and
hashlib release the GIL for the bulk of that work (a decoding thread holds it ~0.12-0.18 of
the time, for numpy's per-call work), so two cores decode 1.5-1.9 times as fast as one (it
varies from run to run and machine to machine), where two processes doing the same work reach
about 2 (``bench/bench_offload.py``).

``threads = 0`` keeps everything on the event loop (the behaviour before this module): the
benchmark's baseline, and a way to rule threads out when chasing a problem.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

T = TypeVar("T")


def default_threads() -> int:
    """One worker thread per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Offload:
    """Runs blocking calls in at most ``threads`` worker threads (0: inline, on the loop)."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = default_threads() if threads is None else max(0, threads)
        self._limiter: anyio.CapacityLimiter | None = None

    @property
    def inline(self) -> bool:
        return self.threads == 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.threads == 0:
            return fn(*args)
        if self._limiter is None:
            # Made on first use: a limiter belongs to the event loop that runs it.
            self._limiter = anyio.CapacityLimiter(self.threads)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
