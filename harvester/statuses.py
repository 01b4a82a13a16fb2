"""What an HTTP status (or a provider's own error code) means in harvester's error tree.

One table for every provider's API and the transport: the transport raises what it finds for
429 and 5xx before an adapter sees the answer (so the limiter's gate closes for every
request), and each adapter classifies the rest of its non-2xx answers with the same table,
adding only its own codes: a status that means something else at its API (``own``) or an
error code in its body (``codes``, looked up first).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from harvester.errors import (
    CredentialsError,
    HarvesterError,
    InvalidPayload,
    ProtocolError,
    ProviderJobFailed,
    ProviderUnavailable,
    RateLimited,
)
from harvester.jobs import Job
from harvester.wire import Response, snippet

#: an error class and its message (``{message}``: the provider's own text; ``{endpoint}``: ours)
Rule = tuple[type[HarvesterError], str]

#: reads a provider's error body (parsed JSON, or None when it is none) in the provider's
#: own shape: its code (None when it gives none) and its message ("" when it gives none);
#: None when the body is not in that shape
ErrorReader = Callable[[Any], tuple[str | None, str] | None]

#: what a status means at every provider's API; 5xx not listed are ``SERVER_ERROR``, any
#: other status not listed ``UNEXPECTED``
STATUS_ERRORS: Mapping[int, Rule] = {
    400: (InvalidPayload, "{message}"),
    401: (CredentialsError, "credentials refused: {message}"),
    403: (CredentialsError, "credentials refused: {message}"),
    404: (ProviderJobFailed, "not found: {message}"),
    409: (InvalidPayload, "{message}"),
    422: (InvalidPayload, "{message}"),
    429: (RateLimited, "rate limited on {endpoint}: {message}"),
    503: (ProviderUnavailable, "unavailable on {endpoint}: {message}"),
}
SERVER_ERROR: Rule = (ProviderUnavailable, "server error on {endpoint}: {message}")
UNEXPECTED: Rule = (ProtocolError, "unexpected answer to {endpoint}: {message}")


def is_transient(status: int) -> bool:
    """Whether the table makes ``status`` a ``RetryableError`` (the transport raises these)."""
    return status == 429 or status >= 500


def error_for_status(
    status: int,
    message: str,
    *,
    endpoint: str,
    own: Mapping[int, Rule] | None = None,
    codes: Mapping[str, Rule] | None = None,
    **kw: Any,
) -> HarvesterError:
    """The typed error for a non-2xx answer (or a 2xx one whose body says it failed): the
    body's ``code`` in ``codes``, then ``status`` in ``own`` (the adapter's), then the table.
    ``kw`` goes to the error (``provider``, ``job``, ``code``, ``request_id``; ``retry_after``
    for the retryable classes)."""
    code = kw.get("code")
    found = (codes or {}).get(code) if code is not None else None
    found = found or (own or {}).get(status) or STATUS_ERRORS.get(status)
    if found is None:
        found = SERVER_ERROR if status >= 500 else UNEXPECTED
    cls, text = found
    return cls(text.format(message=message, endpoint=endpoint), status=status, **kw)


def error_from_answer(
    provider: str,
    resp: Response,
    job: Job | None,
    endpoint: str,
    read: ErrorReader,
    own: Mapping[int, Rule] | None = None,
) -> HarvesterError:
    """The typed error for a non-2xx answer: the code and message ``read`` finds in its
    body (a body not in the provider's shape: its first bytes as the message), classified by
    ``error_for_status`` with ``own`` first, keeping the answer's request id."""
    try:
        body = resp.json(provider=provider)
    except ProtocolError:
        body = None
    code, message = read(body) or (None, snippet(resp.body))
    return error_for_status(
        resp.status,
        message or f"HTTP {resp.status} without a message",
        endpoint=endpoint,
        own=own,
        provider=provider,
        job=job.key if job else None,
        code=code,
        request_id=resp.request_id,
    )
