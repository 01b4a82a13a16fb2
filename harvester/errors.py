"""The exception tree of harvester.

Every error harvester raises on purpose is a ``HarvesterError``; its ``str()`` is the one
line a user sees (where it came from: file:line, provider, job, request id).

    HarvesterError
    ├── FatalError              stops the process (exit 2): nothing can progress
    │   ├── ConfigError         bad or unreadable config, missing secret
    │   ├── JobsFileError       a bad line in a jobs file (nothing from that file is added)
    │   ├── CredentialsError    the provider refused our credentials
    │   └── StoreError          the job table is unreadable or inconsistent
    ├── JobError                terminal for one job; stored as its failure reason
    │   ├── ProviderJobFailed   the provider says the job failed or was rejected
    │   ├── InvalidPayload      the job's payload can never be accepted
    │   ├── ProtocolError       the provider answered something we cannot understand
    │   └── DecodeError         a result file is malformed (names job, frame, byte offset)
    ├── OutputError             output.dir cannot be written (missing, a file, read-only,
    │                           full, a symlink): never the job's or the provider's fault
    ├── RetryableError          try again later; carries ``retry_after`` when known
    │   ├── NetworkError        connection reset, timeout, truncated body
    │   ├── RateLimited         429 (or a provider's equivalent)
    │   ├── ProviderUnavailable 5xx and provider-side transient error codes
    │   ├── NotYetAvailable     a finished job's results are not published yet
    │   ├── CorruptDownload     a body's size or MD5 is not what its listing announced
    │   └── NotSent             stopping: a request was dropped before it was sent
    └── IllegalTransition       a state change the job state machine forbids (a bug)

Below the tree, five exceptions that are not ``HarvesterError``s, each raised and caught
inside one module and turned into one of the above (or an answer) there: ``JobsLineError``,
``BadBody``, ``CreateProblem``, ``FailpointSpecError`` and ``RefusedAddress`` (an ``OSError``:
aiohttp carries it out of its resolver). No exception class is defined anywhere else
(``tests/unit/test_errors_home.py``).

Foreign exceptions are mapped to this tree in exactly two places: the network's (aiohttp,
sockets, timeouts) in ``harvester.transport``, the output disk's (``OSError`` while writing
under ``output.dir``) in ``harvester.fsutil``.

A reason stored for a job is one short line (``brief``): errors name what went wrong, never
the document it was found in (that goes to the debug log).
"""

from __future__ import annotations

#: the longest reason stored for a job (``brief``)
REASON_MAX = 400


def brief(text: str, limit: int = REASON_MAX) -> str:
    """``text`` as one line of at most ``limit`` characters: stored reasons stay readable
    whatever a provider put in a message."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


class HarvesterError(Exception):
    """Base of every error harvester raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        job: str | None = None,
        request_id: str | None = None,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.job = job
        self.request_id = request_id
        self.status = status
        self.code = code

    def __str__(self) -> str:
        where = []
        if self.provider:
            where.append(self.provider)
        if self.job:
            where.append(f"job {self.job}")
        prefix = " ".join(where)
        detail = []
        if self.status is not None:
            detail.append(f"HTTP {self.status}")
        if self.code:
            detail.append(f"code {self.code}")
        if self.request_id:
            detail.append(f"request id {self.request_id}")
        text = f"{prefix}: {self.message}" if prefix else self.message
        return f"{text} ({', '.join(detail)})" if detail else text


class FatalError(HarvesterError):
    """Nothing can progress until a person fixes something; the process stops."""


class ConfigError(FatalError):
    """The config file (or a secret it references) is missing, unreadable or invalid."""


class JobsFileError(FatalError):
    """A jobs file line is invalid; message starts with ``file:line:``."""


class CredentialsError(FatalError):
    """The provider rejected our credentials (401/403 on its API)."""


class StoreError(FatalError):
    """The durable job table cannot be opened, is inconsistent, or refused a write; the two
    subclasses below tell a lost write from a broken store (``except StoreError`` catches
    both)."""


class StaleWrite(StoreError):
    """One write refused because the row is not as its writer saw it: another version, another
    replica's lease, a remote id already taken. The store is fine; nothing was written."""


class StoreUnavailable(StoreError):
    """The store cannot be used right now: closed or not open, unreachable, locked too long,
    an I/O or driver error. Nothing of the failed call is written."""


