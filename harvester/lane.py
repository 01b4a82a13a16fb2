"""One provider's lane: which of its jobs are due, which are being stepped, what waits.

The engine runs one lane per provider (``Engine._lane``): a dispatcher asks ``due()`` which
jobs to step now and hands them to the lane's workers. ``due()`` is the one place that
decides which job is stepped next, from two sources:

- ``queue``: steps with a due time (submit, reconcile, harvest, a retry's backoff, a
  cancel), put back with ``schedule``;
- ``polls``: the running jobs between polls (``harvester.pollsched``), put back with
  ``poll_later`` (joined with ``resume`` by those loaded running at a restart). A poll is
  chosen only when the provider's limiter would admit it now (late binding): each free
  token goes to the job most likely to have finished, never sooner than its floor, so
  spare budget polls every job at ``poll_min_s`` and a short one is spent where it counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

from harvester.config import ProviderConfig
from harvester.jobs import Job
from harvester.pollsched import PollScheduler
from harvester.providers.base import Provider
from harvester.ratelimit import ProviderLimiter
from harvester.schedule import DueQueue
from harvester.transport import Transport

__all__ = ["CLASS_CHARS", "CancelRequest", "Lane"]

#: the longest job type name kept (each distinct name is a duration table, up to 256)
CLASS_CHARS = 64


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
    polls: PollScheduler[str]
    queue: DueQueue[str] = field(default_factory=DueQueue)
    wake: anyio.Event = field(default_factory=anyio.Event)
    #: when the dispatcher sleeps until (monotonic), and whether a poll waits for a request
    #: to end: a job put back to poll later, or a request ending, wakes it only then
    sleeps_until: float = 0.0
    wants_slot: bool = False
    #: polls handed out that no worker has started yet: counted against the tokens free, so
    #: a token is not promised twice while the workers have not run
    polls_out: set[str] = field(default_factory=set)
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

    @property
    def scheduled(self) -> int:
        """Jobs waiting for a step: due-time queue and polls."""
        return len(self.queue) + len(self.polls)

    def due(self, now: float, limit: int) -> list[str]:
        """The jobs to step now, at most ``limit``: the queue's due by ``now``, earliest
        first, then one poll for each request the limiter would admit now."""
        out = self.queue.pop_due(now, limit=limit)
        limiter = self.limiter
        if self.polls.rate_per_s != limiter.rate_per_s * self.cfg.poll_budget_share:
            self.polls.set_rate(limiter.rate_per_s)  # a replica's share moved
        free = min(limiter.free_now() - len(self.polls_out), limit - len(out))
        while free > 0:
            key = self.polls.pick(now)
            if key is None:
                break
            out.append(key)
            self.polls_out.add(key)
            free -= 1
        return out

    def next_due(self, now: float) -> float | None:
        """When the dispatcher must look again (None: when woken). A poll that waits for
        a token wakes it when the limiter's bucket or gate would let one through; one that
        waits for a request to end, when one does (``released``)."""
        nxt = self.queue.next_due()
        poll = self.polls.next_eligible(now)
        self.wants_slot = False
        if poll is not None:
            free = self.limiter.free_at()
            if free is None or len(self.polls_out) >= max(1, self.limiter.free_now()):
                self.wants_slot = True  # a request ending wakes the dispatcher
                if poll <= now:
                    poll = None
            else:
                poll = max(poll, free)
        if nxt is None or (poll is not None and poll < nxt):
            return poll
        return nxt

    def schedule(self, key: str, due: float) -> None:
        """Step ``key`` at ``due`` (not as a plain poll: a poll goes through ``poll_later``)."""
        self.polls.remove(key)
        self.queue.schedule(key, due)
        self.wake.set()

    def poll_later(
        self,
        key: str,
        now: float,
        *,
        origin: float | None,
        progress: float | None,
        changed: bool,
        job_class: str | None = None,
    ) -> None:
        """``key`` was just seen running (at its create, or a poll): it waits for its next
        poll among the others. ``origin``: when its run began (monotonic), if known;
        ``job_class``: its type, if the answer named one (``Provider.job_class``)."""
        self.queue.discard(key)
        cls = self.class_of(job_class)
        if key in self.polls:
            self.polls.polled(key, now, progress=progress, changed=changed, origin=origin, cls=cls)
        else:
            self.polls.add(key, now, cls=cls, origin=origin, last_poll=now)
        if now + self.polls.floor_of(key) < self.sleeps_until:
            self.wake.set()  # due before the dispatcher would look again

    def resume(self, key: str, now: float, *, index: int = 0, total: int = 1) -> None:
        """``key`` was loaded running (``index`` of ``total`` loaded together at a restart):
        its first poll comes through the poll scheduler, which spaces them
        (``PollScheduler.resume``)."""
        self.queue.discard(key)
        if key not in self.polls:
            self.polls.resume(key, now, cls=self.name, index=index, total=total)
        self.wake.set()

    def class_of(self, job_class: str | None) -> str:
        """The durations class of a job of this lane: ``provider/type``, or the provider's
        own when no type is known (the type clipped: it comes from a remote answer)."""
        return f"{self.name}/{job_class[:CLASS_CHARS]}" if job_class else self.name

    def released(self) -> None:
        """The limiter let a request go (``ProviderLimiter.on_release``)."""
        if self.wants_slot:
            self.wake.set()

    def step_started(self, key: str) -> None:
        """A worker took ``key`` from the dispatcher."""
        self.polls_out.discard(key)

    def forget(self, key: str) -> None:
        self.queue.discard(key)
        self.polls.remove(key)
        self.failures.pop(key, None)
        self.unpublished_since.pop(key, None)
        self.cache.pop(key, None)
