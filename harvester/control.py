"""Control of jobs already in the store: cancel requests and retries.

The CLI (``harvester cancel``/``retry``), the daemon (``DELETE /jobs/...``) and the Python
API all come here. A cancel asked of a running engine (``Engine.cancel``) is served by that
job's worker, as one of its steps (``harvester.engine.cancel``, which also ends jobs past
their deadline, ``job_timeout_s``); this module holds what the requests share: the counts,
the answers for a job that ended, and the request itself across replicas.

With replicas (a PostgreSQL store) the process asked may not hold the job: it takes a job
nobody holds (``take_or_request``, under the claim's lease rules) and cancels it itself, or
records the request on the row for the live holder, which serves it from its next renewal
(``Replica.renew_once``).

A retry writes only the store, and only jobs that ended: no engine touches an ended job, so
it races nothing. Retrying an ``error`` job never creates a second remote job blindly: a job
that has a remote id is polled (and harvested) again; one whose create may have landed is
reconciled by its reference id first. A ``failed`` or ``cancelled`` remote job is submitted
again only with ``resubmit``, as a new remote attempt under the reference ``<id>~<n>`` (the
earlier remote ids are kept in ``Job.past_remote_ids``).
"""

from __future__ import annotations

from typing import Protocol

from harvester.clock import Clock
from harvester.errors import ControlError
from harvester.jobs import Event, Job, JobState
from harvester.lane import CancelRequest
from harvester.logs import get_logger
from harvester.metrics import Metrics
from harvester.store.base import SharedStore, Store

log = get_logger("harvester.control")


class _Counts(Protocol):
    """Whatever counts cancels (an engine, or a replica's view of one)."""

    @property
    def metrics(self) -> Metrics: ...


class _Resumes(_Counts, Protocol):
    """A running engine, which takes up a job a retry made active again."""

    @property
    def store(self) -> Store: ...

    @property
    def clock(self) -> Clock: ...

    def resume(self, job: Job) -> None: ...


async def take_or_request(engine: _Counts, store: SharedStore, job: Job) -> CancelRequest | None:
    """A cancel of ``job`` from a process that does not hold it: None once it holds it now
    (serve the cancel); else the answer: recorded for its live holder, or refused."""
    fresh, taken = await store.take_or_request_cancel(job.provider, job.key)
    if taken:
        return None
    req = CancelRequest()
    if fresh is None:
        req.answer(error=f"{job.label}: no such job")
    elif fresh.terminal:
        refused(engine, job.provider)
        req.answer(error=ended(fresh))
    else:
        log.info("cancel requested of the replica holding it", provider=job.provider, job=job.key)
        req.answer(job=fresh, requested=True)
    return req


def ended(job: Job) -> str:
    why = f": {job.reason}" if job.reason else ""
    return f"{job.provider}/{job.key} has already ended {job.state.value}{why}; nothing to cancel"


def refused(engine: _Counts, provider: str, where: str = "local") -> None:
    """Count a cancel refused: by harvester (``local``: the job ended, is being harvested,
    ...) or by the provider (``provider``: it said no or could not be reached)."""
    engine.metrics.cancels.labels(provider, where, "refused").inc()


async def retry_problem(store: Store, job: Job, *, resubmit: bool) -> str | None:
    """Why ``job`` cannot be retried (one line), or None. Read-only."""
    if job.state == JobState.ERROR:
        return None
    if job.state in (JobState.FAILED, JobState.CANCELLED):
        if not resubmit:
            if job.remote_id:
                return (
                    f"{job.label} ended {job.state.value} at the provider; --resubmit submits"
                    f" it again as a new remote job (attempt {job.remote_attempt + 1})"
                )
            return (
                f"{job.label} ended {job.state.value} before it was submitted;"
                " --resubmit submits it"
            )
        if job.reference_id is None or await store.load_payload(job) is None:
            return (
                f"{job.label} is a tracked job (a job_id line, no payload): there is nothing"
                " to submit again"
            )
        return None
    if job.state == JobState.HARVESTED:
        return f"{job.label} is already harvested; nothing to retry"
    return f"{job.label} is {job.state.value}, still at work; nothing to retry"


#: ``harvester_job_retries_total``'s kind label, by the event a retry applies
RETRY_KINDS = {
    Event.RETRY_POLL: "harvest-again",
    Event.RETRY_RECONCILE: "recheck",
    Event.RETRY_SUBMIT: "submit",
    Event.RESUBMIT: "resubmit",
}


async def retry_job(
    store: Store, job: Job, *, resubmit: bool, now: float, metrics: Metrics | None = None
) -> Job:
    """Put an ended job back to work (see the module docstring), in the store only; counted
    in ``metrics`` when given (a process that exports them: the daemon, the Python API)."""
    problem = await retry_problem(store, job, resubmit=resubmit)
    if problem is not None:
        raise ControlError(problem)
    changes: dict[str, object] = {"reason": None}
    if job.state != JobState.ERROR:
        event = Event.RESUBMIT
        past = job.past_remote_ids + ((job.remote_id,) if job.remote_id else ())
        changes.update(
            past_remote_ids=past,
            remote_id=None,
            remote_status=None,
            progress=None,
            attempts=0,
            cancelled_by=None,
            status_unknown=False,
            started_at=None,
        )
    elif job.remote_id is not None:
        event = Event.RETRY_POLL
    elif job.attempts > 0:
        event, changes["attempts"] = Event.RETRY_RECONCILE, 0
    else:
        event = Event.RETRY_SUBMIT
    done = await store.transition(job, event, now=now, **changes)
    if metrics is not None:
        metrics.job_retries.labels(job.provider, RETRY_KINDS[event]).inc()
    return done


async def retry_resume(engine: _Resumes, job: Job, *, resubmit: bool) -> Job:
    """``retry_job`` in a process that runs ``engine`` (the daemon, the Python API): counted
    in its metrics and taken up by its workers at once."""
    job = await retry_job(
        engine.store, job, resubmit=resubmit, now=engine.clock.wall(), metrics=engine.metrics
    )
    engine.resume(job)
    return job
