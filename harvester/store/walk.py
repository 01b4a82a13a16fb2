"""The add-jobs walk: which lines of a batch are new, which repeat a stored job, and which
conflict with one (the first bad line is named, and then nothing is added).

The rules, in line order:
- a key must be a safe path component, and a job needs a reference id or a remote id;
- a line whose (provider, key) is stored (or came earlier in the batch) with the same
  reference id, remote id and payload is a duplicate: a no-op. A line without a remote id
  does not contradict a stored one (the job was created since the line was first added);
- a new line whose reference id or remote id another job has already is refused.

The walk is sans-I/O: a dialect passes how to look a stored row up (sqlite: one indexed
read each, in its transaction; PostgreSQL: from a few batched reads done beforehand), then
inserts what the walk returns in the same transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from harvester.errors import JobsFileError
from harvester.jobs import JobState
from harvester.store.base import AddResult, NewJob
from harvester.store.rows import encode_payload, safe_key, same_payload

#: a stored job as the walk compares it: (reference_id, remote_id, payload, state)
StoredRow = tuple[str | None, str | None, bytes | None, str]
#: (provider, key) -> the stored row, or None
FindRow = Callable[[str, str], StoredRow | None]
#: (column, provider, value) -> (key, state) of the stored job with that value, or None
FindHolder = Callable[[str, str, str], tuple[str, str] | None]
#: a row to insert: (provider, key, reference_id, remote_id, payload), state new
Insert = tuple[str, str, str | None, str | None, bytes | None]

#: the columns a new job must not share with another, and their name in a jobs file
_UNIQUE = (("reference_id", "reference id"), ("remote_id", "job id"))


@dataclass(frozen=True, slots=True)
class Walked:
    inserts: list[Insert]  #: in line order
    result: AddResult


def walk(jobs: Sequence[NewJob], find_row: FindRow, find_holder: FindHolder) -> Walked:
    """Decide every line of ``jobs``; raise ``JobsFileError`` at the first bad one."""
    inserts: list[Insert] = []
    added: list[str] = []
    duplicates: list[str] = []
    sources: dict[tuple[str, str], str] = {}  # jobs of this batch -> the line that had them
    # What this batch adds, seen by its later lines as if already stored.
    new_rows: dict[tuple[str, str], StoredRow] = {}
    new_holders: dict[tuple[str, str, str], tuple[str, str]] = {}
    for new in jobs:
        label = f"{new.provider}/{new.key}"
        if not safe_key(new.key):
            raise JobsFileError(f"{new.source}: {new.key!r} is not a safe job key")
        if new.reference_id is None and new.remote_id is None:
            raise JobsFileError(f"{new.source}: a job needs a reference_id or a job_id")
        payload = encode_payload(new.payload, new.source)
        where = (new.provider, new.key)
        row = new_rows.get(where) or find_row(*where)
        if row is None:
            for column, name in _UNIQUE:
                value = getattr(new, column)
                if value is None:
                    continue
                at = (column, new.provider, value)
                holder = new_holders.get(at) or find_holder(*at)
                if holder is not None:
                    existing = _describe(new.provider, holder[0], holder[1], sources)
                    raise JobsFileError(
                        f"{new.source}: {name} {value!r} already belongs to {existing}"
                    )
            inserts.append((new.provider, new.key, new.reference_id, new.remote_id, payload))
            new_rows[where] = (new.reference_id, new.remote_id, payload, JobState.NEW.value)
            for column, _ in _UNIQUE:
                if (value := getattr(new, column)) is not None:
                    new_holders[column, new.provider, value] = (new.key, JobState.NEW.value)
            added.append(label)
        elif differs := _differences(row, new, payload):
            existing = _describe(new.provider, new.key, row[3], sources)
            raise JobsFileError(
                f"{new.source}: {label} conflicts with {existing}: {', '.join(differs)}"
            )
        elif where not in sources:
            duplicates.append(label)
        # else: an identical repeat of an earlier line of this batch, counted there
        sources.setdefault(where, new.source)
    return Walked(inserts, AddResult(added=tuple(added), duplicates=tuple(duplicates)))


def _differences(row: StoredRow, new: NewJob, payload: bytes | None) -> list[str]:
    differs = []
    if row[0] != new.reference_id:
        differs.append(f"reference id {row[0]!r} there, {new.reference_id!r} here")
    # A submitted job acquires its remote id later: a line without job_id (the same line
    # added again after the job was created) does not contradict it.
    if new.remote_id is not None and row[1] != new.remote_id:
        differs.append(f"job id {row[1]!r} there, {new.remote_id!r} here")
    if not same_payload(row[2], payload):
        differs.append("different payload")
    return differs


def _describe(provider: str, key: str, state: str, sources: Mapping[tuple[str, str], str]) -> str:
    """Name an existing job for a conflict message: the line that added it, or the store."""
    source = sources.get((provider, key))
    if source is not None:
        return f"{provider}/{key} from {source}"
    return f"the stored job {provider}/{key} (state {state})"


def stored_row(row: Sequence[Any]) -> StoredRow:
    """A (reference_id, remote_id, payload, state) row as the walk takes it."""
    ref, remote, payload, state = row
    return (ref, remote, None if payload is None else bytes(payload), str(state))
