"""Group commit: concurrent job writes share one transaction, each caller still waits for it.

"Persisted before acted on" costs one commit per state change if every writer commits alone
(a few thousand per second). Here whoever finds no commit running becomes the committer and
takes every pending write, its own included; the others wait for that commit and look again.
Each ``write`` returns only once the transaction that carried it has committed, and a write
refused on its own (stale version, taken id, lost lease) fails only its own caller.

The stores supply the one backend-specific part: ``write_batch(writes) -> problems`` (one
problem string or None per write, in order), run as one transaction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio
import anyio.lowlevel

from harvester.errors import StaleWrite, StoreUnavailable
from harvester.jobs import Job

WriteBatch = Callable[[Sequence[tuple[Job, int]]], Awaitable[list[str | None]]]


@dataclass(slots=True, eq=False)  # identity: two writes may carry equal jobs
class _Write:
    """One caller's job write waiting for (or riding in) a group commit."""

    job: Job
    base_version: int
    done: bool = False
    problem: str | None = None  #: why this row was refused (stale version, owner, taken id)
    error: BaseException | None = None  #: why the whole transaction failed


class GroupCommit:
    def __init__(self, write_batch: WriteBatch) -> None:
        self._write_batch = write_batch
        self._pending: list[_Write] = []
        self._flushing = False
        self._flushed = anyio.Event()
        self.commits = 0  #: group commits done (each holds one or more job writes)
        self.writes = 0  #: job writes those commits carried

    @property
    def busy(self) -> bool:
        """Writes are waiting or a commit is running."""
        return bool(self._pending) or self._flushing

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def write(self, new: Job, base: Job) -> Job:
        """Commit ``new`` (if the stored row is still at ``base.version``) and return it."""
        item = _Write(new, base.version)
        self._pending.append(item)
        try:
            while not item.done:
                if self._flushing:
                    await self._flushed.wait()
                else:
                    await self._flush()
        finally:
            if not item.done and item in self._pending:
                # Cancelled before any transaction took it: it is never written.
                self._pending.remove(item)
        if item.error is not None:
            raise StoreUnavailable(f"not committed: {item.error}", job=new.label) from item.error
        if item.problem is not None:
            raise StaleWrite(item.problem, job=new.label)
        return new

    async def drain(self) -> None:
        """Commit everything already asked for (on close)."""
        while self.busy:
            if self._flushing:
                await self._flushed.wait()
            else:
                await self._flush()

    async def _flush(self) -> None:
        self._flushing = True
        batch: list[_Write] = []
        try:
            # Shielded: the batch carries other callers' writes, and they are told the
            # outcome only if this commit runs to its end.
            with anyio.CancelScope(shield=True):
                # One turn of the loop first: the writers the last commit woke up queue their
                # next writes now, rather than all waiting for a commit that carries only ours.
                await anyio.lowlevel.checkpoint()
                batch, self._pending = self._pending, []
                problems = await self._write_batch([(w.job, w.base_version) for w in batch])
        except BaseException as exc:
            # Every writer of the batch hears that it failed, even when this task's own
            # exception (KeyboardInterrupt, say) is not theirs to see; none may think it
            # committed.
            for w in batch:
                w.error = exc
            if not isinstance(exc, Exception):
                raise
        else:
            self.commits += 1
            self.writes += len(batch)
            for w, problem in zip(batch, problems, strict=True):
                w.problem = problem
        finally:
            for w in batch:
                w.done = True
            self._flushing = False
            flushed, self._flushed = self._flushed, anyio.Event()
            flushed.set()
