"""Reconcile: find a job whose create answer was lost (or that the provider says exists).

A create POST is preceded by the ``submitting`` intent, so a job found in ``submitting``
(after a lost answer, a crash, a restart) may or may not exist remotely. It is looked up by
its reference id, page by page; proven absent it is submitted again, found it is polled, and
where the provider offers no lookup its ``on_lost_create`` policy decides. Never resent
blindly.
"""

from __future__ import annotations

import functools

from harvester import tracing
from harvester.engine.view import View
from harvester.errors import JobError
from harvester.jobs import Event, Job
from harvester.lane import Lane
from harvester.logs import get_logger
from harvester.providers.base import Found, NextPage, Unsearchable

__all__ = ["reconcile"]

log = get_logger("harvester.engine")


async def reconcile(v: View, lane: Lane, job: Job, *, exists: bool) -> None:
    """Find a job whose create answer we never saw (or that the provider says exists)."""
    cursor: str | None = None
    pages = 0
    while True:
        spec = lane.provider.build_find(job, cursor)
        if spec is None:
            await _lost_create_policy(v, lane, job, exists=exists)
            return
        try:
            with tracing.step("reconcile", job):
                found = await lane.transport.call(
                    spec, functools.partial(lane.provider.parse_find, job=job), job=job.key
                )
        except JobError as exc:
            await v.transition(job, Event.GIVE_UP, reason=f"reconciliation: {exc}")
            return
        pages += 1
        if isinstance(found, Found):
            job = await v.transition(
                job, Event.FOUND_REMOTE, remote_id=found.remote_id, reason=None
            )
            log.info(
                "reconciled",
                provider=lane.name,
                job=job.key,
                remote_id=job.remote_id,
                pages=pages,
            )
            v.poll_later(lane, job, changed=True)
            return
        if isinstance(found, NextPage):
            cursor = found.cursor
            continue
        if isinstance(found, Unsearchable):
            log.warning("lookup refused", provider=lane.name, job=job.key, reason=found.reason)
            await _lost_create_policy(v, lane, job, exists=exists, why=found.reason)
            return
        break
    if exists:
        await v.transition(
            job,
            Event.GIVE_UP,
            reason=(
                f"{lane.name} says reference_id {job.reference_id!r} already exists, but not"
                " among the jobs harvester submitted; track it with a job_id line instead"
            ),
        )
        return
    # Proven absent: the POST never landed, so sending it again is safe.
    job = await v.transition(job, Event.NOT_FOUND_REMOTE)
    lane.schedule(job.key, v.clock.monotonic())


async def _lost_create_policy(
    v: View, lane: Lane, job: Job, *, exists: bool, why: str | None = None
) -> None:
    policy = lane.transport.cfg.on_lost_create
    if policy == "resubmit" and not exists:
        job = await v.transition(job, Event.NOT_FOUND_REMOTE)
        lane.schedule(job.key, v.clock.monotonic())
        return
    await v.transition(
        job,
        Event.GIVE_UP,
        reason=(
            f"the create answer for reference_id {job.reference_id!r} was lost and"
            f" {why or f'{lane.name} offers no way to look the job up'};"
            " check the provider's console"
            " and add a job_id line to track it if it exists (or set"
            f' providers.{lane.name}.on_lost_create = "resubmit")'
        ),
    )
