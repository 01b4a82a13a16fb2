"""How a harvester process holds its store and stops: one rule for every command.

Every command opens its store once, with ``opened``: closed on the way out, even when
cancelled by a second signal.

``harvest`` and ``run`` both watch SIGINT and SIGTERM with ``Shutdown``: the first signal
sets ``stop`` (nothing new starts, in-flight work gets its grace, state is saved), a second
one cancels the process's task group at once (still safe: every state change is one atomic
commit and files only get their final names once complete). The receiver is gone after
that, so a third signal gets the default action (kill): the way out if shutdown itself ever
hangs. Commands that run for a moment (``status``, ``submit``...) keep Python's default:
SIGINT ends them with ``INTERRUPTED``.

``EXIT_CODES`` is the one table of what a code means; README's "Exit codes" table is
checked against it word for word (``tests/unit/test_lifecycle.py``).
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from enum import IntEnum
from typing import Any

import anyio

from harvester.config import Config
from harvester.logs import get_logger
from harvester.store.base import Store

log = get_logger("harvester.lifecycle")


class Exit(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    INTERRUPTED = 3


#: what each exit code means, per command (README's table says the same, checked by a test)
EXIT_CODES: Mapping[Exit, str] = {
    Exit.OK: (
        "`harvest`: every job harvested. `run`: stopped by a signal and drained."
        " `cancel`/`retry`: every named job cancelled / put back to work."
        " `status --check`: no problem found"
    ),
    Exit.FAILED: (
        "`harvest`: some jobs ended failed, cancelled or in error (all others harvested)."
        " `cancel`: the provider refused some cancels (those jobs unchanged)."
        " `status --check`: a problem found"
    ),
    Exit.USAGE: (
        "bad usage, config, jobs file or input (an unknown job, provider or state): nothing"
        " was changed. Or a fatal error, each as one `harvester: ...` line: a missing secret,"
        " refused credentials, a port that cannot be bound, a store in use by another engine,"
        " damaged, or not the one `output.dir` was harvested with, an `output.dir` that"
        " cannot be written"
    ),
    Exit.INTERRUPTED: (
        "`harvest`: stopped by `--timeout` or a signal with work left (state saved: a rerun"
        " continues). `run`: a second signal cut the drain short (state saved)."
        " Any command: interrupted by SIGINT"
    ),
}


class Shutdown:
    """SIGINT/SIGTERM for a process that drains: the first sets ``stop``, the second
    cancels ``scope`` and sets ``forced``."""

    def __init__(self) -> None:
        #: set by the first signal (or by the caller: ``harvest --timeout``)
        self.stop = anyio.Event()
        #: a second signal cut the drain short
        self.forced = False

    async def watch(self, scope: anyio.CancelScope, **fields: Any) -> None:
        """Run in the task group ``scope`` cancels; ``fields`` go on the drain's log line."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if not self.stop.is_set():
                    log.warning(
                        "signal received: draining (a second signal stops at once; state is saved)",
                        signal=signum.name,
                        **fields,
                    )
                    self.stop.set()
                    continue
                log.warning("second signal: stopping now (state is saved)", signal=signum.name)
                self.forced = True
                scope.cancel()
                return


@asynccontextmanager
async def opened(config: Config, *, read_only: bool = False) -> AsyncIterator[Store]:
    """``config``'s store, open for the block and closed after it even when cancelled
    (``read_only``: for a caller that only reads, see ``make_store``)."""
    from harvester.store import make_store

    store = make_store(config.store, read_only=read_only)
    await store.open()
    try:
        yield store
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()
