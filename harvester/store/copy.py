"""Copying a job table into another store: the way from one sqlite process to replicas.

The copy is exact: states, remote ids, attempts, versions, reasons, payloads and the meta
values (a Playment batch id, say) arrive as they were, so a job that was ``submitting`` is
reconciled by the new store's harvester, never created twice. The target must be empty and is
written in one transaction (all or nothing). The source is then marked as moved, and every
later attempt to open it (``harvest``, ``run``, ``status``...) is refused with the new
store's address, so two stores never both drive the same remote jobs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from harvester.jobs import JobState
from harvester.store.base import MOVED_META, Store


@dataclass(frozen=True, slots=True)
class CopyResult:
    jobs: int
    meta: int
    by_state: dict[tuple[str, JobState], int]


async def copy_store(source: Store, target: Store, *, target_name: str) -> CopyResult:
    """Copy everything in ``source`` into the empty ``target``, then mark ``source`` moved.

    ``target_name`` is what the refusal message on the old store will point to: a path or a
    URL without password.
    """
    jobs, meta = await source.dump()
    await target.restore(jobs, meta)
    # Only once the copy is committed: a failed copy leaves the old store usable as it was.
    await source.set_meta(MOVED_META, target_name)
    by_state = Counter((job.provider, job.state) for job, _ in jobs)
    return CopyResult(jobs=len(jobs), meta=len(meta), by_state=dict(by_state))
