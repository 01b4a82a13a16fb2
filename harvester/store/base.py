"""The durable job table: the protocol every store implements.

A store persists every state change *before* the caller acts on it: ``transition`` returns
only once the change is committed. A restart resumes from the store alone.

Jobs are keyed by ``(provider, key)``; ``key`` is derived from the reference id (or the
remote job id for tracked jobs). Adding the same job twice is a no-op; adding a different
job under an existing key is refused with the line that tried.

``SharedStore`` adds what several processes working one table need (leases); the engine
uses it when the store offers it (PostgreSQL) and is unchanged otherwise (sqlite).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import orjson

from harvester.errors import StoreError
from harvester.jobs import Event, Job, JobState


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job as a jobs-file line (or the HTTP API) describes it."""

    provider: str
    key: str
    reference_id: str | None
    remote_id: str | None
    payload: Mapping[str, Any] | None
    source: str  #: where it came from, for errors: "jobs.jsonl:12" or "http"


class JobRef(NamedTuple):
    """Just enough of a job to schedule it: what ``added_since`` reports. Whole ``Job``
    objects for 100,000 jobs at start-up were tens of MB the process never gave back."""

    provider: str
    key: str
    state: JobState


@dataclass(frozen=True, slots=True)
class AddResult:
    added: tuple[str, ...]  #: "provider/key" of the jobs inserted
    duplicates: tuple[str, ...]  #: identical jobs the store already had (no-op)


@dataclass(frozen=True, slots=True)
class Renewal:
    """What a replica learns each time it renews its lease (``SharedStore.renew``)."""

    #: replicas whose lease is current, this one included: the divisor of every rate limit
    live_replicas: int
    #: (provider, key) of every active job this replica owns now, as the store sees it
    held: frozenset[tuple[str, str]]
    #: this replica's lease had run out before this renewal (or its row was gone): other
    #: replicas may have claimed some of its jobs meanwhile, so ``held`` is the truth
    lapsed: bool
    #: active jobs per provider in the whole table, whoever holds them: with
    #: ``live_replicas``, each replica's fair share (``harvester.replica`` rebalances on it)
    active: Mapping[str, int] = field(default_factory=dict)
    #: the jobs of ``held`` someone asked to cancel (``SharedStore.take_or_request_cancel``)
    cancels: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """One replica's row of a shared store, as the status page shows it."""

    id: str
    host: str
    started_at: float  #: Unix seconds
    #: since its last renewal, and until its lease runs out (negative: it has), both on the
    #: database's clock like the leases themselves
    heartbeat_ago_s: float
    lease_left_s: float
    held: int  #: active jobs it owns


class JobPage(NamedTuple):
    """One page of ``Store.page``: the jobs, and the cursor of the next page (None: last)."""

    jobs: list[Job]
    next_after: int | None


def encode_past_ids(ids: tuple[str, ...]) -> str | None:
    """``Job.past_remote_ids`` as the stores keep it: a JSON array, NULL when empty."""
    return orjson.dumps(list(ids)).decode() if ids else None


