"""Poll: ask a running job's status, store what changed, and hand it on.

A running job goes back to its lane's poll scheduler (``later``) until the provider says it
ended: succeeded, it goes to the harvest pool with the answer that saw it finish; failed or
cancelled, it ends so. A status the provider does not document keeps it polled as running,
and is told once (``status_unknown`` on the row).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from harvester import tracing
from harvester.clock import Clock
from harvester.engine.view import View
from harvester.errors import JobError
from harvester.failpoints import failpoint
from harvester.jobs import Event, Job, JobState
from harvester.lane import Lane
from harvester.logs import get_logger
from harvester.providers.base import NotReady, RemoteState, Status
from harvester.transport import Transport
from harvester.wire import RequestSpec, Response

__all__ = ["CACHED_JOBS_MAX", "JobClient", "Poller", "mono"]

log = get_logger("harvester.engine")
T = TypeVar("T")

#: running jobs whose stored row is kept in memory between polls (about 400 bytes each), so
#: polling them needs no store read; beyond this many the row is read before each poll
CACHED_JOBS_MAX = 10_000
#: a job the provider ended without results: the event that records it
_ENDED_AT_PROVIDER = {
    RemoteState.FAILED: Event.PROVIDER_FAILED,
    RemoteState.CANCELLED: Event.PROVIDER_CANCELLED,
}


class Poller:
    """The poll step of every lane of one engine."""

    def __init__(self, v: View) -> None:
        self.v = v
        #: (provider, raw status) pairs already warned about (bounded: statuses are few)
        self._told: set[tuple[str, str]] = set()

    def later(
        self,
        lane: Lane,
        job: Job,
        *,
        changed: bool,
        started_at: float | None = None,
        job_class: str | None = None,
    ) -> None:
        """``started_at``: when the provider says the job began running (Unix time); else
        it is timed from its submission (``Job.started_at``). ``job_class``: its type, if
        the provider's answer says (``Provider.job_class``)."""
        lane.failures.pop(job.key, None)
        now = self.v.clock.monotonic()
        began = started_at if started_at is not None else job.started_at
        origin = None if began is None else min(now, mono(self.v.clock, began) or now)
        lane.poll_later(
            job.key,
            now,
            origin=origin,
            progress=job.progress,
            changed=changed,
            job_class=job_class,
        )
        self._remember(lane, job)

    def _remember(self, lane: Lane, job: Job) -> None:
        """Keep ``job`` (just written or read, so it is the stored row) for its next poll.

        Only one process writes a job: nothing else changes the row while it waits here, and
        a step takes it out before acting. With a shared store another replica may take the
        job over, so every step reads it afresh there.
        """
        if not self.v.ownership.caches_rows or job.state != JobState.RUNNING:
            return
        if (
            job.key in lane.cache
            or sum(len(ln.cache) for ln in self.v.lanes.values()) < CACHED_JOBS_MAX
        ):
            lane.cache[job.key] = job

    async def poll(self, lane: Lane, job: Job) -> None:
        try:
            with tracing.step("poll", job):
                result = await lane.provider.poll(job, JobClient(lane.transport, job.key))
        except JobError as exc:
            await self.v.transition(job, Event.GIVE_UP, reason=str(exc))
            return
        failpoint("poll.after_answer")
        if isinstance(result, NotReady):
            self.later(lane, job, changed=False)
            return
        await self.apply_status(lane, job, result)

    async def apply_status(self, lane: Lane, job: Job, status: Status) -> None:
        if status.state == RemoteState.SUCCEEDED:
            if job.key in lane.polls:  # its duration is learned
                lane.polls.finished(
                    job.key,
                    self.v.clock.monotonic(),
                    finished_at=mono(self.v.clock, status.ended_at),
                    origin=mono(self.v.clock, status.started_at or job.started_at),
                    cls=lane.class_of(lane.provider.job_class(status)),
                )
            job = await self.v.transition(
                job, Event.COMPLETED, remote_status=status.raw, progress=status.progress
            )
            await self.v.queue_harvest(lane.name, job.key, status)
        elif status.state in _ENDED_AT_PROVIDER:
            await self.v.transition(
                job,
                _ENDED_AT_PROVIDER[status.state],
                remote_status=status.raw,
                reason=status.reason or f"provider status {status.raw}",
            )
        else:
            unknown = not status.known
            changed = (
                status.raw != job.remote_status
                or status.progress != job.progress
                or unknown != job.status_unknown
            )
            if changed:
                if unknown and not job.status_unknown:
                    self._unknown_status(lane, job, status.raw)
                job = await self.v.store.update(
                    job,
                    now=self.v.clock.wall(),
                    remote_status=status.raw,
                    progress=status.progress,
                    status_unknown=unknown,
                )
                if self.v.on_change is not None:
                    self.v.on_change(job)
            self.later(
                lane,
                job,
                changed=changed,
                started_at=status.started_at,
                job_class=lane.provider.job_class(status),
            )

    def _unknown_status(self, lane: Lane, job: Job, raw: str) -> None:
        """Once per job (the store remembers it was told): the provider answered a status it
        does not document, so harvester keeps polling and cannot tell if it ever ends.

        A warning for the first job of each (provider, status) in this process, info for the
        others: a provider that documents only its final status (Playment) would otherwise
        print a warning for every job it is working on."""
        first = (lane.name, raw) not in self._told
        if first and len(self._told) < 1000:
            self._told.add((lane.name, raw))
        (log.warning if first else log.info)(
            "status not documented by the provider; still polling as running",
            provider=lane.name,
            job=job.key,
            remote_id=job.remote_id,
            remote_status=raw,
        )
        self.v.metrics.count_unknown_status(lane.name, raw)


def mono(clock: Clock, wall: float | None) -> float | None:
    """A provider's Unix time on the monotonic clock (None stays None)."""
    if wall is None:
        return None
    return clock.monotonic() - (clock.wall() - wall)


class JobClient:
    """A ``Client`` that names its job in every log line and error."""

    def __init__(self, transport: Transport, job: str) -> None:
        self.transport = transport
        self.job = job

    async def call(self, spec: RequestSpec, parse: Callable[[Response], T]) -> T:
        return await self.transport.call(spec, parse, job=self.job)
