"""What goes over the wire, as plain data: a request to send and the answer that came back.

Adapters (``harvester.providers``) build ``RequestSpec``s and parse ``Response``s without
touching a socket; the transport, auth and downloads send specs and return responses without
knowing any adapter. Both sides import these types from here, so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from harvester.errors import ProtocolError


@dataclass(frozen=True, slots=True)
class RequestSpec:
    method: str
    url: str
    endpoint: str  #: a short name for logs and metrics: "create", "poll", "find", ...
    params: Mapping[str, str] = field(default_factory=dict)
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    #: safe to send twice; only idempotent requests are retried automatically
    idempotent: bool = True
    #: False for signed URLs on storage hosts: no auth header may go there
    send_credentials: bool = True
    follow_redirects: bool = False
    #: an ``application/x-www-form-urlencoded`` body (OAuth token requests) instead of
    #: ``json``; kept out of ``repr`` because it carries a client secret
    form: Mapping[str, str] | None = field(default=None, repr=False)
    #: a response header by which the provider marks a failed request as safe to send again
    #: (value ``true``), even a create: the transport then retries it like an idempotent one
    retry_header: str | None = None


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: Mapping[str, str]  #: case-insensitive mapping
    body: bytes
    url: str  #: without query string (safe to log)
    request_id: str | None = None

    def json(self, *, provider: str | None = None, job: str | None = None) -> Any:
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            snippet = self.body[:120].decode("utf-8", "replace")
            raise ProtocolError(
                f"answer to {self.url} is not JSON: {snippet!r}",
                provider=provider,
                job=job,
                status=self.status,
                request_id=self.request_id,
            ) from exc


#: returns a fresh signed URL each time it is called (re-resolution after expiry)
Resolver = Callable[[], Awaitable[str]]


def snippet(body: bytes, limit: int = 200) -> str:
    """The start of a body, for error messages (bodies can be huge or binary)."""
    return body[:limit].decode("utf-8", "replace").strip()
