"""Control of jobs already in the store: cancel, retry and deadlines (``job_timeout_s``).

The CLI (``harvester cancel``/``retry``), the daemon (``DELETE /jobs/...``) and the Python
API all come here. A cancel is served by the engine's worker of that job (``serve_cancel``
from ``Engine._step``), never beside it: the job's create, poll and harvest are steps of that
same worker, so a cancel cannot race them. The CLI, which runs no engine, holds the engine
lock instead (``harvester.store.lock``) and serves the cancel itself.

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

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Protocol

from harvester.errors import ControlError, JobError, RetryableError, brief
from harvester.jobs import Event, Job, JobState
from harvester.lane import CancelRequest, Lane
from harvester.logs import get_logger
from harvester.store.base import SharedStore, Store

if TYPE_CHECKING:
    from harvester.engine import Engine
    from harvester.metrics import Metrics

log = get_logger("harvester.control")

#: states a cancel is refused in: the provider has finished the work (harvest goes on)
_FINISHED = (JobState.SUCCEEDED, JobState.HARVESTING)


class _Counts(Protocol):
    """Whatever counts cancels (an engine, or a replica's view of one)."""

    @property
    def metrics(self) -> Metrics: ...


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


async def serve_cancel(engine: Engine, lane: Lane, job: Job | None, req: CancelRequest) -> bool:
    """Cancel ``job`` for ``req``. True when the job's step is used up (it was cancelled or
    must wait); False lets the step go on as usual (the cancel was refused, job unchanged)."""
    if job is None:
        refused(engine, lane.name)
        req.answer(error=f"{lane.name}: no such job")
        return False  # the step forgets it
    if job.terminal:
        refused(engine, lane.name)
        req.answer(error=ended(job))
        return False
    if job.state in _FINISHED:
        refused(engine, lane.name)
        req.answer(
            error=f"{job.label} has already finished at the provider and is being harvested;"
            " nothing to cancel"
        )
        return False
    if job.state == JobState.SUBMITTING:
        # The create may have landed: find it first, or a remote job would run on unseen.
        try:
            await engine._reconcile(lane, job, exists=False)
        except RetryableError:
            lane.cancels.setdefault(job.key, req)  # still wanted once the provider answers
            raise
        fresh = await engine.store.get(job.provider, job.key)
        if fresh is None or fresh.state not in (JobState.NEW, JobState.RUNNING):
            refused(engine, lane.name)
            req.answer(error=ended(fresh) if fresh and fresh.terminal else f"{job.label}: moved")
            return True
        job = fresh
    if job.state == JobState.NEW:
        req.answer(job=await engine._transition(job, Event.CANCEL, reason="cancelled by user"))
        engine.metrics.cancels.labels(lane.name, "local", "cancelled").inc()
        return True
    outcome = await _cancel_remote(engine, lane, job, req)
    if outcome is None:
        return False  # refused; the answer says why, and the job is polled as before
    reason, where = outcome
    req.answer(job=await engine._transition(job, Event.CANCEL, reason=reason))
    engine.metrics.cancels.labels(lane.name, where, "cancelled").inc()
    return True


def refused(engine: _Counts, provider: str, where: str = "local") -> None:
    """Count a cancel refused: by harvester (``local``: the job ended, is being harvested,
    ...) or by the provider (``provider``: it said no or could not be reached)."""
    engine.metrics.cancels.labels(provider, where, "refused").inc()


async def _cancel_remote(
    engine: Engine, lane: Lane, job: Job, req: CancelRequest | None
) -> tuple[str, str] | None:
    """Ask the provider to cancel; the reason to store and where the cancel acted
    (``provider`` or ``local``), or None if it refused (answered)."""
    spec = lane.provider.build_cancel(job)
    if spec is None:
        return (
            f"cancelled by user; {lane.name}'s API has no cancel, so the remote job"
            f" {job.remote_id} may still run (harvester no longer polls or harvests it)",
            "local",
        )
    try:
        await lane.transport.call(spec, lambda r: lane.provider.parse_cancel(r, job), job=job.key)
    except (JobError, RetryableError) as exc:
        what = "refused the cancel" if isinstance(exc, JobError) else "could not be reached"
        message = f"{job.label}: {lane.name} {what}: {brief(str(exc), 300)}; nothing changed"
        if req is not None:
            req.answer(error=message)
        log.warning("cancel not done", provider=lane.name, job=job.key, error=str(exc))
        refused(engine, lane.name, "provider")
        return None
    return f"cancelled by user at {lane.name} (remote job {job.remote_id})", "provider"


async def expire(engine: Engine, lane: Lane, job: Job) -> bool:
    """End a running job past ``job_timeout_s`` (cancelled at the provider where its API
    can) in ``error``. False when it has time left or is not running."""
    limit = lane.transport.cfg.job_timeout_s
    if not limit or job.state != JobState.RUNNING or job.started_at is None:
        return False
    ran = engine.clock.wall() - job.started_at
    if ran < limit:
        return False
    spec = lane.provider.build_cancel(job)
    note = f"; {lane.name}'s API has no cancel, the remote job may still run"
    if spec is not None:
        try:
            await lane.transport.call(
                spec, lambda r: lane.provider.parse_cancel(r, job), job=job.key
            )
            note = f"; cancelled at {lane.name}"
        except (JobError, RetryableError) as exc:
            note = f"; the cancel at {lane.name} failed: {brief(str(exc), 200)}"
    await engine._transition(
        job,
        Event.GIVE_UP,
        reason=f"timed out after {ran:.0f} s (providers.{lane.name}.job_timeout_s = {limit:g})"
        + note,
    )
    engine.metrics.job_timeouts.labels(lane.name).inc()
    return True


@asynccontextmanager
async def offline(engine: Engine, setup: Iterable[str] = ()) -> AsyncIterator[None]:
    """The engine's transports without its work loop, for a process that holds the engine
    lock (``harvester cancel``): providers in ``setup`` restore their one-off setup, which
    reconciling a job in ``submitting`` needs."""
    from harvester.engine import _Transports

    async with _Transports(engine) as lanes:
        engine.lanes = lanes
        for name in setup:
            await engine._setup(lanes[name])
        yield


async def cancel_now(engine: Engine, job: Job) -> CancelRequest:
    """Serve one cancel in a process that works the job alone (``offline``)."""
    req = CancelRequest()
    lane = engine.lanes[job.provider]
    while True:
        try:
            await serve_cancel(engine, lane, job, req)
        except RetryableError as exc:
            lane.cancels.pop(job.key, None)
            req.answer(error=f"{job.label}: {lane.name} could not be reached: {exc}")
        if req.done.is_set():
            return req
        fresh = await engine.store.get(job.provider, job.key)
        assert fresh is not None
        job = fresh


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


async def retry_resume(engine: Engine, job: Job, *, resubmit: bool) -> Job:
    """``retry_job`` in a process that runs ``engine`` (the daemon, the Python API): counted
    in its metrics and taken up by its workers at once."""
    job = await retry_job(
        engine.store, job, resubmit=resubmit, now=engine.clock.wall(), metrics=engine.metrics
    )
    engine.resume(job)
    return job
