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
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import anyio

from harvester.errors import StoreError, StoreUnavailable
from harvester.jobs import Event, Job, apply, update
from harvester.store.base import MOVED_META, AddResult, NewJob, moved_error
from harvester.store.groupcommit import GroupCommit


class StoreCore(ABC):
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

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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
