"""The engine's run: lanes, workers, the step each job takes next, the harvest pool, drain.

See the package's docstring (``harvester.engine``) for the whole; each step of a job's life
is a module of its own beside this one.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Iterable, Set
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from harvester import control, tracing
from harvester.clock import Clock, SystemClock, wait_for
from harvester.config import Config
from harvester.durations import DurationStats
from harvester.engine import cancel, submit
from harvester.engine.harvest import Harvests
from harvester.engine.lanes import Transports, setup_provider, setup_until_done
from harvester.engine.learned import DURATIONS_META, LearnedDurations
from harvester.engine.output import OutputDir
from harvester.engine.poll import Poller
from harvester.engine.reconcile import reconcile
from harvester.errors import (
    ControlError,
    FatalError,
    HarvesterError,
    RateLimited,
    RetryableError,
    StoreError,
    brief,
)
from harvester.exchange import ExchangeFactory
from harvester.failpoints import failpoint
from harvester.jobs import Event, Job, JobState
from harvester.lane import CancelRequest, Lane
from harvester.logs import get_logger
from harvester.metrics import Metrics
from harvester.offload import Offload
from harvester.ownership import Ownership, Solo
from harvester.providers.base import Status
from harvester.ratelimit import backoff_delay
from harvester.replica import Replica
from harvester.store.base import JobRef, SharedStore, Store
from harvester.tracking import Remaining

__all__ = ["DURATIONS_META", "Engine", "offline"]

log = get_logger("harvester.engine")

#: how often the learned job durations (``harvester.durations``) are merged into the store
#: (``engine.learned``), and the bound on the last merge at the end of a run
DURATIONS_SAVE_S = 60.0
DURATIONS_FINAL_SAVE_S = 5.0


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
        #: how long each provider's jobs take, learned from the ones that finish (shared by
        #: the lanes' poll schedulers; kept in the store's meta table across restarts)
        self.durations = DurationStats()
        self._learned = LearnedDurations(store, self.durations)
        #: which jobs are this process's to work (harvester.ownership)
        self.ownership: Ownership = (
            Replica(self, store, lease_s=config.store.lease_s)
            if isinstance(store, SharedStore)
            else Solo(self, store)
        )
        #: output.dir's health, and the jobs parked while it cannot be written
        self.output = OutputDir(self)
        #: the steps of a job's life that keep something between jobs
        self.poller = Poller(self)
        self.harvests = Harvests(self, self.output, Offload(config.harvest.threads or None))

    @property
    def offload(self) -> Offload:
        """The worker threads every harvest decodes, hashes and writes in."""
        return self.harvests.offload

    @property
    def output_problem(self) -> str | None:
        """Why output.dir cannot be written now (daemon: not ready, harvests paused)."""
        return self.output.problem

    @property
    def output_ready(self) -> Callable[[], None] | None:
        """Run (in a worker thread) each time output.dir has just proved writable, before
        anything is sent; the daemon writes the store's marker there (store/binding.py)."""
        return self.output.ready

    @output_ready.setter
    def output_ready(self, value: Callable[[], None] | None) -> None:
        self.output.ready = value

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
        return self.harvests.queued

    def fail(self, exc: HarvesterError) -> None:
        self._fail_fatal(exc)

    # -- public -------------------------------------------------------------------------
    async def run(self, *, stop: anyio.Event | None = None) -> None:
        """Work until done (burst), ``stop`` is set, or a fatal error (re-raised)."""
        for name in self.names:
            if name not in self.config.providers:
                raise FatalError(f"provider {name!r} is not configured")
        async with Transports(self) as lanes:
            self.lanes = lanes
            harvest_send, harvest_recv = anyio.create_memory_object_stream[tuple[str, str]](
                self.config.harvest.concurrency * 2
            )
            self.harvests.send = harvest_send
            try:
                await self._work(lanes, harvest_recv, stop)
            finally:
                if self.lanes:  # else nothing started, nothing learned
                    with self.clock.move_on_after(DURATIONS_FINAL_SAVE_S, shield=True):
                        await self._learned.save()
                await self.ownership.leave()
        if self.fatal is not None:
            raise self.fatal

    async def _work(
        self,
        lanes: dict[str, Lane],
        harvest_recv: MemoryObjectReceiveStream[tuple[str, str]],
        stop: anyio.Event | None,
    ) -> None:
        if not await self.output.writable(stop):
            return  # stopped while output.dir could not be written: nothing was sent
        if not await self.ownership.start(stop):
            return  # stopped before the first request
        for lane in lanes.values():
            if not await setup_until_done(self, lane, stop):
                return  # stopped while a provider was unreachable: nothing started
        await self._learned.load()
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
                tg.start_soon(self.output.watch, name="output-watch")

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
                if job.state == JobState.RUNNING:
                    # After a restart the poll scheduler spaces the first polls.
                    lane.resume(job.key, now, index=i if initial else 0, total=len(fresh))
                else:
                    lane.schedule(job.key, now)
            if fresh:
                log.info("jobs loaded", provider=name, jobs=len(fresh))

    async def refresh(self) -> None:
        """Pick up jobs other processes (or the HTTP API) added to the store, now."""
        await self.ownership.refresh()

    # -- learned durations ---------------------------------------------------------------
    async def _keep_durations(self) -> None:
        while True:
            await self.clock.sleep(DURATIONS_SAVE_S)
            await self._learned.save(refresh=True)

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
        """Which step of its life the job takes now (each one a module of this package)."""
        if not self.ownership.holds(lane, key):
            lane.forget(key)  # dropped while it waited in the queue
            return
        job = lane.cache.pop(key, None) or await self.store.get(lane.name, key)
        req = lane.cancels.pop(key, None)
        if req is not None and await cancel.serve_cancel(self, lane, job, req):
            return
        if job is not None and await cancel.expire(self, lane, job):
            return
        if job is None or job.terminal:
            lane.forget(key)
            self._finished(lane.name, key)
            return
        try:
            if job.state == JobState.NEW:
                await submit.start(self, lane, job)
            elif job.state == JobState.SUBMITTING:
                await reconcile(self, lane, job, exists=False)
            elif job.state == JobState.RUNNING:
                await self.poller.poll(lane, job)
            else:  # succeeded / harvesting
                await self.queue_harvest(lane.name, job.key)
        except RetryableError as exc:
            self.retry_later(lane, key, exc)

    # -- what the steps see (harvester.engine.view.View) --------------------------------
    def retry_later(self, lane: Lane, key: str, exc: RetryableError) -> None:
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

    async def transition(self, job: Job, event: Event, **changes: Any) -> Job:
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

    def poll_later(
        self, lane: Lane, job: Job, *, changed: bool, started_at: float | None = None
    ) -> None:
        self.poller.later(lane, job, changed=changed, started_at=started_at)

    async def queue_harvest(self, provider: str, key: str, status: Status | None = None) -> None:
        await self.harvests.queue(provider, key, status)

    # -- harvest pool --------------------------------------------------------------------
    async def _harvester(self, recv: MemoryObjectReceiveStream[tuple[str, str]]) -> None:
        async with recv:
            async for provider, key in recv:
                if not self._enter():
                    self.harvests.queued.discard((provider, key))
                    continue
                try:
                    with self.ownership.harvesting(provider, key):
                        await self.harvests.one(self.lanes[provider], key)
                except StoreError as exc:
                    self.ownership.store_failed(self.lanes[provider], key, exc)
                except FatalError as exc:
                    self._fail_fatal(exc)
                finally:
                    self.harvests.done(provider, key)
                    self._leave()


@asynccontextmanager
async def offline(engine: Engine, setup: Iterable[str] = ()) -> AsyncIterator[None]:
    """The engine's transports without its work loop, for a process that holds the engine
    lock (``harvester cancel``): providers in ``setup`` restore their one-off setup, which
    reconciling a job in ``submitting`` needs."""
    async with Transports(engine) as lanes:
        engine.lanes = lanes
        for name in setup:
            await setup_provider(engine, lanes[name])
        yield
