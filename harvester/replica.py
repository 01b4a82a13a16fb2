"""The engine as one of several replicas sharing a job table (``SharedStore``, PostgreSQL).

With a shared store the engine does not load every active job: each lane's *claimer* takes
jobs from the store as the lane has room for them, and only jobs this replica holds are ever
stepped or harvested. A replica's hold on its jobs is one lease, renewed by the *renewer*
every ``lease_s / 3`` or 2 s, whichever is sooner (a renewal also brings the replica count
that rate limits are divided by); a replica that stops renewing (killed, hung, cut off from
the database) loses every job at once when its lease runs out, and the others claim them.

Why this is safe whatever replica dies when:
- Every job write by a replica requires that it still owns the job (the store checks owner
  and version in the same UPDATE). A replica whose job was taken over is refused, drops the
  job and never retries it blindly; the new owner resumes from the stored state, so a job
  found in ``submitting`` is reconciled, never re-POSTed (the engine's normal path).
- Leases are timed by the database's clock alone (the store reads and writes every lease
  time with ``now()``), so replicas whose wall clocks disagree, even by minutes, still agree
  on whose lease holds. The renewer knows, on its own monotonic clock, until when its lease
  surely holds: ``deadline`` is the moment it *sent* its last successful renewal plus
  ``lease_s`` (the database started the lease later than that). If renewals fail until
  ``deadline - margin``, it drops every job and stops every harvest itself, before anybody
  else may claim them (``margin`` = lease_s / 6 covers clocks *running* at different rates,
  not set to different times).
- A harvest checks both, ownership in the store and the local deadline, just before its
  manifest is renamed into place (``confirm``), so two replicas never complete the same
  output at the same time. (A process frozen for longer than the lease between that check and
  the rename defeats any lease without fencing; that window is one local file rename.)

Work is rebalanced when replicas come and go: after each renewal a replica holding more than
its fair share of a provider's active jobs (active jobs / live replicas, plus some slack)
hands the excess back to the store and leaves it to the others for a few renewal periods
(``rebalance``).

Rate limits are shared the same way: each replica's limiter for a provider gets
``1 / live_replicas`` of its rate, burst and concurrency (at least 1), where live replicas
are the lease rows not yet expired, re-read at every renewal. A new replica waits one renewal
period after joining before its first request, so the others have shrunk their shares by
then; a dead replica's share is unused until its lease expires (the safe direction).
"""

from __future__ import annotations

import math
import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from harvester import control
from harvester.clock import wait_for
from harvester.errors import StaleWrite, StoreError
from harvester.jobs import ACTIVE, Job
from harvester.lane import CancelRequest, Lane
from harvester.logs import get_logger
from harvester.ownership import Work
from harvester.ratelimit import backoff_delay
from harvester.store.base import SharedStore

log = get_logger("harvester.replica")

#: how often a lane with room asks the store for more jobs (sooner when woken) ...
CLAIM_INTERVAL_S = 0.5
#: ... growing to this while the store has none: what ``harvester submit`` adds is seen
#: within this long (jobs posted to a replica's HTTP API wake its claimers at once)
IDLE_CLAIM_INTERVAL_S = 2.0
#: renewals come every lease_s / 3, or this often if that is sooner: a renewal also re-reads
#: the live replica count, so rate shares follow a replica joining within this long
RENEW_MAX_S = 2.0
#: a new replica waits this many renewal periods before its first request
SETTLE_PERIODS = 1.25
#: a replica holding more than its fair share of a provider's active jobs by more than this
#: many (or a tenth of the share, whichever is more) hands the excess back ...
REBALANCE_SLACK = 4
#: ... and claims nothing for that provider for this many renewal periods, so the others
#: get first pick of what it handed back
REBALANCE_HOLD_PERIODS = 3


