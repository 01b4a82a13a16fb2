"""Who may work which job: the one thing that differs between one process and replicas.

The engine runs one job's path (submit -> reconcile -> poll -> harvest) the same way
whatever owns the jobs; it asks its ``Ownership`` only what the two cases answer differently:
which jobs come to it and when, whether it still holds a job, what a store error on a job
means, and what must be proven before a harvest's output is published.

- ``Solo``: this process works every job in the store (sqlite, or any store under the
  engine lock). Jobs come from the store's added-jobs cursor; a store error is fatal (nobody
  else can have taken the job: the store itself is broken).
- ``harvester.replica.Replica``: replicas sharing a PostgreSQL store, each holding jobs by
  lease. Jobs come by claim; a refused write means the job is somebody else's now (drop it).

Each gets a ``Work``, the engine's public face towards it (its lanes, clock, metrics...), and
reaches nothing else of the engine; the engine in turn knows only this protocol.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Set
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import anyio
from anyio.abc import TaskGroup

from harvester.clock import Clock
from harvester.errors import FatalError, HarvesterError, StoreError
from harvester.jobs import Job
from harvester.lane import CancelRequest, Lane
from harvester.logs import get_logger
from harvester.metrics import Metrics
from harvester.store.base import Store
from harvester.tracking import Remaining

__all__ = ["FEED_INTERVAL_S", "Ownership", "Solo", "Work"]

log = get_logger("harvester.engine")

#: how often a daemon working alone looks for jobs added by other processes
FEED_INTERVAL_S = 2.0


class Work(Protocol):
    """What an ownership policy sees of the engine."""

    @property
    def lanes(self) -> Mapping[str, Lane]: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def rng(self) -> random.Random: ...

    @property
    def burst(self) -> bool:
        """``harvester harvest``: done once its jobs are."""
        ...

    @property
    def draining(self) -> bool: ...

    @property
    def done(self) -> anyio.Event: ...

    @property
    def remaining(self) -> Remaining:
        """The (provider, key) pairs this process is working on and has not finished."""
        ...

    def harvests_queued(self) -> Set[tuple[str, str]]:
        """Jobs waiting for a harvester or being harvested."""
        ...

    async def load(self, *, initial: bool) -> None:
        """Take up the jobs added to the store since the last look."""
        ...

    def fail(self, exc: HarvesterError) -> None:
        """Stop the engine with ``exc``."""
        ...


class Ownership(Protocol):
    async def start(self, stop: anyio.Event | None) -> bool:
        """Once the lanes are open, before providers are set up; False if stopped."""
        ...

    async def take_up(self) -> None:
        """Once providers are set up, before the engine says it is ready."""
        ...

    def run_in(self, tg: TaskGroup) -> None:
        """Start the background tasks that bring jobs in (claims, leases, the feeder)."""
        ...

    async def leave(self) -> None:
        """On the way out, even after a failure."""
        ...

    def holds(self, lane: Lane, key: str) -> bool:
        """May this process step or harvest ``key`` now?"""
        ...

    def finished(self, provider: str, key: str) -> None:
        """``key`` reached a terminal state (or is gone from the store)."""
        ...

    def store_failed(self, lane: Lane, key: str, exc: StoreError) -> None:
        """A step of ``key`` failed with a store error."""
        ...

    def harvesting(self, provider: str, key: str) -> AbstractContextManager[None]:
        """Around one harvest: lets the owner stop it."""
        ...

    async def confirm(self, job: Job) -> Job:
        """Just before a harvest is published: prove the job is still ours, or raise."""
        ...

    @property
    def caches_rows(self) -> bool:
        """Whether a job's stored row may be kept between steps (nobody else writes it)."""
        ...

    async def keep_setup(self, key: str, value: str) -> str:
        """Record a provider's one-off setup; the value every process must use."""
        ...

    async def refresh(self) -> None:
        """Jobs were added to the store (a submit, the HTTP API): take them up soon."""
        ...

    def resume(self, lane: Lane, job: Job) -> None:
        """A retry made ``job`` active again (the store has it already)."""
        ...

    async def cancel_elsewhere(self, lane: Lane, job: Job) -> CancelRequest | None:
        """A cancel of ``job``: its answer if another process must serve it, else None (it
        is ours to serve now)."""
        ...

    @property
    def name(self) -> str | None:
        """This process's replica id, or None when it works alone."""
        ...


class Solo:
    """This process owns every job in the store."""

    def __init__(self, work: Work, store: Store) -> None:
        self.work = work
        self.store = store

    async def start(self, stop: anyio.Event | None) -> bool:
        return True

    async def take_up(self) -> None:
        await self.work.load(initial=True)
        if self.work.burst and not self.work.remaining:
            self.work.done.set()

    def run_in(self, tg: TaskGroup) -> None:
        if not self.work.burst:
            tg.start_soon(self._feeder, name="feeder")

    async def _feeder(self) -> None:
        while not self.work.draining:
            await self.work.clock.sleep(FEED_INTERVAL_S)
            try:
                await self.work.load(initial=False)
            except FatalError as exc:
                self.work.fail(exc)
                return

    async def leave(self) -> None:
        return None

    def holds(self, lane: Lane, key: str) -> bool:
        return True

    def finished(self, provider: str, key: str) -> None:
        if self.work.burst and not self.work.remaining:
            self.work.done.set()

    def store_failed(self, lane: Lane, key: str, exc: StoreError) -> None:
        self.work.fail(exc)  # one process, one store: it cannot be somebody else's job

    @contextmanager
    def harvesting(self, provider: str, key: str) -> Iterator[None]:
        yield

    async def confirm(self, job: Job) -> Job:
        return job

    @property
    def caches_rows(self) -> bool:
        return True

    async def keep_setup(self, key: str, value: str) -> str:
        await self.store.set_meta(key, value)
        return value

    async def refresh(self) -> None:
        if self.work.lanes and not self.work.draining:
            await self.work.load(initial=False)

    def resume(self, lane: Lane, job: Job) -> None:
        self.work.remaining.add((job.provider, job.key))
        lane.schedule(job.key, self.work.clock.monotonic())

    async def cancel_elsewhere(self, lane: Lane, job: Job) -> CancelRequest | None:
        return None

    @property
    def name(self) -> str | None:
        return None
