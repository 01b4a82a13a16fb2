"""The output directory: proven writable before anything is sent, watched while it is not.

``harvester harvest`` stops at once on a directory it cannot write (``OutputError``, exit
2; a rerun resumes). The daemon waits instead, not ready, and once it runs it parks the
jobs whose harvest found the disk unwritable (no attempt charged: the disk's fault, not the
job's) until a probe proves it writable again, then hands them back to their lanes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio

from harvester.clock import wait_for
from harvester.engine.view import View
from harvester.errors import OutputError
from harvester.logs import get_logger
from harvester.objstore import prove_output

__all__ = ["OUTPUT_RETRY_MAX_S", "OUTPUT_RETRY_MIN_S", "OutputDir"]

log = get_logger("harvester.engine")

#: bounds of the backoff between checks of an output directory that could not be written
OUTPUT_RETRY_MIN_S = 0.5
OUTPUT_RETRY_MAX_S = 10.0


class OutputDir:
    def __init__(self, v: View) -> None:
        self.v = v
        #: why output.dir cannot be written now (daemon: not ready, harvests paused)
        self.problem: str | None = None
        #: run (in a worker thread) each time output.dir has just proved writable, before
        #: anything is sent; the daemon writes the store's marker there (store/binding.py)
        self.ready: Callable[[], None] | None = None
        self._blocked = anyio.Event()
        #: finished jobs waiting for output.dir to be writable again
        self.parked: set[tuple[str, str]] = set()
        #: output failures since the last harvest that succeeded: the watcher's backoff
        #: grows with them, since a probe can pass where a big file still does not fit
        self.strikes = 0

    async def writable(self, stop: anyio.Event | None) -> bool:
        """Prove output.dir writable before anything is sent. ``harvest`` stops at once
        (``OutputError``); the daemon waits, not ready, and False means it was stopped."""
        root = self.v.config.output.dir
        if self.v.burst:
            await anyio.to_thread.run_sync(self._prove, root)
            return True
        delay = OUTPUT_RETRY_MIN_S
        while True:
            try:
                await anyio.to_thread.run_sync(self._prove, root)
            except OutputError as exc:
                if self.problem != str(exc):
                    log.error("output directory not writable; waiting", error=str(exc))
                self.problem = str(exc)
            else:
                self.problem = None
                return True
            if await wait_for(self.v.clock, stop or anyio.Event(), delay):
                return False
            delay = min(delay * 2, OUTPUT_RETRY_MAX_S)

    def _prove(self, root: Path) -> None:
        prove_output(self.v.config.output)
        if self.ready is not None:
            self.ready()

    def failed(self, exc: OutputError) -> None:
        if self.problem is None:
            log.error("output directory not writable; harvests paused", error=str(exc))
        self.problem = str(exc)
        self.strikes += 1
        self._blocked.set()

    async def watch(self) -> None:
        """While output.dir cannot be written, check it with backoff; once it can, hand the
        parked jobs back to their lanes."""
        while True:
            await self._blocked.wait()
            strikes = min(self.strikes, 16)
            delay = min(OUTPUT_RETRY_MIN_S * 2 ** max(strikes - 1, 0), OUTPUT_RETRY_MAX_S)
            while True:
                await self.v.clock.sleep_until(self.v.clock.monotonic() + delay)
                try:
                    await anyio.to_thread.run_sync(prove_output, self.v.config.output)
                    break
                except OutputError as exc:
                    self.problem = str(exc)
                    delay = min(delay * 2, OUTPUT_RETRY_MAX_S)
            self.problem = None
            self._blocked = anyio.Event()
            parked, self.parked = self.parked, set()
            log.info("output directory writable again; harvests resume", jobs=len(parked))
            now = self.v.clock.monotonic()
            for provider, key in sorted(parked):
                self.v.lanes[provider].schedule(key, now)
