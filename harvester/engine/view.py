"""What one job's steps see of the engine.

Each step of a job's life (``submit``, ``reconcile``, ``poll``, ``harvest``, and
``harvester.control``'s cancel and deadline) takes this view rather than the engine: the
store, clock and lanes it works with, the one way to commit a state change
(``transition``), and the three ways to hand a job on (to a retry, to the poll scheduler,
to the harvest pool). The engine (``harvester.engine.core``) is the one implementation;
the steps never reach into its run loop, workers or drain.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from harvester.clock import Clock
from harvester.config import Config
from harvester.errors import HarvesterError, RetryableError
from harvester.jobs import Event, Job
from harvester.lane import Lane
from harvester.metrics import Metrics
from harvester.ownership import Ownership
from harvester.providers.base import Status
from harvester.store.base import Store

__all__ = ["View"]


class View(Protocol):
    @property
    def config(self) -> Config: ...

    @property
    def store(self) -> Store: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def rng(self) -> random.Random: ...

    @property
    def lanes(self) -> Mapping[str, Lane]: ...

    @property
    def ownership(self) -> Ownership:
        """Which jobs are this process's (``harvester.ownership``)."""
        ...

    @property
    def burst(self) -> bool:
        """``harvester harvest``: done once its jobs are (a daemon waits out faults)."""
        ...

    @property
    def on_change(self) -> Callable[[Job], None] | None:
        """Told of every stored change of a job (the daemon's status page)."""
        ...

    async def transition(self, job: Job, event: Event, **changes: Any) -> Job:
        """Commit ``event`` on ``job`` to the store (logged, counted, told), and let go of
        the job if it ended."""
        ...

    def retry_later(self, lane: Lane, key: str, exc: RetryableError) -> None:
        """Step ``key`` again after ``exc``'s backoff (a failure counted)."""
        ...

    def poll_later(
        self, lane: Lane, job: Job, *, changed: bool, started_at: float | None = None
    ) -> None:
        """Hand a running job to its lane's poll scheduler."""
        ...

    async def queue_harvest(self, provider: str, key: str, status: Status | None = None) -> None:
        """Hand a finished job to the harvest pool (``status``: the answer that saw it
        finish, so the harvest need not ask again)."""
        ...

    def fail(self, exc: HarvesterError) -> None:
        """Stop the engine with ``exc``."""
        ...