def decode_past_ids(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    ids = orjson.loads(text)
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise StoreError(f"stored past_remote_ids {text[:80]!r} is not a list of ids")
    return tuple(ids)


#: the meta entry ``copy_store`` leaves in a store it copied from: opening it again is refused
MOVED_META = "moved_to"

#: one job as ``dump`` reports it and ``restore`` takes it: the row and its stored payload
DumpedJob = tuple[Job, bytes | None]


def moved_error(where: str, target: str) -> StoreError:
    return StoreError(
        f"{where}: this job store was copied to {target} (harvester copy-store) and is not"
        " used any more; point store.url at the new store"
    )


def not_empty_error(where: str, n_jobs: int, n_meta: int) -> StoreError:
    return StoreError(
        f"{where}: holds {n_jobs} job(s) and {n_meta} meta value(s) already;"
        " a store is copied only into an empty one"
    )


class Store(Protocol):
    """What the engine, the CLI and the daemon need from the job table."""

    async def open(self) -> None:
        """Create or migrate the schema; raise ``StoreError`` if unusable."""

    async def close(self) -> None: ...

    async def add_jobs(self, jobs: Sequence[NewJob], *, now: float) -> AddResult:
        """Insert all of ``jobs`` in one transaction, or none of them.

        A job whose (provider, key) exists with the same reference id, remote id and payload
        is a duplicate (no-op). One that differs raises ``JobsFileError`` naming its
        ``source`` and nothing is inserted. Tracked jobs (remote id, no payload) start
        ``new`` and are moved to ``running`` by the engine with ``Event.TRACK``.
        """

    async def get(self, provider: str, key: str) -> Job | None: ...

    async def load_payload(self, job: Job) -> Mapping[str, Any] | None:
        """The create payload stored with the job (None for tracked jobs)."""

    async def transition(self, job: Job, event: Event, *, now: float, **changes: Any) -> Job:
        """Apply ``event`` (``harvester.jobs.apply``) and commit it before returning.

        Raises ``IllegalTransition`` for an illegal move and ``StoreError`` if the stored
        row is not at ``job.version`` any more (someone else changed it): nothing is written.
        """

    async def update(self, job: Job, *, now: float, **changes: Any) -> Job:
        """Commit a non-state change (remote status, progress, due_at) the same way."""

    async def active(self, provider: str | None = None) -> list[Job]:
        """Every job not in a terminal state, oldest first."""

    async def jobs(
        self, *, provider: str | None = None, states: Sequence[JobState] | None = None
    ) -> list[Job]:
        """Jobs filtered by provider and/or state, oldest first."""

    async def counts(self) -> dict[tuple[str, JobState], int]:
        """Number of jobs per (provider, state)."""

    async def unknown_statuses(self) -> dict[tuple[str, str], int]:
        """Active jobs whose provider status is not a documented one, per (provider, raw)."""

    async def recent(self, states: Sequence[JobState], *, limit: int) -> list[Job]:
        """At most ``limit`` jobs in ``states``, most recently changed first (the status
        page's recent failures: bounded whatever the table holds)."""

    async def added_since(self, cursor: int) -> tuple[list[JobRef], int]:
        """Active jobs added after ``cursor`` (0: all), and the cursor to pass next time.

        Lets a long-running engine notice jobs other processes add without re-reading the
        whole table; a cursor is opaque to callers and only ever grows. No job added is ever
        missed; a backend whose writers commit out of order (PostgreSQL) may report a job
        again, so callers ignore jobs they already know.
        """

    async def page(
        self,
        *,
        provider: str | None = None,
        states: Sequence[JobState] | None = None,
        since: float | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> JobPage:
        """Up to ``limit`` jobs after the cursor ``after`` (0: from the start), in the order
        they were added, filtered by provider, states and ``updated_at >= since``. One
        indexed range read per page: a store of millions of jobs is paged, never loaded."""

    async def get_meta(self, name: str) -> str | None:
        """A small named value the program keeps (e.g. a provider batch id)."""

    async def set_meta(self, name: str, value: str) -> None: ...

    async def update_meta(self, name: str, update: Callable[[str | None], str]) -> str:
        """Store ``update(value)`` under ``name`` (``value`` None: nothing stored yet) and
        return it, in one transaction no other ``update_meta`` of ``name`` interleaves with:
        a read-modify-write several processes may run at once without losing one's write.
        ``update`` must be quick and do no I/O (it runs while the value is locked, and may
        run in a worker thread); if it raises, nothing is stored."""

    async def check(self) -> list[str]:
        """Integrity problems found (empty list: healthy). Read-only."""

    async def dump(self) -> tuple[list[DumpedJob], dict[str, str]]:
        """Every job (oldest first, with its stored payload bytes) and every meta value, read
        in one snapshot."""

    async def restore(self, jobs: Sequence[DumpedJob], meta: Mapping[str, str]) -> None:
        """Insert ``jobs`` exactly as given (state, versions, attempts...) and ``meta`` into
        this store, in one transaction. Refused with ``StoreError`` unless the store holds no
        job and no meta value yet: a copy never merges into live data."""


@runtime_checkable
class SharedStore(Store, Protocol):
    """A job table several harvester processes (replicas) work on at once.

    Work is shared by leases. A replica ``join``s under a unique owner id and from then on
    ``claim``s jobs: each claimed job records the owner, and only that owner may write it
    (``transition``/``update`` raise ``StoreError`` for anybody else's job, just as for a
    stale version). The lease is one per replica, not one per job: ``renew`` moves the
    replica's own deadline forward, which keeps every job it owns. When a replica stops
    renewing (it died, hung or lost the database) its deadline passes and its jobs become
    claimable by the others; a job whose owner is gone keeps its state, so the next owner
    resumes it from the store like a restart would.

    Every lease time ("now", "until") is the store's own clock, never the caller's: replicas
    whose clocks disagree must still agree on whose lease holds, or one of them takes over
    jobs whose creates another still has in flight.
    """

    async def join(self, owner: str, *, lease_s: float) -> None:
        """Become replica ``owner`` (unique per process) with a lease of ``lease_s``.

        From here on every job write by this store object requires that ``owner`` owns the
        job. The replica counts as live once this returns.
        """

    async def renew(self) -> Renewal:
        """Extend this replica's lease to ``now + lease_s`` in one write, and report."""

    async def claim(self, provider: str, *, limit: int) -> list[Job]:
        """Take up to ``limit`` active jobs of ``provider`` that nobody holds a live lease
        on, oldest first, and make them this replica's. Concurrent claimers never get the
        same job."""

    async def take_or_request_cancel(self, provider: str, key: str) -> tuple[Job | None, bool]:
        """For a cancel of ``provider``/``key``: make an active job nobody holds a live
        lease on this replica's, under the claim's own rules (True: ours now, cancel it);
        record a cancel request on an active job another live replica holds, which that one
        carries out at its next renewal (False). An ended job is returned unchanged (False);
        None: no such job."""

    async def forget_cancel_request(self, provider: str, key: str) -> None:
        """Clear a cancel request the holder could not carry out (it said why)."""

    async def release(self, provider: str, keys: Sequence[str]) -> int:
        """Give up this replica's ownership of those jobs (others may claim them at once);
        jobs owned by another replica are left alone. Returns how many were released."""

    async def leave(self) -> None:
        """Release every job this replica owns and stop counting as live (a clean exit)."""

    async def replicas(self) -> list[ReplicaInfo]:
        """Every replica row (live or not yet swept), with the active jobs each owns."""

    async def add_meta(self, name: str, value: str) -> str:
        """Store ``value`` under ``name`` unless a value is there already; return the one
        stored. Replicas that race to record the same one-off setup agree on one answer."""