class JobError(HarvesterError):
    """Terminal for one job: the message becomes the job's stored failure reason."""


class ProviderJobFailed(JobError):
    """The provider reports the job failed, was cancelled or was rejected."""


class InvalidPayload(JobError):
    """The payload can never be accepted (ours or the provider's validation)."""


class ProtocolError(JobError):
    """The provider answered with a body we cannot understand."""


class RangeIgnored(ProtocolError):
    """Storage answered a ranged request for part of a file with the whole file (200): the
    file is fetched again in one piece instead (``harvest.FileParts``)."""


class DecodeError(JobError):
    """A result file is malformed; names the frame and byte offset when known."""

    def __init__(self, message: str, *, offset: int | None = None, **kw: object) -> None:
        if offset is not None:
            message = f"{message} at byte {offset}"
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.offset = offset


class ControlError(HarvesterError):
    """A cancel or retry that cannot be done (unknown job, wrong state, refused by the
    provider): one line naming the job; nothing stored was changed."""


class OutputError(HarvesterError):
    """Writing under ``output.dir`` failed: the disk is full or read-only, the folder is a
    file... Nothing is wrong with the job, so it is not charged an attempt: ``harvest``
    stops (exit 2) and the daemon pauses its harvests (not ready) until a write works again.
    """

    def __init__(self, message: str, *, errno: int | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.errno = errno


class RetryableError(HarvesterError):
    """Transient: the same request may succeed later. ``retry_after`` in seconds if known."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        resend_safe: bool = False,
        **kw: object,
    ) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after
        #: the provider said the request was not carried out and may be sent again, even a
        #: create (Cognite's ``cdf-is-auto-retryable: true``)
        self.resend_safe = resend_safe


class NetworkError(RetryableError):
    """Connection refused/reset, timeout, or a body shorter than announced."""


class RateLimited(RetryableError):
    """The provider said slow down (429, or a rate-limit error code)."""


class ProviderUnavailable(RetryableError):
    """The provider failed on its side (5xx, or a documented server-side error code)."""


class StorageRefused(ProviderUnavailable):
    """The storage host refused several freshly signed URLs in a row."""


class RetryableErrorInHarvest(RetryableError):
    """The provider's job changed under us between finishing and harvesting."""


class NotYetAvailable(RetryableError):
    """Asked too early (e.g. Modzy's results 404 right after a job finishes): not a fault,
    so it spends neither request retries nor the job's harvest attempts."""


class CorruptDownload(RetryableError):
    """A downloaded body differs from what storage listed for it (Content-Length, Content-MD5):
    damaged on the way, or replaced meanwhile. Fetched again on the job's next attempt."""


class NotSent(RetryableError):
    """The process is stopping: a request still waiting (for the limiter's gate, a token, a
    slot or a retry's backoff) was dropped without being sent. Nothing reached the provider,
    so the job is left as stored for the next run; it spends no attempt."""


class IllegalTransition(HarvesterError):
    """A state change the job state machine forbids; the job is left unchanged."""

    def __init__(self, job: str, state: str, event: str) -> None:
        super().__init__(f"event {event!r} is not allowed in state {state!r}", job=job)
        self.state = state
        self.event = event


# -- not HarvesterErrors: each is caught in its own module and becomes one of the above -----


class JobsLineError(Exception):
    """One line of a jobs file (or of a POST /jobs body) is invalid; the reader adds where
    (``JobsFileError``, or the API's per-line error list)."""


class BadBody(Exception):
    """A body that opens a JSON array but is not one (or is not UTF-8): no job is looked at."""


class CreateProblem(ValueError):
    """One thing wrong with a Bentley create body: where (``target``, a dotted path) and what;
    the adapter makes it an ``InvalidPayload``."""

    def __init__(self, target: str, message: str) -> None:
        super().__init__(f"{target}: {message}" if target else message)
        self.target = target
        self.message = message


class FailpointSpecError(ValueError):
    """``HARVESTER_FAILPOINTS`` names an unknown point or action."""


class RefusedAddress(OSError):
    """Raised by ``netguard.GuardedResolver``: every address of a host is one we do not
    connect to. An ``OSError`` so that aiohttp wraps it (``ClientConnectorError.os_error``),
    where the transport finds it and says why."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"{host} resolves only to {reason}")
        self.host = host
        self.reason = reason