def replica_id() -> str:
    """Unique per process run: a restarted pod must not inherit its predecessor's jobs
    before they are reconciled like anybody else's."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Replica:
    """This process's membership: its lease, the jobs it holds per lane, its rate shares.

    The ``Ownership`` of an engine on a shared store; it sees the engine only as ``Work``.
    """

    def __init__(self, work: Work, store: SharedStore, *, lease_s: float) -> None:
        self.work = work
        self.store = store
        self.lease_s = lease_s
        self.owner = replica_id()
        #: monotonic time until which no other replica can have claimed our jobs
        self.deadline = -math.inf
        #: live replicas at the last renewal, this one included (0: not known yet)
        self.live = 0
        #: lane -> key -> monotonic time it was claimed (or adopted)
        self.held: dict[str, dict[str, float]] = {}
        self._wake: dict[str, anyio.Event] = {}
        self._harvests: dict[tuple[str, str], anyio.CancelScope] = {}
        #: held here, missing from the last renewal's answer, but a task was busy with them
        self._suspects: set[tuple[str, str]] = set()
        #: active jobs per provider in the whole table, at the last renewal
        self._active: dict[str, int] = {}
        #: lane -> monotonic time before which its claimer leaves jobs to the others
        self._hold_back: dict[str, float] = {}
        #: cancels recorded on held jobs by other processes, being served here
        self._asked: dict[tuple[str, str], CancelRequest] = {}

    def __repr__(self) -> str:
        held = sum(len(keys) for keys in self.held.values())
        left = self.deadline - self.work.clock.monotonic()
        return f"<Replica {self.owner} held={held} live={self.live} lease_left={left:.1f}s>"

    @property
    def renew_every(self) -> float:
        return min(self.lease_s / 3, RENEW_MAX_S)

    @property
    def margin(self) -> float:
        return self.lease_s / 6

    def valid(self) -> bool:
        """Is our lease surely ours right now (with the safety margin)?"""
        return self.work.clock.monotonic() < self.deadline - self.margin

    def holds(self, lane: Lane, key: str) -> bool:
        return key in self.held.get(lane.name, {})

    # -- membership -------------------------------------------------------------------------

    async def start(self, stop: anyio.Event | None) -> bool:
        """Join, let the others count us, then learn our shares. False if stopped meanwhile."""
        for name in self.work.lanes:
            self.held.setdefault(name, {})
        clock = self.work.clock
        sent = clock.monotonic()
        await self.store.join(self.owner, lease_s=self.lease_s)
        self.deadline = sent + self.lease_s
        # Read at scrape time: a value set at each renewal would be stale in between.
        self.work.metrics.lease_left.set_function(
            lambda: max(0.0, self.deadline - self.work.clock.monotonic())
        )
        log.info("replica joined", replica=self.owner, lease_s=self.lease_s)
        if await wait_for(clock, stop or anyio.Event(), self.renew_every * SETTLE_PERIODS):
            return False
        await self.renew_once()
        self._report()
        return True

    @property
    def joined(self) -> bool:
        return self.deadline > -math.inf

    async def leave(self) -> None:
        """Hand every job we still hold back at once, rather than after our lease expires."""
        if not self.joined:
            return
        with self.work.clock.move_on_after(10, shield=True):
            try:
                await self.store.leave()
                log.info("replica left: its jobs are free for the others", replica=self.owner)
            except StoreError as exc:
                log.warning(
                    "could not hand jobs back; the others take them over when the lease expires",
                    replica=self.owner,
                    error=str(exc),
                    lease_s=self.lease_s,
                )

    async def renewer(self) -> None:
        clock = self.work.clock
        ok = True
        while True:
            await clock.sleep(self.renew_every if ok else min(1.0, self.renew_every))
            holding = any(self.held.values()) or bool(self._harvests)
            # While we hold jobs, a renewal that cannot finish before the deadline is as
            # good as failed: it must not keep us acting past the point others may claim.
            bound = self.deadline - self.margin - self.work.clock.monotonic()
            with clock.move_on_after(max(bound, 0.0) if holding else self.lease_s) as scope:
                try:
                    await self.renew_once()
                    ok = True
                except StoreError as exc:
                    ok = False
                    log.warning(
                        "lease renewal failed",
                        replica=self.owner,
                        error=str(exc),
                        lease_left_s=round(self.deadline - self.work.clock.monotonic(), 1),
                    )
            if scope.cancelled_caught:
                ok = False
            self.work.metrics.renewals.labels("ok" if ok else "failed").inc()
            if ok and self.valid():
                await self.rebalance()
            self._report()
            if not self.valid() and any(self.held.values()):
                self.drop_all("the lease could not be renewed in time")
            if self.work.burst:
                await self._check_done()

    async def renew_once(self) -> None:
        clock = self.work.clock
        sent = clock.monotonic()
        renewal = await self.store.renew()
        self.deadline = sent + self.lease_s
        if renewal.lapsed:
            log.warning(
                "this replica's lease had run out; it keeps only the jobs nobody took",
                replica=self.owner,
                held=len(renewal.held),
            )
        by_lane: dict[str, set[str]] = {}
        for provider, key in renewal.held:
            by_lane.setdefault(provider, set()).add(key)
        suspects, self._suspects = self._suspects, set()
        busy = set(self._harvests) | set(self.work.harvests_queued())
        for name, lane in self.work.lanes.items():
            stored = by_lane.get(name, set())
            mine = self.held.setdefault(name, {})
            for key, since in list(mine.items()):
                # Claimed after this renewal was sent: not in its answer, yet ours.
                if since >= sent or key in stored:
                    continue
                # A task busy with the job may have just finished it (a finished job's
                # lease goes with its last write) and not yet said so: drop it only if it
                # is still missing next time.
                job = (name, key)
                if (key in lane.in_flight or job in busy) and job not in suspects:
                    self._suspects.add(job)
                    continue
                self.drop(lane, key, "another replica holds it now")
            for key in stored - mine.keys():
                # Ours in the store, unknown here: dropped after a write failed, or an
                # answer lost. Taken back unless a task still works on it; the next step
                # reads it afresh, so nothing is redone blindly.
                if key not in lane.in_flight and (name, key) not in busy:
                    self._take(lane, key)
        self._share(renewal.live_replicas)
        self._active = dict(renewal.active)
        await self._serve_requests(renewal.cancels)

    async def _serve_requests(self, asked: frozenset[tuple[str, str]]) -> None:
        """Hand cancels other processes recorded on our jobs to the jobs' workers; clear a
        request that was refused (its reason is logged), so it is not served again."""
        for job, req in list(self._asked.items()):
            if req.done.is_set():
                del self._asked[job]
                if req.error is not None:
                    log.warning("requested cancel not done", job=job, error=req.error)
                    await self.store.forget_cancel_request(*job)
        for name, key in sorted(asked - self._asked.keys()):
            lane = self.work.lanes.get(name)
            if lane is None or not self.holds(lane, key):
                continue
            self._asked[name, key] = lane.cancels.setdefault(key, CancelRequest())
            if key not in lane.in_flight:
                lane.schedule(key, self.work.clock.monotonic())

    def _report(self) -> None:
        metrics = self.work.metrics
        metrics.replicas_live.set(self.live)
        for name in self.work.lanes:
            metrics.held_jobs.labels(name).set(len(self.held.get(name, {})))
            metrics.fair_share.labels(name).set(self.fair_share(name))

    # -- balance ----------------------------------------------------------------------------

    def fair_share(self, provider: str) -> int:
        """How many of ``provider``'s active jobs are ours to hold, by the last renewal."""
        return math.ceil(self._active.get(provider, 0) / max(self.live, 1))

    async def rebalance(self) -> None:
        """Hand back what we hold beyond our fair share, so a replica that joins later gets
        work that is already running, not only new jobs.

        Claimers take jobs while they have room, so the first replica up ends up holding
        everything; the others would idle with their share of the rate limit while it works
        through every job with only its own. Handed back are jobs no task is busy with,
        those whose next poll is furthest away first (they lose least by moving); whoever
        claims one polls it at once and carries on from the stored state.
        """
        if self.live < 2:
            return
        now = self.work.clock.monotonic()
        busy = set(self._harvests) | set(self.work.harvests_queued())
        for name, lane in self.work.lanes.items():
            mine = self.held.get(name, {})
            share = self.fair_share(name)
            excess = len(mine) - share
            if excess <= max(REBALANCE_SLACK, share // 10):
                continue
            idle = [k for k in mine if k not in lane.in_flight and (name, k) not in busy]
            idle.sort(key=lambda k: lane.queue.due_at(k) or now, reverse=True)
            keys = idle[:excess]
            if not keys:
                continue
            # Forgotten here before the store hears of it: once released, another replica
            # may claim a job at any moment, and we must not step it after that.
            for key in keys:
                mine.pop(key, None)
                lane.forget(key)
                self.work.remaining.discard((name, key))
            self._hold_back[name] = now + REBALANCE_HOLD_PERIODS * self.renew_every
            try:
                released = await self.store.release(name, keys)
            except StoreError as exc:
                # Still ours in the store: the next renewal hands them back to us.
                log.warning("could not hand jobs back", provider=name, error=str(exc))
                continue
            self.work.metrics.handed_back.labels(name).inc(released)
            log.info(
                "jobs handed back for balance",
                provider=name,
                jobs=released,
                held=len(mine),
                fair_share=share,
                replicas=self.live,
            )

    # -- claiming ---------------------------------------------------------------------------

    async def claimer(self, lane: Lane) -> None:
        clock = self.work.clock
        failures = 0
        interval = CLAIM_INTERVAL_S
        while not self.work.draining:
            room = self._room(lane)
            if (
                room > 0
                and self.valid()
                and clock.monotonic() >= self._hold_back.get(lane.name, 0.0)
            ):
                try:
                    jobs = await self.store.claim(lane.name, limit=room)
                except StoreError as exc:
                    failures += 1
                    delay = backoff_delay(
                        failures - 1, base=CLAIM_INTERVAL_S, cap=self.lease_s, rng=self.work.rng
                    )
                    log.warning(
                        "claiming jobs failed", provider=lane.name, error=str(exc), retry_s=delay
                    )
                    await clock.sleep(delay)
                    continue
                failures = 0
                if self._draining():
                    return  # claimed as the drain began: leave() hands them back
                for job in jobs:
                    self._take(lane, job.key)
                interval = CLAIM_INTERVAL_S if jobs else min(interval * 2, IDLE_CLAIM_INTERVAL_S)
                if jobs:
                    log.info(
                        "jobs claimed",
                        provider=lane.name,
                        jobs=len(jobs),
                        held=len(self.held[lane.name]),
                    )
                    if len(jobs) == room:
                        # Maybe more waiting: once the dispatcher has taken these, look again.
                        await clock.sleep(0.05)
                        continue
                elif self.work.burst:
                    await self._check_done()
            wake = self._wake[lane.name] = anyio.Event()
            if await wait_for(clock, wake, interval):
                interval = CLAIM_INTERVAL_S

    def _draining(self) -> bool:
        return self.work.draining

    def _room(self, lane: Lane) -> int:
        """How many more jobs this lane could start on right now.

        Only jobs that have something to do *now* count: a held job waiting for its next
        poll costs a heap entry, not a worker. Due jobs not yet handed to a worker mean the
        lane is behind already, so it claims nothing. A lane slowed by its share of the rate
        limit keeps its workers busy waiting for tokens, and stops claiming: replicas end up
        holding work in proportion to what they can do.
        """
        nxt = lane.queue.next_due()
        if nxt is not None and nxt <= self.work.clock.monotonic():
            return 0
        return lane.cfg.max_concurrency - len(lane.in_flight)

    def wake(self, provider: str | None = None) -> None:
        for name, event in self._wake.items():
            if provider is None or name == provider:
                event.set()

    def adopt(self, lane: Lane, key: str) -> None:
        """Work ``key``, which the store made ours outside a claim (a cancel took it)."""
        self._take(lane, key)

    def _take(self, lane: Lane, key: str) -> None:
        now = self.work.clock.monotonic()
        self.held.setdefault(lane.name, {})[key] = now
        self.work.remaining.add((lane.name, key))
        lane.schedule(key, now)

    def finished(self, provider: str, key: str) -> None:
        """The job reached a terminal state: the store gave its lease up with that write."""
        if self.held.get(provider, {}).pop(key, None) is not None:
            self.wake(provider)

    def drop(self, lane: Lane, key: str, why: str) -> None:
        """Stop everything this process does with ``key``; its owner (maybe us again, after
        the next renewal) resumes it from the store."""
        self.held.get(lane.name, {}).pop(key, None)
        lane.forget(key)
        self.work.remaining.discard((lane.name, key))
        scope = self._harvests.get((lane.name, key))
        if scope is not None:
            scope.cancel()
        self.work.metrics.dropped.labels(lane.name).inc()
        log.warning("job dropped", provider=lane.name, job=key, why=why, replica=self.owner)
        self.wake(lane.name)

    def drop_all(self, why: str) -> None:
        for name, lane in self.work.lanes.items():
            keys = list(self.held.get(name, {}))
            for key in keys:
                self.held[name].pop(key, None)
                lane.forget(key)
                self.work.remaining.discard((name, key))
            if keys:
                self.work.metrics.dropped.labels(name).inc(len(keys))
                log.warning("jobs dropped", provider=name, jobs=len(keys), why=why)
        for scope in self._harvests.values():
            scope.cancel()

    # -- harvesting -------------------------------------------------------------------------

    @contextmanager
    def harvesting(self, provider: str, key: str) -> Iterator[None]:
        """A harvest that ``drop`` can stop: its temporary files are removed on the way out,
        and the next owner sweeps whatever is left."""
        with anyio.CancelScope() as scope:
            self._harvests[provider, key] = scope
            try:
                yield
            finally:
                self._harvests.pop((provider, key), None)
        if scope.cancelled_caught:
            log.warning("harvest stopped: job dropped", provider=provider, job=key)

    async def confirm(self, job: Job) -> Job:
        """Just before a harvest's manifest: prove the job is still ours, or raise.

        The write is owner- and version-checked like any other, so it fails if anybody
        took the job over; the local deadline covers a store that could not tell us yet.
        """
        if not self.valid():
            raise StaleWrite(
                "this replica's lease may have run out; the manifest is not written",
                job=job.label,
            )
        return await self.store.update(job, now=self.work.clock.wall())

    # -- the rest of Ownership -------------------------------------------------------------

    async def take_up(self) -> None:
        return None  # jobs come by claim (``claimer``)

    def run_in(self, tg: TaskGroup) -> None:
        for lane in self.work.lanes.values():
            tg.start_soon(self.claimer, lane, name=f"claim:{lane.name}")
        tg.start_soon(self.renewer, name="lease")

    def store_failed(self, lane: Lane, key: str, exc: StoreError) -> None:
        # Someone else owns the job now, or the database did not answer: either way it is
        # not ours to go on with. If it is still ours, the next renewal says so.
        self.drop(lane, key, str(exc))

    @property
    def caches_rows(self) -> bool:
        return False  # another replica may take a job over between two of its steps

    async def keep_setup(self, key: str, value: str) -> str:
        return await self.store.add_meta(key, value)

    async def refresh(self) -> None:
        self.wake()  # claimers look at once rather than at their next tick

    def resume(self, lane: Lane, job: Job) -> None:
        self.wake()  # claimed like any other unheld active job

    async def cancel_elsewhere(self, lane: Lane, job: Job) -> CancelRequest | None:
        if self.holds(lane, job.key):
            return None
        answer = await control.take_or_request(self.work, self.store, job)
        if answer is None:
            self.adopt(lane, job.key)
        return answer

    @property
    def name(self) -> str | None:
        return self.owner

    # -- shares and burst mode --------------------------------------------------------------

    def _share(self, live: int) -> None:
        if live == self.live:
            return
        self.live = live
        for lane in self.work.lanes.values():
            cfg = lane.cfg
            rate = cfg.rate_per_s / live if cfg.rate_per_s > 0 else cfg.rate_per_s
            burst = max(1.0, cfg.burst / live)
            concurrency = max(1, cfg.max_concurrency // live)
            lane.limiter.set_rate(rate, burst, max_concurrency=concurrency)
            log.info(
                "rate limit shared",
                provider=lane.name,
                replicas=live,
                rate_per_s=round(rate, 3),
                burst=round(burst, 3),
                max_concurrency=concurrency,
            )

    async def _check_done(self) -> None:
        """Burst mode (``harvester harvest``): done once no job of ours is active anywhere,
        whoever holds it."""
        if any(self.held.values()) or self.work.done.is_set():
            return
        try:
            counts = await self.store.counts()
        except StoreError as exc:
            log.warning("could not count jobs", error=str(exc))
            return
        active = sum(
            n for (p, s), n in counts.items() if p in self.work.lanes and s in ACTIVE and n
        )
        if not active and not any(self.held.values()):
            self.work.done.set()
