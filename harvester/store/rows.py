"""A job as both stores keep it: the row format, the key rules, and how a refused row is told.

Both dialects select ``JOB_COLUMNS`` in this order and build ``Job``s with ``job_from_row``,
so the two cannot drift apart on what a row means or what a corrupt one is.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from harvester.errors import JobsFileError, StoreError
from harvester.jobs import ACTIVE, Job, JobState
from harvester.store.base import JobPage, decode_past_ids, encode_past_ids

#: The order of ``Job``'s constructor, so a row becomes a Job without a dict in between.
JOB_COLUMNS = (
    "provider, key, reference_id, remote_id, state, created_at, updated_at, remote_status,"
    " progress, reason, attempts, due_at, output, version, status_unknown, cancelled_by,"
    " past_remote_ids, started_at, cancel_requested_at"
)
JOB_COLUMN_NAMES = tuple(c.strip() for c in JOB_COLUMNS.split(","))
SELECT_JOBS = f"SELECT {JOB_COLUMNS} FROM jobs"

#: A key names the job's output directory, so an unsafe one is a path traversal.
SAFE_KEY = re.compile(r"[A-Za-z0-9._+-]{1,120}")
NEED_REMOTE_ID = ("running", "succeeded", "harvesting", "harvested")
NEED_REASON = ("failed", "cancelled", "error")

#: the columns a job is found by besides its key, with the name each has in messages
ID_COLUMNS = (("reference_id", "reference id"), ("remote_id", "remote id"))


def safe_key(key: str) -> bool:
    return bool(SAFE_KEY.fullmatch(key)) and not key.startswith(".")


def states_sql(states: Iterable[str | JobState]) -> str:
    """``states`` as an SQL list of literals (``'new', 'running'``): the same text in both
    dialects, and safe to inline since every value is a ``JobState``'s."""
    return ", ".join(f"'{JobState(s).value}'" for s in states)


ACTIVE_SQL = states_sql(sorted(ACTIVE))


def job_from_row(row: tuple[Any, ...]) -> Job:
    (provider, key, reference_id, remote_id, state, created_at, updated_at, remote_status,
     progress, reason, attempts, due_at, output, version, unknown, cancelled_by, past,
     started_at, cancel_requested_at) = row  # fmt: skip
    return Job(
        provider,
        key,
        reference_id,
        remote_id,
        parse_state(provider, key, state),
        created_at,
        updated_at,
        remote_status,
        progress,
        reason,
        attempts,
        due_at,
        output,
        version,
        bool(unknown),  # sqlite keeps it as 0/1
        cancelled_by,
        decode_past_ids(past),
        started_at,
        cancel_requested_at,
    )


def job_row(job: Job) -> tuple[Any, ...]:
    """``job`` in the order of ``JOB_COLUMNS``, the inverse of ``job_from_row``."""
    return (
        job.provider,
        job.key,
        job.reference_id,
        job.remote_id,
        job.state.value,
        job.created_at,
        job.updated_at,
        job.remote_status,
        job.progress,
        job.reason,
        job.attempts,
        job.due_at,
        job.output,
        job.version,
        job.status_unknown,
        job.cancelled_by,
        encode_past_ids(job.past_remote_ids),
        job.started_at,
        job.cancel_requested_at,
    )


#: what a job write (``transition``/``update``) sets: all but the key, the creation time and
#: the cancel request (kept by the row, never by a write)
WRITTEN_COLUMNS = tuple(
    c for c in JOB_COLUMN_NAMES if c not in ("provider", "key", "created_at", "cancel_requested_at")
)
_written = operator.itemgetter(*(JOB_COLUMN_NAMES.index(c) for c in WRITTEN_COLUMNS))


def written_values(job: Job) -> tuple[Any, ...]:
    """``job``'s values of ``WRITTEN_COLUMNS``, in that order."""
    return tuple(_written(job_row(job)))


def parse_state(provider: str, key: str, state: str) -> JobState:
    try:
        return JobState(state)
    except ValueError:  # no cause: the enum's ValueError says only what this message says
        raise StoreError(
            f"stored state {state!r} is not a job state", job=f"{provider}/{key}"
        ) from None


def page_from_rows(found: list[tuple[int, Job]], limit: int) -> JobPage:
    """A page from up to ``limit + 1`` (cursor, job) pairs: the extra one only says that
    another page follows."""
    more = len(found) > limit
    found = found[:limit]
    return JobPage([job for _, job in found], found[-1][0] if more else None)


def counts_from_rows(rows: Iterable[Any]) -> dict[tuple[str, JobState], int]:
    """``Store.counts`` from (provider, state, count) rows."""
    result: dict[tuple[str, JobState], int] = {}
    for provider, state, n in rows:
        try:
            result[provider, JobState(state)] = int(n)
        except ValueError:  # no cause: as in ``parse_state``
            raise StoreError(f"{n} job(s) of {provider} have the unknown state {state!r}") from None
    return result


# --- payloads ---------------------------------------------------------------------------


def encode_payload(payload: Mapping[str, Any] | None, source: str) -> bytes | None:
    if payload is None:
        return None
    try:
        # ``default`` covers read-only mappings (MappingProxyType) that orjson refuses.
        return orjson.dumps(payload, default=_plain_mapping)
    except orjson.JSONEncodeError as exc:
        raise JobsFileError(f"{source}: payload cannot be stored as JSON: {exc}") from exc


def _plain_mapping(obj: object) -> dict[Any, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON")


def decode_payload(job: str, row: tuple[Any, ...] | None) -> Mapping[str, Any] | None:
    """``Store.load_payload`` from the (payload,) row of job ``job`` (None: no such job)."""
    if row is None:
        raise StoreError("is not in the job store", job=job)
    if row[0] is None:
        return None
    payload: Mapping[str, Any] = orjson.loads(row[0])
    return payload


def same_payload(stored: bytes | None, new: bytes | None) -> bool:
    # Stored bytes keep the line's key order; "the same payload" must not depend on it, but
    # must still tell 1 from 1.0 and true from 1, which comparing Python values would not.
    if stored is None or new is None:
        return stored is new
    if stored == new:
        return True
    canonical = orjson.OPT_SORT_KEYS
    return orjson.dumps(orjson.loads(stored), option=canonical) == orjson.dumps(
        orjson.loads(new), option=canonical
    )


# --- why a job write was refused ------------------------------------------------------------


def refused_write(base_version: int, stored: tuple[int, str | None] | None, me: str | None) -> str:
    """Why a write based on ``base_version`` matched no row, given the row's (version, owner)
    as stored now (None: it is gone) and the replica ``me`` that wrote (None: not joined)."""
    if stored is None:
        return "is no longer in the job store"
    version, owner = stored
    if me is not None and owner != me and version == base_version:
        holder = f"replica {owner}" if owner else "no replica"
        return (
            f"is held by {holder}, not by this one ({me}): its lease was taken over or given"
            " up; nothing written"
        )
    return (
        f"was changed by another process or task (stored version {version},"
        f" this write was based on {base_version}); nothing written"
    )


def taken_id_problem(job: Job, holders: Mapping[str, str | None], exc: Exception) -> str:
    """Why a write broke a unique index: ``holders`` maps each of ``ID_COLUMNS`` to the key
    of another job holding this job's value there (None: nobody)."""
    for column, name in ID_COLUMNS:
        holder = holders.get(column)
        if holder is not None:
            value = getattr(job, column)
            return f"{name} {value!r} already belongs to {job.provider}/{holder}"
    return f"refused by the job table: {exc}"
