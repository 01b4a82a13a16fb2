"""The engine: store, scheduler, transports and harvest under one task group.

Per provider there is one *lane*: a due-time queue of job keys (``DueQueue``), a dispatcher
that hands due keys to a bounded pool of workers through a bounded stream, and the
provider's transport (one session, one limiter). Jobs that finished remotely go to a shared,
bounded harvest pool, so a slow disk slows downloads rather than growing memory.

Every state change is committed to the store before the engine acts on it. A create POST is
preceded by the ``submitting`` intent; a create whose answer is lost is reconciled (found
by reference id, or handled by the provider's ``on_lost_create`` policy), never resent
blindly.

``burst=True`` (``harvester harvest``) stops when every job it works on is terminal; the
daemon runs the same engine with ``burst=False`` until told to stop.

Which jobs this process works is its ``Ownership`` (``harvester.ownership``): ``Solo`` owns
every job in the store; with a store several processes share (``SharedStore``: PostgreSQL)
the engine is one ``Replica`` among several, which claims jobs by lease as its lanes have
room and treats a refused write as "this job is somebody else's now" (it drops the job)
rather than as a fatal store error. Everything else runs the same under both.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable, Set
from pathlib import Path
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from harvester import control, tracing
from harvester.clock import Clock, SystemClock, wait_for
from harvester.config import Config
from harvester.credentials import credentials_for
from harvester.download import ByteBudget
from harvester.durations import DurationStats
from harvester.errors import (
    ControlError,
    FatalError,
    HarvesterError,
    JobError,
    NotSent,
    NotYetAvailable,
    OutputError,
    RateLimited,
    RetryableError,
    RetryableErrorInHarvest,
    StoreError,
    brief,
)
from harvester.exchange import ExchangeFactory
from harvester.failpoints import failpoint
from harvester.harvest import JobOutput
from harvester.jobs import Event, Job, JobState
from harvester.lane import CancelRequest, Lane
from harvester.logs import get_logger
from harvester.metrics import Metrics
from harvester.objoutput import ObjectJobOutput
from harvester.objstore import bucket_for, prove_output
from harvester.offload import Offload
from harvester.ownership import Ownership, Solo
from harvester.pollsched import PollScheduler
from harvester.providers import make_provider
from harvester.providers.base import (
    Accepted,
    AlreadyExists,
    Found,
    NextPage,
    NotReady,
    RemoteState,
    Status,
    Unsearchable,
)
from harvester.ratelimit import ProviderLimiter, backoff_delay
from harvester.replica import Replica
from harvester.schedule import PollPolicy
from harvester.store.base import JobRef, SharedStore, Store
from harvester.tracking import Remaining
from harvester.transport import Transport
from harvester.wire import RequestSpec, Response

log = get_logger("harvester.engine")
T = TypeVar("T")

#: create POSTs for one job before it ends in error (each one is recorded before it is sent)
MAX_CREATE_ATTEMPTS = 8
#: running jobs whose stored row is kept in memory between polls (about 400 bytes each), so
#: polling them needs no store read; beyond this many the row is read before each poll
CACHED_JOBS_MAX = 10_000
#: the store meta entry that keeps the learned job durations (``harvester.durations``), and
#: how often they are written there (and at the end of a run)
DURATIONS_META = "poll.durations"
DURATIONS_SAVE_S = 60.0
DURATIONS_FINAL_SAVE_S = 5.0
#: bounds of the backoff between checks of an output directory that could not be written
OUTPUT_RETRY_MIN_S = 0.5
OUTPUT_RETRY_MAX_S = 10.0


class Engine:
    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        providers: Iterable[str] | None = None,
        burst: bool = True,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        on_change: Callable[[Job], None] | None = None,
        rng: random.Random | None = None,
        drain_grace_s: float | None = None,
        exchanges: ExchangeFactory | None = None,
    ) -> None:
        self.config = config
        #: what carries each provider's bytes: the real network unless a test or simulator
        #: passes another (``harvester.testing``); limiter, retries and the rest stay real
        self.exchanges = exchanges
        self.drain_grace_s = config.server.drain_grace_s if drain_grace_s is None else drain_grace_s
        self.store = store
        self.names = sorted(providers) if providers is not None else sorted(config.providers)
        self.burst = burst
        self.clock = clock or SystemClock()
        self.metrics = metrics or Metrics()
        self.on_change = on_change
        self.rng = rng or random.Random()
        #: the worker threads every harvest decodes, hashes and writes in
        self.offload = Offload(config.harvest.threads or None)
        self.lanes: dict[str, Lane] = {}
        self.remaining = Remaining()
        self.fatal: HarvesterError | None = None
        self.done = anyio.Event()
        #: set once transports are open, providers set up and the store's jobs loaded
        self.ready = anyio.Event()
        #: true from the stop request on: nothing new starts, in-flight work may finish
        self.draining = False
        self._busy = 0
        self._idle = anyio.Event()
        self._cursor = 0  #: the store's added_since cursor
        self._load_lock = anyio.Lock()
        self._harvest_send: MemoryObjectSendStream[tuple[str, str]] | None = None
        self._queued_for_harvest: set[tuple[str, str]] = set()
        #: (provider, raw status) pairs already warned about (bounded: statuses are few)
        self._unknown_told: set[tuple[str, str]] = set()
        #: why output.dir cannot be written now (daemon: not ready, harvests paused)
        self.output_problem: str | None = None
        #: run (in a worker thread) each time output.dir has just proved writable, before
        #: anything is sent; the daemon writes the store's marker there (store/binding.py)
        self.output_ready: Callable[[], None] | None = None
        self._output_blocked = anyio.Event()
        #: finished jobs waiting for output.dir to be writable again
        self._parked: set[tuple[str, str]] = set()
        #: output failures since the last harvest that succeeded: the watcher's backoff
        #: grows with them, since a probe can pass where a big file still does not fit
        self._output_strikes = 0
        #: how long each provider's jobs take, learned from the ones that finish (shared by
        #: the lanes' poll schedulers; kept in the store's meta table across restarts)
        self.durations = DurationStats()
        self._durations_saved: str | None = None
        #: the answer of the poll that saw a job finish, for its harvest (which then does not
        #: ask again); dropped once the harvest starts, or when the job is parked
        self._finished_status: dict[tuple[str, str], Status] = {}
        #: which jobs are this process's to work (harvester.ownership)
        self.ownership: Ownership = (
            Replica(self, store, lease_s=config.store.lease_s)
            if isinstance(store, SharedStore)
            else Solo(self, store)
        )

    @property
    def replica(self) -> Replica | None:
        """The lease holder when this engine is one replica of several, else None."""
        return self.ownership if isinstance(self.ownership, Replica) else None

    @replica.setter
    def replica(self, value: None) -> None:
        """``None``: work alone even on a shared store (a process with no work loop that
        serves the jobs it takes itself: ``harvester cancel``)."""
        assert value is None
        self.ownership = Solo(self, self.store)

    # -- what the ownership policy sees (harvester.ownership.Work) -----------------------
    def harvests_queued(self) -> Set[tuple[str, str]]:
        return self._queued_for_harvest

    def fail(self, exc: HarvesterError) -> None:
        self._fail_fatal(exc)

    # -- public -------------------------------------------------------------------------
    async def run(self, *, stop: anyio.Event | None = None) -> None:
        """Work until done (burst), ``stop`` is set, or a fatal error (re-raised)."""
        for name in self.names:
            if name not in self.config.providers:
                raise FatalError(f"provider {name!r} is not configured")
        async with _Transports(self) as lanes:
            self.lanes = lanes
            harvest_send, harvest_recv = anyio.create_memory_object_stream[tuple[str, str]](
                self.config.harvest.concurrency * 2
            )
            self._harvest_send = harvest_send
            try:
                await self._work(lanes, harvest_recv, stop)
            finally:
                with self.clock.move_on_after(DURATIONS_FINAL_SAVE_S, shield=True):
                    await self._save_durations()
                await self.ownership.leave()
        if self.fatal is not None:
            raise self.fatal

    async def _work(
        self,
        lanes: dict[str, Lane],
        harvest_recv: MemoryObjectReceiveStream[tuple[str, str]],
        stop: anyio.Event | None,
    ) -> None:
        if not await self._output_writable(stop):
            return  # stopped while output.dir could not be written: nothing was sent
        if not await self.ownership.start(stop):
            return  # stopped before the first request
        for lane in lanes.values():
            if not await self._setup_until_done(lane, stop):
                return  # stopped while a provider was unreachable: nothing started
        await self._load_durations()
        await self.ownership.take_up()
        self.ready.set()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_stop, tg, stop, name="stop-watcher")
            for lane in lanes.values():
                tg.start_soon(self._lane, lane, name=f"lane:{lane.name}")
            async with harvest_recv:
                for i in range(self.config.harvest.concurrency):
                    tg.start_soon(self._harvester, harvest_recv.clone(), name=f"harvest:{i}")
            self.ownership.run_in(tg)
            tg.start_soon(self._keep_durations, name="durations")
            if not self.burst:
                tg.start_soon(self._output_watch, name="output-watch")

    async def _watch_stop(self, tg: TaskGroup, stop: anyio.Event | None) -> None:
        stopped = False
        async with anyio.create_task_group() as inner:

            async def wait_done() -> None:
                await self.done.wait()
                inner.cancel_scope.cancel()

            async def wait_stop() -> None:
                nonlocal stopped
                if stop is not None:
                    await stop.wait()
                    stopped = True
                    inner.cancel_scope.cancel()

            inner.start_soon(wait_done)
            inner.start_soon(wait_stop)
        if stopped and not self.done.is_set():
            await self._drain()
        tg.cancel_scope.cancel()

    async def _drain(self) -> None:
        """Stop starting work; let what is in flight finish within the grace period.

        Whatever is cut off after that is safe: each step's state is in the store and its
        files are written under temporary names, so the next start resumes it.
        """
        self.draining = True
        for lane in self.lanes.values():
            lane.wake.set()
            # Requests not sent yet that could not start within the grace (queued at a gate
            # closed for a day, in a long backoff) have nothing to finish: dropped now.
            lane.transport.limiter.stop(self.clock.monotonic() + self.drain_grace_s)
        log.info("draining", in_flight=self._busy, grace_s=self.drain_grace_s)
        if self._busy:
            await wait_for(self.clock, self._idle, self.drain_grace_s)
        log.info("drained" if not self._busy else "grace period over", in_flight=self._busy)

    def _enter(self) -> bool:
        if self.draining:
            return False
        self._busy += 1
        return True

    def _leave(self) -> None:
        self._busy -= 1
        if self._busy == 0 and self.draining:
            self._idle.set()

    def _fail_fatal(self, exc: HarvesterError) -> None:
        if self.fatal is None:
            self.fatal = exc
            log.error("stopping: fatal error", error=str(exc))
        self.done.set()

    # -- the output directory -------------------------------------------------------------
    async def _output_writable(self, stop: anyio.Event | None) -> bool:
        """Prove output.dir writable before anything is sent. ``harvest`` stops at once
        (``OutputError``); the daemon waits, not ready, and False means it was stopped."""
        root = self.config.output.dir
        if self.burst:
            await anyio.to_thread.run_sync(self._prove_output, root)
            return True
        delay = OUTPUT_RETRY_MIN_S
        while True:
            try:
                await anyio.to_thread.run_sync(self._prove_output, root)
            except OutputError as exc:
                if self.output_problem != str(exc):
                    log.error("output directory not writable; waiting", error=str(exc))
                self.output_problem = str(exc)
            else:
                self.output_problem = None
                return True
            if await wait_for(self.clock, stop or anyio.Event(), delay):
                return False
            delay = min(delay * 2, OUTPUT_RETRY_MAX_S)

    def _prove_output(self, root: Path) -> None:
        prove_output(self.config.output)
        if self.output_ready is not None:
            self.output_ready()

    def _output_failed(self, exc: OutputError) -> None:
        if self.output_problem is None:
            log.error("output directory not writable; harvests paused", error=str(exc))
        self.output_problem = str(exc)
        self._output_strikes += 1
        self._output_blocked.set()

    async def _output_watch(self) -> None:
        """While output.dir cannot be written, check it with backoff; once it can, hand the
        parked jobs back to their lanes."""
        while True:
            await self._output_blocked.wait()
            strikes = min(self._output_strikes, 16)
            delay = min(OUTPUT_RETRY_MIN_S * 2 ** max(strikes - 1, 0), OUTPUT_RETRY_MAX_S)
            while True:
                await self.clock.sleep_until(self.clock.monotonic() + delay)
                try:
                    await anyio.to_thread.run_sync(prove_output, self.config.output)
                    break
                except OutputError as exc:
                    self.output_problem = str(exc)
                    delay = min(delay * 2, OUTPUT_RETRY_MAX_S)
            self.output_problem = None
            self._output_blocked = anyio.Event()
            parked, self._parked = self._parked, set()
            log.info("output directory writable again; harvests resume", jobs=len(parked))
            now = self.clock.monotonic()
            for provider, key in sorted(parked):
                self.lanes[provider].schedule(key, now)

    # -- control (harvester.control) -----------------------------------------------------
    async def cancel(self, provider: str, key: str, *, wait_s: float) -> CancelRequest:
        """Ask the job's worker to cancel it; wait up to ``wait_s`` for the answer (a request
        not answered by then is still carried out, once the provider lets it)."""
        lane = self.lanes.get(provider)
        if lane is None:
            raise ControlError(f"{provider}/{key}: provider {provider!r} is not worked here")
        job = await self.store.get(provider, key)
        if job is None:
            raise ControlError(f"{provider}/{key}: no such job")
        if job.terminal:
            control.refused(self, provider)
            raise ControlError(control.ended(job))
        answer = await self.ownership.cancel_elsewhere(lane, job)
        if answer is not None:
            return answer
        if (provider, key) not in self.remaining:
            await self.refresh()  # added since the last look at the store
        req = lane.cancels.setdefault(key, CancelRequest())
        if key not in lane.in_flight:
            lane.schedule(key, self.clock.monotonic())
        await wait_for(self.clock, req.done, wait_s)
        return req

    def resume(self, job: Job) -> None:
        """Take up a job a retry made active again (the store has it already)."""
        lane = self.lanes.get(job.provider)
        if lane is None or self.draining:
            return
        self.ownership.resume(lane, job)

    # -- start-up -----------------------------------------------------------------------
    async def _setup_until_done(self, lane: Lane, stop: anyio.Event | None) -> bool:
        """Provider setup, retried while the provider is unreachable (a daemon must not
        crash-loop because a provider is down at start). False if stopped meanwhile."""
        failures = 0
        while True:
            try:
                await self._setup(lane)
                return True
            except RetryableError as exc:
                failures += 1
                delay = exc.retry_after or backoff_delay(
                    failures - 1,
                    base=lane.transport.cfg.backoff_base_s,
                    cap=lane.transport.cfg.backoff_max_s,
                    rng=self.rng,
                )
                log.warning(
                    "provider setup failed; retrying",
                    provider=lane.name,
                    error=str(exc),
                    delay_s=round(delay, 2),
                    attempt=failures,
                )
                if await wait_for(self.clock, stop or anyio.Event(), delay):
                    return False
            except FatalError:
                raise
            except HarvesterError as exc:
                raise FatalError(f"setting up {lane.name} failed: {exc}") from None

    async def _setup(self, lane: Lane) -> None:
        value = await self.store.get_meta(lane.provider.setup_key)
        if value is not None:
            lane.provider.restore_setup(value)
            return
        spec = lane.provider.setup_spec()
        if spec is None:
            return
        value = await lane.transport.call(spec, lane.provider.parse_setup)
        # Replicas starting together may each have set up: the first value recorded wins,
        # so every replica reconciles against the same batch. The losers' setups (an empty
        # Playment batch) stay unused.
        kept = await self.ownership.keep_setup(lane.provider.setup_key, value)
        if kept != value:
            lane.provider = make_provider(lane.transport.cfg)
            lane.provider.restore_setup(kept)
        log.info("provider set up", provider=lane.name, setup=lane.provider.setup_key)

    async def load(self, *, initial: bool) -> None:
        """Take up the jobs added to the store since the last look (a ``Solo`` engine)."""
        async with self._load_lock:  # one reader at a time: the cursor only moves forward
            await self._load_new(initial=initial)

    async def _load_new(self, *, initial: bool) -> None:
        now = self.clock.monotonic()
        added, self._cursor = await self.store.added_since(self._cursor)
        by_lane: dict[str, list[JobRef]] = {}
        for ref in added:
            by_lane.setdefault(ref.provider, []).append(ref)
        for name, lane in self.lanes.items():
            fresh = [j for j in by_lane.get(name, []) if (name, j.key) not in self.remaining]
            for i, job in enumerate(fresh):
                self.remaining.add((name, job.key))
                if job.state in (JobState.SUCCEEDED, JobState.HARVESTING):
                    delay = 0.0
                elif job.state == JobState.RUNNING and initial:
                    # After a restart, spread the first polls instead of firing them at once.
                    delay = lane.policy.spread(i, len(fresh), self.rng)
                else:
                    delay = 0.0
                lane.schedule(job.key, now + delay)
            if fresh:
                log.info("jobs loaded", provider=name, jobs=len(fresh))

    async def refresh(self) -> None:
        """Pick up jobs other processes (or the HTTP API) added to the store, now."""
        await self.ownership.refresh()

    # -- learned durations ---------------------------------------------------------------
    async def _load_durations(self) -> None:
        """The poll schedulers' duration tables as the last run left them (a broken or
        foreign value is reported once and learning starts afresh: it is a cache)."""
        value = await self.store.get_meta(DURATIONS_META)
        if value is None:
            return
        try:
            saved = DurationStats.from_bytes(
                value.encode(), alpha=self.durations.alpha, where=f"store meta {DURATIONS_META}"
            )
        except ValueError as exc:
            log.warning("learned job durations not loaded; learning afresh", error=str(exc))
            return
        self.durations.classes.update(saved.classes)
        self._durations_saved = value

    async def _save_durations(self) -> None:
        if not self.lanes or not self.durations.classes:
            return  # nothing learned (or nothing started): nothing to keep
        value = self.durations.to_bytes().decode()
        if value == self._durations_saved:
            return
        try:
            await self.store.set_meta(DURATIONS_META, value)
        except StoreError as exc:
            log.warning("learned job durations not saved", error=str(exc))
            return
        self._durations_saved = value

    async def _keep_durations(self) -> None:
        while True:
            await self.clock.sleep(DURATIONS_SAVE_S)
            await self._save_durations()

    # -- lanes --------------------------------------------------------------------------
    async def _lane(self, lane: Lane) -> None:
        lane.limiter.on_release = lane.released  # a poll may wait for that slot
        send, recv = anyio.create_memory_object_stream[str](lane.transport.cfg.max_concurrency)
        async with anyio.create_task_group() as tg:
            async with recv:
                for i in range(lane.transport.cfg.max_concurrency):
                    tg.start_soon(self._worker, lane, recv.clone(), name=f"{lane.name}:{i}")
            async with send:
                while not self.draining:
                    now = self.clock.monotonic()
                    due = lane.due(now, limit=1024)
                    self.metrics.queue_depth.labels(lane.name, "due").set(lane.scheduled)
                    for key in due:
                        lane.in_flight.add(key)
                        try:
                            # no loop turn per key while workers are free to take them
                            send.send_nowait(key)
                        except anyio.WouldBlock:
                            await send.send(key)
                    if due:
                        continue
                    lane.wake = anyio.Event()
                    nxt = lane.next_due(self.clock.monotonic())
                    until = self.clock.monotonic() + 3600.0 if nxt is None else nxt
                    lane.sleeps_until = until
                    with self.clock.move_on_at(until):
                        await lane.wake.wait()

    async def _worker(self, lane: Lane, recv: MemoryObjectReceiveStream[str]) -> None:
        async with recv:
            while True:
                try:
                    # A key already waiting is taken without the checkpoint `receive()` makes:
                    # the step that follows awaits a request anyway.
                    try:
                        key = recv.receive_nowait()
                    except anyio.WouldBlock:
                        key = await recv.receive()
                except anyio.EndOfStream:
                    return
                lane.step_started(key)
                if not self._enter():
                    lane.in_flight.discard(key)
                    lane.polls.remove(key)  # stopping: the next run polls it
                    continue
                try:
                    await self._step(lane, key)
                except StoreError as exc:
                    self.ownership.store_failed(lane, key, exc)
                except FatalError as exc:
                    self._fail_fatal(exc)
                finally:
                    lane.in_flight.discard(key)
                    self._leave()
                    if key in lane.cancels:  # asked for while this step ran
                        lane.schedule(key, self.clock.monotonic())

    async def _step(self, lane: Lane, key: str) -> None:
        if not self.ownership.holds(lane, key):
            lane.forget(key)  # dropped while it waited in the queue
            return
        job = lane.cache.pop(key, None) or await self.store.get(lane.name, key)
        req = lane.cancels.pop(key, None)
        if req is not None and await control.serve_cancel(self, lane, job, req):
            return
        if job is not None and await control.expire(self, lane, job):
            return
        if job is None or job.terminal:
            lane.forget(key)
            self._finished(lane.name, key)
            return
        try:
            if job.state == JobState.NEW:
                await self._start(lane, job)
            elif job.state == JobState.SUBMITTING:
                await self._reconcile(lane, job, exists=False)
            elif job.state == JobState.RUNNING:
                await self._poll(lane, job)
            else:  # succeeded / harvesting
                await self._queue_harvest(lane.name, job.key)
        except RetryableError as exc:
            self._retry_later(lane, key, exc)

    def _retry_later(self, lane: Lane, key: str, exc: RetryableError) -> None:
        n = lane.failures.get(key, 0) + 1
        lane.failures[key] = n
        if isinstance(exc, RateLimited) and lane.transport.limiter.gate_deadline is not None:
            due = lane.transport.limiter.gate_deadline  # the gate decides; no extra delay
        else:
            delay = (
                exc.retry_after
                if exc.retry_after is not None
                else backoff_delay(
                    n - 1,
                    base=lane.transport.cfg.backoff_base_s,
                    cap=lane.transport.cfg.backoff_max_s,
                    rng=self.rng,
                )
            )
            due = self.clock.monotonic() + delay
        log.info("job will retry", provider=lane.name, job=key, error=str(exc), failures=n)
        lane.schedule(key, due)

    async def _transition(self, job: Job, event: Event, **changes: Any) -> Job:
        if changes.get("reason") is not None:
            changes["reason"] = brief(changes["reason"])
        failpoint("store.before_commit")
        new = await self.store.transition(job, event, now=self.clock.wall(), **changes)
        failpoint("store.after_commit")
        self.metrics.transitions.labels(new.provider, new.state.value).inc()
        log.info(
            "job state",
            provider=new.provider,
            job=new.key,
            remote_id=new.remote_id,
            state=new.state.value,
            via=event.value,
            reason=new.reason,
            **tracing.log_ids(new),
        )
        if self.on_change is not None:
            self.on_change(new)
        if new.terminal:
            tracing.job_finished(new)
            lane = self.lanes.get(new.provider)
            if lane is not None:
                lane.forget(new.key)
            self._finished(new.provider, new.key)
        return new

    def _finished(self, provider: str, key: str) -> None:
        self.remaining.discard((provider, key))
        self.ownership.finished(provider, key)

    def _poll_later(
        self, lane: Lane, job: Job, *, changed: bool, started_at: float | None = None
    ) -> None:
        """``started_at``: when the provider says the job began running (Unix time); else
        it is timed from its submission (``Job.started_at``)."""
        lane.failures.pop(job.key, None)
        now = self.clock.monotonic()
        began = started_at if started_at is not None else job.started_at
        origin = None if began is None else min(now, self._mono(began) or now)
        lane.poll_later(job.key, now, origin=origin, progress=job.progress, changed=changed)
        self._remember(lane, job)

    def _remember(self, lane: Lane, job: Job) -> None:
        """Keep ``job`` (just written or read, so it is the stored row) for its next poll.

        Only one process writes a job: nothing else changes the row while it waits here, and
        a step takes it out before acting. With a shared store another replica may take the
        job over, so every step reads it afresh there.
        """
        if not self.ownership.caches_rows or job.state != JobState.RUNNING:
            return
        if (
            job.key in lane.cache
            or sum(len(ln.cache) for ln in self.lanes.values()) < CACHED_JOBS_MAX
        ):
            lane.cache[job.key] = job

    # -- submit -------------------------------------------------------------------------
    async def _start(self, lane: Lane, job: Job) -> None:
        if job.remote_id is not None:
            job = await self._transition(job, Event.TRACK, remote_id=job.remote_id)
            lane.schedule(job.key, self.clock.monotonic())
            return
        if job.attempts >= MAX_CREATE_ATTEMPTS:
            await self._transition(
                job,
                Event.GIVE_UP,
                reason=f"gave up after {job.attempts} create attempts; last: {job.reason}",
            )
            return
        payload = await self.store.load_payload(job)
        if payload is None:
            await self._transition(job, Event.GIVE_UP, reason="job has neither payload nor job_id")
            return
        try:
            spec = lane.provider.build_create(job, payload)
        except JobError as exc:
            await self._transition(job, Event.GIVE_UP, reason=str(exc))
            return
        # The intent is on disk before the POST leaves: a crash from here on is reconciled.
        job = await self._transition(job, Event.SUBMIT, attempts=job.attempts + 1)
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
                await self._transition(job, Event.NOT_FOUND_REMOTE, reason=str(exc))
                self._retry_later(lane, job.key, exc)
                return
            log.warning(
                "create answer lost; reconciling", provider=lane.name, job=job.key, error=str(exc)
            )
            await self._store_reason(job, str(exc))
            self._retry_later(lane, job.key, exc)
            return
        except JobError as exc:
            await self._transition(job, Event.GIVE_UP, reason=str(exc))
            return
        failpoint("submit.after_post")
        if isinstance(result, Accepted):
            job = await self._transition(
                job, Event.ACCEPTED, remote_id=result.remote_id, reason=None
            )
            self._poll_later(lane, job, changed=True)
        elif isinstance(result, AlreadyExists):
            await self._reconcile(lane, job, exists=True)

    async def _store_reason(self, job: Job, reason: str) -> None:
        fresh = await self.store.get(job.provider, job.key)
        if fresh is not None and fresh.version == job.version:
            await self.store.update(fresh, now=self.clock.wall(), reason=brief(reason))

    async def _reconcile(self, lane: Lane, job: Job, *, exists: bool) -> None:
        """Find a job whose create answer we never saw (or that the provider says exists)."""
        cursor: str | None = None
        pages = 0
        while True:
            spec = lane.provider.build_find(job, cursor)
            if spec is None:
                await self._lost_create_policy(lane, job, exists=exists)
                return
            try:
                with tracing.step("reconcile", job):
                    found = await lane.transport.call(
                        spec, functools.partial(lane.provider.parse_find, job=job), job=job.key
                    )
            except JobError as exc:
                await self._transition(job, Event.GIVE_UP, reason=f"reconciliation: {exc}")
                return
            pages += 1
            if isinstance(found, Found):
                job = await self._transition(
                    job, Event.FOUND_REMOTE, remote_id=found.remote_id, reason=None
                )
                log.info(
                    "reconciled",
                    provider=lane.name,
                    job=job.key,
                    remote_id=job.remote_id,
                    pages=pages,
                )
                self._poll_later(lane, job, changed=True)
                return
            if isinstance(found, NextPage):
                cursor = found.cursor
                continue
            if isinstance(found, Unsearchable):
                log.warning("lookup refused", provider=lane.name, job=job.key, reason=found.reason)
                await self._lost_create_policy(lane, job, exists=exists, why=found.reason)
                return
            break
        if exists:
            await self._transition(
                job,
                Event.GIVE_UP,
                reason=(
                    f"{lane.name} says reference_id {job.reference_id!r} already exists, but not"
                    " among the jobs harvester submitted; track it with a job_id line instead"
                ),
            )
            return
        # Proven absent: the POST never landed, so sending it again is safe.
        job = await self._transition(job, Event.NOT_FOUND_REMOTE)
        lane.schedule(job.key, self.clock.monotonic())

    async def _lost_create_policy(
        self, lane: Lane, job: Job, *, exists: bool, why: str | None = None
    ) -> None:
        policy = lane.transport.cfg.on_lost_create
        if policy == "resubmit" and not exists:
            job = await self._transition(job, Event.NOT_FOUND_REMOTE)
            lane.schedule(job.key, self.clock.monotonic())
            return
        await self._transition(
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

    # -- poll ---------------------------------------------------------------------------
    async def _poll(self, lane: Lane, job: Job) -> None:
        try:
            with tracing.step("poll", job):
                result = await lane.provider.poll(job, _JobClient(lane.transport, job.key))
        except JobError as exc:
            await self._transition(job, Event.GIVE_UP, reason=str(exc))
            return
        failpoint("poll.after_answer")
        if isinstance(result, NotReady):
            self._poll_later(lane, job, changed=False)
            return
        await self._apply_status(lane, job, result)

    async def _apply_status(self, lane: Lane, job: Job, status: Status) -> None:
        if status.state == RemoteState.SUCCEEDED:
            if job.key in lane.polls:  # its duration is learned
                lane.polls.finished(
                    job.key, self.clock.monotonic(), finished_at=self._mono(status.ended_at)
                )
            job = await self._transition(
                job, Event.COMPLETED, remote_status=status.raw, progress=status.progress
            )
            self._finished_status[(lane.name, job.key)] = status
            await self._queue_harvest(lane.name, job.key)
        elif status.state == RemoteState.FAILED:
            await self._transition(
                job,
                Event.PROVIDER_FAILED,
                remote_status=status.raw,
                reason=status.reason or f"provider status {status.raw}",
            )
        elif status.state == RemoteState.CANCELLED:
            await self._transition(
                job,
                Event.PROVIDER_CANCELLED,
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
                job = await self.store.update(
                    job,
                    now=self.clock.wall(),
                    remote_status=status.raw,
                    progress=status.progress,
                    status_unknown=unknown,
                )
                if self.on_change is not None:
                    self.on_change(job)
            self._poll_later(lane, job, changed=changed, started_at=status.started_at)

    def _mono(self, wall: float | None) -> float | None:
        """A provider's Unix time on the monotonic clock (None stays None)."""
        if wall is None:
            return None
        return self.clock.monotonic() - (self.clock.wall() - wall)

    def _unknown_status(self, lane: Lane, job: Job, raw: str) -> None:
        """Once per job (the store remembers it was told): the provider answered a status it
        does not document, so harvester keeps polling and cannot tell if it ever ends.

        A warning for the first job of each (provider, status) in this process, info for the
        others: a provider that documents only its final status (Playment) would otherwise
        print a warning for every job it is working on."""
        first = (lane.name, raw) not in self._unknown_told
        if first and len(self._unknown_told) < 1000:
            self._unknown_told.add((lane.name, raw))
        (log.warning if first else log.info)(
            "status not documented by the provider; still polling as running",
            provider=lane.name,
            job=job.key,
            remote_id=job.remote_id,
            remote_status=raw,
        )
        self.metrics.count_unknown_status(lane.name, raw)

    # -- harvest ------------------------------------------------------------------------
    async def _queue_harvest(self, provider: str, key: str) -> None:
        item = (provider, key)
        if self.output_problem is not None and not self.burst:
            self._parked.add(item)  # _output_watch hands it back once the disk is writable
            self._finished_status.pop(item, None)  # parked for long: its harvest asks again
            return
        if item in self._queued_for_harvest:
            return
        self._queued_for_harvest.add(item)
        assert self._harvest_send is not None
        self.metrics.queue_depth.labels(provider, "harvest").set(len(self._queued_for_harvest))
        await self._harvest_send.send(item)

    async def _harvester(self, recv: MemoryObjectReceiveStream[tuple[str, str]]) -> None:
        async with recv:
            async for provider, key in recv:
                if not self._enter():
                    self._queued_for_harvest.discard((provider, key))
                    continue
                try:
                    with self.ownership.harvesting(provider, key):
                        await self._harvest_one(self.lanes[provider], key)
                except StoreError as exc:
                    self.ownership.store_failed(self.lanes[provider], key, exc)
                except FatalError as exc:
                    self._fail_fatal(exc)
                finally:
                    self._queued_for_harvest.discard((provider, key))
                    self._finished_status.pop((provider, key), None)
                    self._leave()

    async def _harvest_one(self, lane: Lane, key: str) -> None:
        if not self.ownership.holds(lane, key):
            return  # dropped while it waited for a harvester
        job = await self.store.get(lane.name, key)
        if job is None or job.state not in (JobState.SUCCEEDED, JobState.HARVESTING):
            return
        if job.state == JobState.SUCCEEDED:
            job = await self._transition(job, Event.HARVEST)
        try:
            # The poll that saw the job finish brought its document: no need to ask again
            # (a retry, or a job loaded finished at a restart, does ask).
            status = self._finished_status.pop((lane.name, key), None) or await lane.provider.poll(
                job, _JobClient(lane.transport, job.key)
            )
            if not isinstance(status, Status) or status.state != RemoteState.SUCCEEDED:
                # The status holds the provider's whole document: the debug log gets it,
                # the stored reason only the status word.
                raw = status.raw if isinstance(status, Status) else status.reason
                log.debug("harvest: job not finished any more", job=job.key, status=repr(status))
                raise RetryableErrorInHarvest(
                    f"job is not finished any more (provider status {brief(raw, 80)!r})"
                )
            bucket = bucket_for(self.config.output)
            out = (JobOutput if bucket is None else functools.partial(ObjectJobOutput, bucket))(
                self.config.output.dir,
                job,
                payload=await self.store.load_payload(job),
                transport=lane.transport,
                clock=self.clock,
                label_dtype=self.config.output.label_dtype,
                chunk_bytes=self.config.harvest.chunk_bytes,
                rng=self.rng,
                frame_concurrency=self.config.harvest.frame_concurrency,
                part_bytes=self.config.harvest.part_bytes,
                offload=self.offload,
                budget=ByteBudget(
                    self.config.harvest.max_file_bytes, self.config.harvest.max_job_bytes
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
            self.metrics.decode_seconds.labels(lane.name).inc(out.decode_s)
            # With leases, only the holder completes an output: proven just before the rename.
            job = await self.ownership.confirm(job)
            relative = await out.publish(harvested_at=self.clock.wall())
        except NotSent:
            return  # stopping: the job stays harvesting, and the next run harvests it
        except RetryableError as exc:
            # "Not published yet" is no failure, up to results_wait_s; everything else spends
            # an attempt.
            not_yet = isinstance(exc, NotYetAvailable)
            n = lane.failures.get(key, 0) + (0 if not_yet else 1)
            lane.failures[key] = n
            if n >= self.config.harvest.max_attempts:
                await self._transition(
                    job, Event.GIVE_UP, reason=f"harvest failed {n} times; last: {exc}"
                )
                return
            if not_yet:
                now = self.clock.monotonic()
                waited = now - lane.unpublished_since.setdefault(key, now)
                if waited >= self.config.harvest.results_wait_s:
                    await self._transition(
                        job,
                        Event.GIVE_UP,
                        reason=f"results still not published {waited:.0f} s after the job"
                        f" finished (harvest.results_wait_s); last: {exc}",
                    )
                    return
            job = await self._transition(job, Event.HARVEST_RETRY, reason=str(exc))
            delay = exc.retry_after or backoff_delay(
                n - 1,
                base=lane.transport.cfg.backoff_base_s,
                cap=lane.transport.cfg.backoff_max_s,
                rng=self.rng,
            )
            lane.schedule(key, self.clock.monotonic() + delay)
            return
        except OutputError as exc:
            # The disk's fault, not the job's or the provider's: no attempt is charged.
            await self._transition(
                job, Event.HARVEST_RETRY, reason=f"waiting for the output directory: {exc}"
            )
            if self.burst:
                self._fail_fatal(exc)  # one line, exit 2; a rerun resumes the job
            else:
                self._output_failed(exc)
                self._parked.add((lane.name, key))
            return
        except JobError as exc:
            await self._transition(job, Event.GIVE_UP, reason=str(exc))
            return
        self._output_strikes = 0
        await self._transition(job, Event.HARVESTED, output=str(relative), reason=None)


class _JobClient:
    """A ``Client`` that names its job in every log line and error."""

    def __init__(self, transport: Transport, job: str) -> None:
        self.transport = transport
        self.job = job

    async def call(self, spec: RequestSpec, parse: Callable[[Response], T]) -> T:
        return await self.transport.call(spec, parse, job=self.job)


class _Transports:
    """Opens one transport (session + limiter) per lane and closes them all on exit."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.opened: list[Transport] = []

    async def __aenter__(self) -> dict[str, Lane]:
        lanes: dict[str, Lane] = {}
        e = self.engine
        try:
            for name in e.names:
                cfg = e.config.providers[name]
                provider = make_provider(cfg)
                limiter = ProviderLimiter(
                    name,
                    rate_per_s=cfg.rate_per_s,
                    burst=cfg.burst,
                    max_concurrency=cfg.max_concurrency,
                    clock=e.clock,
                    backoff_base=cfg.backoff_base_s,
                    backoff_cap=cfg.backoff_max_s,
                    rng=e.rng,
                )
                transport = Transport(
                    cfg,
                    credentials=credentials_for(cfg, e.clock),
                    limiter=limiter,
                    clock=e.clock,
                    metrics=e.metrics,
                    rng=e.rng,
                    exchange=None if e.exchanges is None else e.exchanges(cfg),
                )
                await transport.__aenter__()
                self.opened.append(transport)
                ladder = provider.ladder()
                policy = PollPolicy(min_s=cfg.poll_min_s, max_s=cfg.poll_max_s, ladder=ladder)
                polls: PollScheduler[str] = PollScheduler(
                    floor_s=cfg.poll_min_s,
                    ladder=policy.ladder,  # the provider's, clamped into poll_min..max_s
                    stats=e.durations,
                    rate_per_s=cfg.rate_per_s,
                    burst=cfg.burst,
                    budget_share=cfg.poll_budget_share,
                )
                lanes[name] = Lane(name, provider, transport, policy, polls)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return lanes

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            for transport in self.opened:
                await transport.__aexit__(None, None, None)
        self.opened.clear()


def _refused_before_processing(exc: RetryableError) -> bool:
    """429 and 503 say "not now" before the request is handled (throttling, overload), so a
    create that got one was not made; so does an answer the provider marked safe to resend,
    and a request dropped before it was sent. Other 5xx, resets and timeouts are ambiguous."""
    return isinstance(exc, RateLimited | NotSent) or exc.status == 503 or exc.resend_safe
