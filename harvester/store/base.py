"""The durable job table: the protocol every store implements.

A store persists every state change *before* the caller acts on it: ``transition`` returns
only once the change is committed. A restart resumes from the store alone.

Jobs are keyed by ``(provider, key)``; ``key`` is derived from the reference id (or the
remote job id for tracked jobs). Adding the same job twice is a no-op; adding a different
job under an existing key is refused with the line that tried.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

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


@dataclass(frozen=True, slots=True)
class AddResult:
    added: tuple[str, ...]  #: "provider/key" of the jobs inserted
    duplicates: tuple[str, ...]  #: identical jobs the store already had (no-op)


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

    async def added_since(self, cursor: int) -> tuple[list[Job], int]:
        """Active jobs added after ``cursor`` (0: all), and the cursor to pass next time.

        Lets a long-running engine notice jobs other processes add without re-reading the
        whole table; a cursor is opaque to callers and only ever grows.
        """

    async def get_meta(self, name: str) -> str | None:
        """A small named value the program keeps (e.g. a provider batch id)."""

    async def set_meta(self, name: str, value: str) -> None: ...

    async def check(self) -> list[str]:
        """Integrity problems found (empty list: healthy). Read-only."""
