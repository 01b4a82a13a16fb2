"""Harvest: fetch a finished job's results and publish them under their final name.

Finished jobs wait in one bounded pool shared by the lanes (``queue``), so a slow disk slows
downloads rather than growing memory. A harvest streams the results through the output
writers (``harvester.harvest``, ``harvester.objoutput``) into temporary names and publishes
them only once the job's ownership confirms it is still this process's. A result not
published yet is waited for (``harvest.results_wait_s``); an unwritable disk parks the job
(``harvester.engine.output``) without charging it an attempt.
"""

from __future__ import annotations

import functools

from anyio.streams.memory import MemoryObjectSendStream

from harvester import tracing
from harvester.download import ByteBudget
from harvester.engine.output import OutputDir
from harvester.engine.poll import JobClient
from harvester.engine.view import View
from harvester.errors import (
    JobError,
    NotSent,
    NotYetAvailable,
    OutputError,
    RetryableError,
    RetryableErrorInHarvest,
    brief,
)
from harvester.harvest import JobOutput
from harvester.jobs import Event, JobState
from harvester.lane import Lane
from harvester.logs import get_logger
from harvester.objoutput import ObjectJobOutput
from harvester.objstore import bucket_for
from harvester.offload import Offload
from harvester.providers.base import RemoteState, Status
from harvester.ratelimit import backoff_delay

__all__ = ["Harvests"]

log = get_logger("harvester.engine")


class Harvests:
    """The harvest pool's queue and the harvest step."""

    def __init__(self, v: View, output: OutputDir, offload: Offload) -> None:
        self.v = v
        self.output = output
        #: the worker threads every harvest decodes, hashes and writes in
        self.offload = offload
        #: the pool's intake (set by the engine's run)
        self.send: MemoryObjectSendStream[tuple[str, str]] | None = None
        #: jobs waiting for a harvester or being harvested
        self.queued: set[tuple[str, str]] = set()
        #: the answer of the poll that saw a job finish, for its harvest (which then does not
        #: ask again); dropped once the harvest starts, or when the job is parked
        self.finished_status: dict[tuple[str, str], Status] = {}

    def done(self, provider: str, key: str) -> None:
        """A harvest ended (or was not started: stopping)."""
        self.queued.discard((provider, key))
        self.finished_status.pop((provider, key), None)

    async def queue(self, provider: str, key: str, status: Status | None = None) -> None:
        item = (provider, key)
        if status is not None:
            self.finished_status[item] = status
        if self.output.problem is not None and not self.v.burst:
            self.output.parked.add(item)  # OutputDir.watch hands it back once the disk is writable
            self.finished_status.pop(item, None)  # parked for long: its harvest asks again
            return
        if item in self.queued:
            return
        self.queued.add(item)
        assert self.send is not None
        self.v.metrics.queue_depth.labels(provider, "harvest").set(len(self.queued))
        await self.send.send(item)

    async def one(self, lane: Lane, key: str) -> None:
        if not self.v.ownership.holds(lane, key):
            return  # dropped while it waited for a harvester
        job = await self.v.store.get(lane.name, key)
        if job is None or job.state not in (JobState.SUCCEEDED, JobState.HARVESTING):
            return
        if job.state == JobState.SUCCEEDED:
            job = await self.v.transition(job, Event.HARVEST)
        try:
            # The poll that saw the job finish brought its document: no need to ask again
            # (a retry, or a job loaded finished at a restart, does ask).
            status = self.finished_status.pop((lane.name, key), None) or await lane.provider.poll(
                job, JobClient(lane.transport, job.key)
            )
            if not isinstance(status, Status) or status.state != RemoteState.SUCCEEDED:
                # The status holds the provider's whole document: the debug log gets it,
                # the stored reason only the status word.
                raw = status.raw if isinstance(status, Status) else status.reason
                log.debug("harvest: job not finished any more", job=job.key, status=repr(status))
                raise RetryableErrorInHarvest(
                    f"job is not finished any more (provider status {brief(raw, 80)!r})"
                )
            bucket = bucket_for(self.v.config.output)
            out = (JobOutput if bucket is None else functools.partial(ObjectJobOutput, bucket))(
                self.v.config.output.dir,
                job,
                payload=await self.v.store.load_payload(job),
                transport=lane.transport,
                clock=self.v.clock,
                label_dtype=self.v.config.output.label_dtype,
                chunk_bytes=self.v.config.harvest.chunk_bytes,
                rng=self.v.rng,
                frame_concurrency=self.v.config.harvest.frame_concurrency,
                part_bytes=self.v.config.harvest.part_bytes,
                offload=self.offload,
                budget=ByteBudget(
                    self.v.config.harvest.max_file_bytes, self.v.config.harvest.max_job_bytes
                ),
            )
            with tracing.step("harvest", job):
                await lane.provider.harvest(job, status, out)
            if out.frames_kept:
                log.info(
                    "frames kept from an earlier attempt",
                    provider=lane.name,
                    job=key,
                    kept=out.frames_kept,
                    fetched=out.frames_fetched,
                )
            self.v.metrics.decode_seconds.labels(lane.name).inc(out.decode_s)
            # With leases, only the holder completes an output: proven just before the rename.
            job = await self.v.ownership.confirm(job)
            relative = await out.publish(harvested_at=self.v.clock.wall())
        except NotSent:
            return  # stopping: the job stays harvesting, and the next run harvests it
        except RetryableError as exc:
            # "Not published yet" is no failure, up to results_wait_s; everything else spends
            # an attempt.
            not_yet = isinstance(exc, NotYetAvailable)
            n = lane.failures.get(key, 0) + (0 if not_yet else 1)
            lane.failures[key] = n
            if n >= self.v.config.harvest.max_attempts:
                await self.v.transition(
                    job, Event.GIVE_UP, reason=f"harvest failed {n} times; last: {exc}"
                )
                return
            if not_yet:
                now = self.v.clock.monotonic()
                waited = now - lane.unpublished_since.setdefault(key, now)
                if waited >= self.v.config.harvest.results_wait_s:
                    await self.v.transition(
                        job,
                        Event.GIVE_UP,
                        reason=f"results still not published {waited:.0f} s after the job"
                        f" finished (harvest.results_wait_s); last: {exc}",
                    )
                    return
            job = await self.v.transition(job, Event.HARVEST_RETRY, reason=str(exc))
            delay = exc.retry_after or backoff_delay(
                n - 1,
                base=lane.transport.cfg.backoff_base_s,
                cap=lane.transport.cfg.backoff_max_s,
                rng=self.v.rng,
            )
            lane.schedule(key, self.v.clock.monotonic() + delay)
            return
        except OutputError as exc:
            # The disk's fault, not the job's or the provider's: no attempt is charged.
            await self.v.transition(
                job, Event.HARVEST_RETRY, reason=f"waiting for the output directory: {exc}"
            )
            if self.v.burst:
                self.v.fail(exc)  # one line, exit 2; a rerun resumes the job
            else:
                self.output.failed(exc)
                self.output.parked.add((lane.name, key))
            return
        except JobError as exc:
            await self.v.transition(job, Event.GIVE_UP, reason=str(exc))
            return
        self.output.strikes = 0
        await self.v.transition(job, Event.HARVESTED, output=str(relative), reason=None)
