"""Submit: a ``new`` job's create request, once, with its intent on disk first.

The ``submitting`` intent (and the attempt it spends) is committed before the create POST
leaves, so a crash or a lost answer from then on is reconciled (``harvester.engine.reconcile``)
rather than sent again blindly. A job with a ``job_id`` line is only tracked.
"""

from __future__ import annotations

from harvester import tracing
from harvester.engine.reconcile import reconcile
from harvester.engine.view import View
from harvester.errors import JobError, NotSent, RateLimited, RetryableError, brief
from harvester.failpoints import failpoint
from harvester.jobs import Event, Job
from harvester.lane import Lane
from harvester.logs import get_logger
from harvester.providers.base import Accepted, AlreadyExists

__all__ = ["MAX_CREATE_ATTEMPTS", "start"]

log = get_logger("harvester.engine")

#: create POSTs for one job before it ends in error (each one is recorded before it is sent)
MAX_CREATE_ATTEMPTS = 8


async def start(v: View, lane: Lane, job: Job) -> None:
    if job.remote_id is not None:
        job = await v.transition(job, Event.TRACK, remote_id=job.remote_id)
        lane.schedule(job.key, v.clock.monotonic())
        return
    if job.attempts >= MAX_CREATE_ATTEMPTS:
        await v.transition(
            job,
            Event.GIVE_UP,
            reason=f"gave up after {job.attempts} create attempts; last: {job.reason}",
        )
        return
    payload = await v.store.load_payload(job)
    if payload is None:
        await v.transition(job, Event.GIVE_UP, reason="job has neither payload nor job_id")
        return
    try:
        spec = lane.provider.build_create(job, payload)
    except JobError as exc:
        await v.transition(job, Event.GIVE_UP, reason=str(exc))
        return
    # The intent is on disk before the POST leaves: a crash from here on is reconciled.
    job = await v.transition(job, Event.SUBMIT, attempts=job.attempts + 1)
    pinned = job
    failpoint("submit.before_post")
    try:
        with tracing.step("submit", job):
            result = await lane.transport.call(
                spec, lambda r: lane.provider.parse_create(r, pinned), job=job.key
            )
    except RetryableError as exc:
        if _refused_before_processing(exc):
            # A 429 or 503 is a refusal before processing: nothing was created.
            await v.transition(job, Event.NOT_FOUND_REMOTE, reason=str(exc))
            v.retry_later(lane, job.key, exc)
            return
        log.warning(
            "create answer lost; reconciling", provider=lane.name, job=job.key, error=str(exc)
        )
        await _store_reason(v, job, str(exc))
        v.retry_later(lane, job.key, exc)
        return
    except JobError as exc:
        await v.transition(job, Event.GIVE_UP, reason=str(exc))
        return
    failpoint("submit.after_post")
    if isinstance(result, Accepted):
        job = await v.transition(job, Event.ACCEPTED, remote_id=result.remote_id, reason=None)
        v.poll_later(lane, job, changed=True)
    elif isinstance(result, AlreadyExists):
        await reconcile(v, lane, job, exists=True)


async def _store_reason(v: View, job: Job, reason: str) -> None:
    fresh = await v.store.get(job.provider, job.key)
    if fresh is not None and fresh.version == job.version:
        await v.store.update(fresh, now=v.clock.wall(), reason=brief(reason))


def _refused_before_processing(exc: RetryableError) -> bool:
    """429 and 503 say "not now" before the request is handled (throttling, overload), so a
    create that got one was not made; so does an answer the provider marked safe to resend,
    and a request dropped before it was sent. Other 5xx, resets and timeouts are ambiguous."""
    return isinstance(exc, RateLimited | NotSent) or exc.status == 503 or exc.resend_safe
