"""One provider's lane: which of its jobs are due, which are being stepped, what waits.

The engine runs one lane per provider (``Engine._lane``): a dispatcher asks ``due()`` which
jobs to step now and hands them to the lane's workers, who put each job back with its next
due time (``schedule``). ``due()`` is the one place that decides which job is polled next; a
poll scheduler that ranks jobs by something other than due time replaces it there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

from harvester.config import ProviderConfig
from harvester.jobs import Job
from harvester.providers.base import Provider
from harvester.ratelimit import ProviderLimiter
from harvester.schedule import DueQueue, PollPolicy
from harvester.transport import Transport

__all__ = ["CancelRequest", "Lane"]


@dataclass
class CancelRequest:
    """A cancel waiting for its job's worker; ``done`` is set with ``job`` or ``error``."""

    done: anyio.Event = field(default_factory=anyio.Event)
    job: Job | None = None
    error: str | None = None
    #: recorded on the job for the replica that holds it (``job``), which carries it out
    requested: bool = False

    def answer(
        self, job: Job | None = None, error: str | None = None, *, requested: bool = False
    ) -> None:
        self.job, self.error, self.requested = job, error, requested
        self.done.set()


@dataclass
class Lane:
    name: str
    provider: Provider
    transport: Transport
    policy: PollPolicy
    queue: DueQueue[str] = field(default_factory=DueQueue)
    wake: anyio.Event = field(default_factory=anyio.Event)
    interval: dict[str, float] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    in_flight: set[str] = field(default_factory=set)
    #: monotonic time of each finished job's first "results not published yet"
    unpublished_since: dict[str, float] = field(default_factory=dict)
    #: the stored row of running jobs waiting for their next poll (``Engine._remember``)
    cache: dict[str, Job] = field(default_factory=dict)
    #: cancels waiting for their job's next step (``harvester.control``)
    cancels: dict[str, CancelRequest] = field(default_factory=dict)

    @property
    def cfg(self) -> ProviderConfig:
        return self.transport.cfg

    @property
    def limiter(self) -> ProviderLimiter:
        return self.transport.limiter

    def due(self, now: float, limit: int) -> list[str]:
        """The jobs to step now, at most ``limit``: those due by ``now``, earliest first."""
        return self.queue.pop_due(now, limit=limit)

    def next_due(self) -> float | None:
        """When the dispatcher must look again (None: when woken)."""
        return self.queue.next_due()

    def schedule(self, key: str, due: float) -> None:
        self.queue.schedule(key, due)
        self.wake.set()

    def forget(self, key: str) -> None:
        self.queue.discard(key)
        self.interval.pop(key, None)
        self.failures.pop(key, None)
        self.unpublished_since.pop(key, None)
        self.cache.pop(key, None)
