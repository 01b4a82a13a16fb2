"""What both stores do alike around their SQL: the open/close lifecycle and the job writes.

- ``open`` connects (the dialect's ``_connect``: create or upgrade the schema, refuse a store
  that is not ours or damaged), then refuses a store ``copy-store`` moved away, closing
  again. A closed store is never reopened.
- ``close`` first commits the writes already asked for, shielded: a cancelled shutdown must
  still not leave callers waiting on a commit that will never happen, nor connections open.
- Job writes (``transition``/``update``) are group-committed (``groupcommit``): the dialect
  supplies ``_write_batch``, one transaction for whatever writes are pending.

A dialect subclasses ``StoreCore`` and implements the abstract methods; everything else of
the ``Store`` protocol is its own SQL.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Self, TypeVar

import anyio

from harvester.errors import StoreError, StoreUnavailable
from harvester.jobs import ACTIVE, Event, Job, JobState, apply, update
from harvester.store import queries
from harvester.store.base import MOVED_META, AddResult, JobPage, NewJob, moved_error
from harvester.store.groupcommit import GroupCommit
from harvester.store.rows import ACTIVE_SQL, counts_from_rows, job_from_row, page_from_rows

_T = TypeVar("_T")


class StoreCore(ABC):
    #: the dialect's placeholders and insertion-order column, for ``queries``
    _sql: ClassVar[queries.Dialect]

    def __init__(self, where: str) -> None:
        self._where = where  #: names the store in every message (a path, a URL sans password)
        self._opened = False
        self._closed = False
        self._group: GroupCommit | None = None  #: made in open(): it belongs to that loop

    # --- the dialect's part -------------------------------------------------------------------

    @abstractmethod
    async def _connect(self) -> None:
        """Connect and bring the schema up to date; on failure leave nothing open."""

    @abstractmethod
    async def _disconnect(self) -> None:
        """Close what ``_connect`` opened (the pending writes are committed already)."""

    @abstractmethod
    async def _add(self, jobs: Sequence[NewJob], now: float) -> AddResult:
        """``add_jobs`` of a non-empty batch: the walk (``walk.walk``) and its inserts."""

    @abstractmethod
    async def _write_batch(self, writes: Sequence[tuple[Job, int]]) -> list[str | None]:
        """Write each job whose row is still at its base version, in one transaction; one
        problem (or None: written) per write."""

    @abstractmethod
    async def _fetch(
        self, sql: str, params: Sequence[Any], convert: Callable[[tuple[Any, ...]], _T]
    ) -> list[_T]:
        """Every row ``sql`` returns, each through ``convert`` as it is read (no list of
        100,000 raw rows beside the 100,000 jobs they become)."""

    @abstractmethod
    async def get_meta(self, name: str) -> str | None: ...

    # --- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._opened:
            raise StoreError(f"{self._where}: job store is already open")
        if self._closed:
            raise StoreError(f"{self._where}: a closed job store cannot be reopened")
        self._group = GroupCommit(self._write_batch)
        await self._connect()
        self._opened = True
        try:
            moved = await self.get_meta(MOVED_META)
            if moved is not None:
                raise moved_error(self._where, moved)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Commit the writes already asked for, then close. Safe to call twice."""
        if not self._opened:
            self._closed = True
            return
        with anyio.CancelScope(shield=True):
            if self._group is not None:
                await self._group.drain()
            self._opened = False
            self._closed = True
            await self._disconnect()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _require_open(self) -> None:
        if not self._opened:
            state = "closed" if self._closed else "not open"
            raise StoreUnavailable(f"{self._where}: job store is {state}")

    # --- jobs ---------------------------------------------------------------------------------

    async def add_jobs(self, jobs: Sequence[NewJob], *, now: float) -> AddResult:
        if not jobs:
            return AddResult(added=(), duplicates=())
        return await self._add(jobs, now)

    async def transition(self, job: Job, event: Event, *, now: float, **changes: Any) -> Job:
        # apply() first: an illegal move raises before anything reaches the database.
        return await self._writer().write(apply(job, event, now=now, **changes), job)

    async def update(self, job: Job, *, now: float, **changes: Any) -> Job:
        return await self._writer().write(update(job, now=now, **changes), job)

    async def active(self, provider: str | None = None) -> list[Job]:
        return await self.jobs(provider=provider, states=sorted(ACTIVE))

    async def jobs(
        self, *, provider: str | None = None, states: Sequence[JobState] | None = None
    ) -> list[Job]:
        """Jobs filtered by provider and/or state, oldest first (``states=[]`` matches none)."""
        return await self._query(
            lambda p: queries.select_jobs(self._sql, p, provider, states), job_from_row
        )

    async def recent(self, states: Sequence[JobState], *, limit: int) -> list[Job]:
        return await self._query(
            lambda p: queries.recent_jobs(self._sql, p, states, limit), job_from_row
        )

    async def page(
        self,
        *,
        provider: str | None = None,
        states: Sequence[JobState] | None = None,
        since: float | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> JobPage:
        """See the protocol: keyset paging on the insertion-order column. (On PostgreSQL
        that is ``seq``: a listing, not a feed, so a job whose insert commits behind a later
        one may be missed by a walk already past its ``seq``; ``added_since`` is the feed.)"""
        found = await self._query(
            lambda p: queries.page_jobs(self._sql, p, provider, states, since, after, limit),
            lambda row: (int(row[0]), job_from_row(row[1:])),
        )
        return page_from_rows(found, limit)

    async def counts(self) -> dict[tuple[str, JobState], int]:
        sql = "SELECT provider, state, count(*) FROM jobs GROUP BY provider, state"
        return counts_from_rows(await self._fetch(sql, (), tuple))

    async def unknown_statuses(self) -> dict[tuple[str, str], int]:
        rows = await self._fetch(
            "SELECT provider, remote_status, count(*) FROM jobs WHERE status_unknown"
            f" AND state IN ({ACTIVE_SQL}) GROUP BY provider, remote_status",
            (),
            tuple,
        )
        return {(provider, raw or ""): int(n) for provider, raw, n in rows}

    async def _query(
        self,
        build: Callable[[queries.Params], str | None],
        convert: Callable[[tuple[Any, ...]], _T],
    ) -> list[_T]:
        """The rows of the statement ``build`` writes (None from it: nothing can match)."""
        p = self._sql.params()
        sql = build(p)
        return [] if sql is None else await self._fetch(sql, p.values, convert)

    def _writer(self) -> GroupCommit:
        self._require_open()
        assert self._group is not None
        return self._group

    # --- what it has done ---------------------------------------------------------------------

    @property
    def commits(self) -> int:
        """Group commits done (each holds one or more job writes)."""
        return self._group.commits if self._group else 0

    @property
    def writes(self) -> int:
        """Job writes those commits carried."""
        return self._group.writes if self._group else 0

    def __repr__(self) -> str:
        status = "open" if self._opened else ("closed" if self._closed else "unopened")
        return (
            f"<{type(self).__name__} {self._where!r} {status}{self._repr_extra()}"
            f" commits={self.commits} writes={self.writes}"
            f" pending={self._group.pending if self._group else 0}>"
        )

    def _repr_extra(self) -> str:
        return ""
