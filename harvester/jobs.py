"""The job model and its state machine (pure: no I/O, no clock of its own).

Rules of this file:
- every legal move is one entry in ``TRANSITIONS`` (state -> event -> next state);
- ``apply`` returns a new ``Job`` or raises ``IllegalTransition`` and leaves the job untouched;
- terminal states are derived from the table (states with no way out), never listed twice.

A job's life: ``new -> submitting -> running -> succeeded -> harvesting -> harvested``, with
``failed`` / ``cancelled`` (the provider's verdict) and ``error`` (ours: invalid payload, a
result we cannot decode, a create answer lost where nothing can find the job).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from harvester.errors import IllegalTransition


class JobState(StrEnum):
    NEW = "new"  #: known to us only; nothing sent yet (or proven never to have arrived)
    SUBMITTING = "submitting"  #: intent recorded; the create POST may or may not have landed
    RUNNING = "running"  #: the provider has it (we know its remote id); being polled
    SUCCEEDED = "succeeded"  #: the provider finished it; results not on disk yet
    HARVESTING = "harvesting"  #: downloading/decoding; a restart simply harvests again
    HARVESTED = "harvested"  #: every output file is on disk with its manifest
    FAILED = "failed"  #: the provider says it failed
    CANCELLED = "cancelled"  #: the provider says it was cancelled
    ERROR = "error"  #: we gave up on it; ``reason`` says why


class Event(StrEnum):
    SUBMIT = "submit"  #: record intent, then POST
    TRACK = "track"  #: a jobs-file line that names an existing remote job
    ACCEPTED = "accepted"  #: the create answer arrived with the remote id
    FOUND_REMOTE = "found_remote"  #: reconciliation found the job the provider already has
    NOT_FOUND_REMOTE = "not_found_remote"  #: reconciliation proved the create never landed
    COMPLETED = "completed"  #: the provider reports success
    PROVIDER_FAILED = "provider_failed"  #: the provider reports failure
    PROVIDER_CANCELLED = "provider_cancelled"  #: the provider reports cancellation
    HARVEST = "harvest"  #: start writing outputs
    HARVESTED = "harvested"  #: every output written and the manifest renamed into place
    HARVEST_RETRY = "harvest_retry"  #: a transient failure while harvesting: try again later
    GIVE_UP = "give_up"  #: terminal on our side; reason required
    CANCEL = "cancel"  #: a user cancelled it (at the provider when its API can)
    RETRY_SUBMIT = "retry_submit"  #: an error job never created remotely: create it again
    RETRY_RECONCILE = "retry_reconcile"  #: an error job whose create may have landed: look first
    RETRY_POLL = "retry_poll"  #: an error job with a remote id: poll (and harvest) it again
    RESUBMIT = "resubmit"  #: a failed/cancelled remote job: a new remote attempt, on request


_S = JobState
_E = Event

TRANSITIONS: Mapping[JobState, Mapping[Event, JobState]] = {
    _S.NEW: {
        _E.SUBMIT: _S.SUBMITTING,
        _E.TRACK: _S.RUNNING,
        _E.GIVE_UP: _S.ERROR,
        _E.CANCEL: _S.CANCELLED,
    },
    _S.SUBMITTING: {
        _E.ACCEPTED: _S.RUNNING,
        _E.FOUND_REMOTE: _S.RUNNING,
        _E.NOT_FOUND_REMOTE: _S.NEW,
        _E.GIVE_UP: _S.ERROR,
    },
    _S.RUNNING: {
        _E.COMPLETED: _S.SUCCEEDED,
        _E.PROVIDER_FAILED: _S.FAILED,
        _E.PROVIDER_CANCELLED: _S.CANCELLED,
        _E.GIVE_UP: _S.ERROR,
        _E.CANCEL: _S.CANCELLED,
    },
    _S.SUCCEEDED: {_E.HARVEST: _S.HARVESTING, _E.GIVE_UP: _S.ERROR},
    _S.HARVESTING: {
        _E.HARVESTED: _S.HARVESTED,
        _E.HARVEST_RETRY: _S.SUCCEEDED,
        _E.GIVE_UP: _S.ERROR,
    },
    _S.HARVESTED: {},
    _S.FAILED: {_E.RESUBMIT: _S.NEW},
    _S.CANCELLED: {_E.RESUBMIT: _S.NEW},
    _S.ERROR: {
        _E.RETRY_SUBMIT: _S.NEW,
        _E.RETRY_RECONCILE: _S.SUBMITTING,
        _E.RETRY_POLL: _S.RUNNING,
    },
}

#: events only a user's request makes (``harvester retry``): the engine never sends them, so
#: the states they leave still end a run
RESTARTS = frozenset({_E.RESUBMIT, _E.RETRY_SUBMIT, _E.RETRY_RECONCILE, _E.RETRY_POLL})
TERMINAL: frozenset[JobState] = frozenset(
    s for s, moves in TRANSITIONS.items() if not set(moves) - RESTARTS
)
#: terminal states that count as "not harvested" for the exit code
UNSUCCESSFUL: frozenset[JobState] = TERMINAL - {JobState.HARVESTED}
ACTIVE: frozenset[JobState] = frozenset(JobState) - TERMINAL

# Events whose target state needs a remote id / a reason; checked in ``apply`` so an
# inconsistent job can never be produced.
_NEEDS_REMOTE_ID = {_E.TRACK, _E.ACCEPTED, _E.FOUND_REMOTE}
_NEEDS_REASON = {_E.GIVE_UP, _E.PROVIDER_FAILED, _E.PROVIDER_CANCELLED, _E.CANCEL}
_NEEDS_OUTPUT = {_E.HARVESTED}
# "Cancelled by us" and "cancelled by the provider" are one state (neither is retried without
# --resubmit, both end a run) told apart in ``Job.cancelled_by`` for the user.
_CANCELLED_BY = {_E.CANCEL: "user", _E.PROVIDER_CANCELLED: "provider"}


@dataclass(frozen=True, slots=True)
class Job:
    """One job as the store holds it. The create payload lives in the store, not here, so
    100,000 tracked jobs stay small in memory (``Store.load_payload``)."""

    provider: str
    key: str  #: safe single path component, unique per provider
    reference_id: str | None
    remote_id: str | None
    state: JobState
    created_at: float
    updated_at: float
    remote_status: str | None = None  #: the provider's raw status string, kept verbatim
    progress: float | None = None  #: 0..100 when the provider reports it
    reason: str | None = None  #: why the job ended failed/cancelled/error (or last retry)
    attempts: int = 0  #: create POSTs started (incremented with the intent, before the POST)
    due_at: float | None = None  #: wall time of the next action, when scheduled
    output: str | None = None  #: output directory, relative to output.dir, once harvested
    version: int = 0  #: bumped on every write; the store refuses a stale version
    #: ``remote_status`` is outside the provider's documented set (still polled as running)
    status_unknown: bool = False
    #: who ended it ``cancelled``: "user" (harvester cancel) or "provider" (its verdict)
    cancelled_by: str | None = None
    #: remote ids of earlier remote attempts (``harvester retry --resubmit``), oldest first
    past_remote_ids: tuple[str, ...] = ()
    #: wall time the current remote attempt started (submit, track or retry): deadlines
    started_at: float | None = None
    #: wall time a cancel was asked of a job another replica holds; that one carries it out
    cancel_requested_at: float | None = None

    @property
    def remote_attempt(self) -> int:
        """1 for the first remote job, n for the n-th (after n-1 resubmissions)."""
        return len(self.past_remote_ids) + 1

    @property
    def remote_reference(self) -> str | None:
        """The reference id the provider sees: the job's own on the first attempt, suffixed
        ``~n`` on the n-th, so reconciliation by reference id finds this attempt's remote job
        and never an earlier, failed one."""
        if self.reference_id is None or not self.past_remote_ids:
            return self.reference_id
        return f"{self.reference_id}~{self.remote_attempt}"

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def label(self) -> str:
        """How this job is named in messages: provider/key (remote id)."""
        rid = f" (remote {self.remote_id})" if self.remote_id else ""
        return f"{self.provider}/{self.key}{rid}"


def apply(job: Job, event: Event, *, now: float, **changes: Any) -> Job:
    """Return ``job`` after ``event``, or raise ``IllegalTransition`` (job untouched).

    ``changes`` sets other fields at the same time (remote_id, reason, ...); the state,
    version and updated_at are the machine's to set.
    """
    target = TRANSITIONS[job.state].get(event)
    if target is None:
        raise IllegalTransition(job.label, job.state.value, event.value)
    for field in ("state", "version", "updated_at", "provider", "key", "created_at"):
        if field in changes:
            raise ValueError(f"apply() does not take {field!r}")
    if target == JobState.RUNNING and job.state != JobState.RUNNING:
        changes.setdefault("started_at", now)  # the deadline (job_timeout_s) counts from here
    if event in _CANCELLED_BY:
        changes.setdefault("cancelled_by", _CANCELLED_BY[event])
    new = dataclasses.replace(job, state=target, updated_at=now, version=job.version + 1, **changes)
    if event in _NEEDS_REMOTE_ID and not new.remote_id:
        raise ValueError(f"{event.value} needs a remote_id ({job.label})")
    if event in _NEEDS_REASON and not new.reason:
        raise ValueError(f"{event.value} needs a reason ({job.label})")
    if event in _NEEDS_OUTPUT and not new.output:
        raise ValueError(f"{event.value} needs an output folder ({job.label})")
    return new


def update(job: Job, *, now: float, **changes: Any) -> Job:
    """A write that is not a state change (remote status, progress, next due time)."""
    for field in ("state", "version", "updated_at", "provider", "key", "created_at"):
        if field in changes:
            raise ValueError(f"update() does not take {field!r}")
    return dataclasses.replace(job, updated_at=now, version=job.version + 1, **changes)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_KEY = 120


def job_key(name: str) -> str:
    """A safe single path component for a reference id or job id.

    Ids made only of ``[A-Za-z0-9._-]`` (not starting with a dot) stay as they are, so users
    find ``scan-0001/`` where they expect it. Anything else is sanitised and suffixed with
    ``+`` and a hash of the original: two ids that sanitise alike still get different keys,
    and since ``+`` never survives in a kept id, no id can be spelled like another's key.
    """
    if not name:
        raise ValueError("an empty id cannot name a job")
    safe = _UNSAFE.sub("_", name).lstrip(".")
    if safe == name and len(name) <= _MAX_KEY:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{safe[: _MAX_KEY - 13] or 'job'}+{digest}"


def new_job(
    provider: str,
    *,
    reference_id: str | None,
    remote_id: str | None,
    now: float,
) -> Job:
    """The job a jobs-file line describes, before the store has it."""
    name = reference_id if reference_id is not None else remote_id
    if name is None:
        raise ValueError("a job needs a reference_id or a job_id")
    return Job(
        provider=provider,
        key=job_key(name),
        reference_id=reference_id,
        remote_id=remote_id,
        state=JobState.NEW,
        created_at=now,
        updated_at=now,
    )
