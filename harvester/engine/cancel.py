"""Cancel and deadline: the steps that end a job before the provider does.

A cancel is served by the engine's worker of that job (``serve_cancel``, from
``Engine._step``), never beside it: the job's create, poll and harvest are steps of that same
worker, so a cancel cannot race them. ``harvester cancel``, which runs no engine, holds the
engine lock instead (``harvester.store.lock``) and serves the cancel itself (``cancel_now``).
A job in ``submitting`` is reconciled first: its create may have landed, and a remote job
must not run on unseen. A running job past ``job_timeout_s`` ends in ``error`` (``expire``),
cancelled at the provider where its API can.

The requests themselves (from the CLI, the daemon, the Python API, another replica) are
``harvester.control``'s.
"""

from __future__ import annotations

from harvester.control import ended, refused
from harvester.engine.reconcile import reconcile
from harvester.engine.view import View
from harvester.errors import JobError, RetryableError, brief
from harvester.jobs import Event, Job, JobState
from harvester.lane import CancelRequest, Lane
from harvester.logs import get_logger

__all__ = ["cancel_now", "expire", "serve_cancel"]

log = get_logger("harvester.control")

#: states a cancel is refused in: the provider has finished the work (harvest goes on)
_FINISHED = (JobState.SUCCEEDED, JobState.HARVESTING)


async def serve_cancel(engine: View, lane: Lane, job: Job | None, req: CancelRequest) -> bool:
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
            await reconcile(engine, lane, job, exists=False)
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
        req.answer(job=await engine.transition(job, Event.CANCEL, reason="cancelled by user"))
        engine.metrics.cancels.labels(lane.name, "local", "cancelled").inc()
        return True
    outcome = await _cancel_remote(engine, lane, job, req)
    if outcome is None:
        return False  # refused; the answer says why, and the job is polled as before
    reason, where = outcome
    req.answer(job=await engine.transition(job, Event.CANCEL, reason=reason))
    engine.metrics.cancels.labels(lane.name, where, "cancelled").inc()
    return True


async def _cancel_remote(
    engine: View, lane: Lane, job: Job, req: CancelRequest | None
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


async def expire(engine: View, lane: Lane, job: Job) -> bool:
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
    await engine.transition(
        job,
        Event.GIVE_UP,
        reason=f"timed out after {ran:.0f} s (providers.{lane.name}.job_timeout_s = {limit:g})"
        + note,
    )
    engine.metrics.job_timeouts.labels(lane.name).inc()
    return True


async def cancel_now(engine: View, job: Job) -> CancelRequest:
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
