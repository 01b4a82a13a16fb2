"""Sending requests: one exchange per provider (an aiohttp session), its limiter, auth, retries.

One request goes: gate + token + slot (``ProviderLimiter``) -> auth headers -> one HTTP
exchange (``harvester.exchange``: the only part a test swaps) -> classify. Foreign exceptions
(aiohttp, OS, timeouts) are mapped to ``harvester.errors`` here and nowhere else
(``map_exceptions``).

Retries: only specs marked ``idempotent`` are retried automatically. A create POST never is:
the engine records intent first and reconciles a lost answer instead. A 429 (or 503) closes
the provider's gate for every request, in flight or future, until its Retry-After deadline
(or an adaptive, jittered backoff when the provider sends none).

Every answer is bounded: an API answer is read in pieces up to ``max_answer_bytes`` of decoded
body (a gzip bomb inflates a piece at a time, never whole) within ``request_timeout_s`` for the
whole exchange, and no connection goes to a link-local or metadata address (``netguard``).
"""

from __future__ import annotations

import random
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import aiohttp
import orjson

from harvester.auth import Auth, TokenPoster
from harvester.clock import Clock
from harvester.config import ProviderConfig
from harvester.errors import (
    CredentialsError,
    HarvesterError,
    NetworkError,
    NotSent,
    NotYetAvailable,
    ProtocolError,
    ProviderUnavailable,
    RateLimited,
    RetryableError,
)
from harvester.exchange import AiohttpExchange, Answer, Exchange
from harvester.logs import get_logger, redact_text
from harvester.metrics import Metrics
from harvester.netguard import RefusedAddress, url_reason
from harvester.ratelimit import ProviderLimiter, backoff_delay, parse_retry_after
from harvester.statuses import Rule, error_for_status, is_transient
from harvester.wire import RequestSpec, Response

T = TypeVar("T")
log = get_logger("harvester.transport")
_REQUEST_ID_HEADERS = ("x-request-id", "x-amz-request-id", "request-id", "x-ms-request-id")
_MAX_REDIRECTS = 5
_LIFT = " (only providers.%s.allow_link_local = true lets harvester connect there)"
#: decoded bytes asked of the body per read: what one gzip step may inflate to at most
_READ_BYTES = 1 << 16
#: an answer the provider marked safe to resend (its status is in the error's text anyway)
_MARKED: Rule = (ProviderUnavailable, "marked safe to retry on {endpoint}: {message}")


def safe_url(url: str) -> str:
    """The URL without its query string: what may appear in logs and errors."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


class map_exceptions:
    """Turn aiohttp/OS/timeouts into ``NetworkError``: the single mapping boundary. It wraps
    the HTTP exchange only (sending, and each read of a body): code of the caller's that runs
    between reads (writing what it read to a disk, uploading it elsewhere) is outside it, so
    its own errors are never taken for the network's.

    A plain class rather than an ``asynccontextmanager``: it wraps every request, and the
    generator version was measurable CPU at thousands of polls per second.
    """

    __slots__ = ("_job", "_provider", "_url")

    def __init__(self, provider: str, url: str, *, job: str | None = None) -> None:
        self._provider = provider
        self._url = url
        self._job = job

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or isinstance(exc, HarvesterError):
            return
        if isinstance(exc, (TimeoutError, aiohttp.ClientError, ssl.SSLError, OSError)):
            # The URL is made safe only here: on the happy path this costs nothing per request.
            # The cause is kept: its text may hold the full (signed) URL, so the log pipeline
            # redacts rendered tracebacks (``logs.configure``) as it does every other field.
            raise _mapped(exc, self._provider, safe_url(self._url), self._job) from exc


class StreamedAnswer:
    """An answer whose body the caller reads itself (``Transport.open_stream``): an
    ``exchange.Answer`` whose every read is inside the mapping, and nothing else the caller
    does is."""

    __slots__ = ("_guard", "_resp", "content", "content_length", "headers", "status")

    def __init__(self, resp: Answer, guard: map_exceptions) -> None:
        self._resp = resp
        self._guard = guard
        self.status = resp.status
        self.headers = resp.headers
        self.content_length = resp.content_length
        self.content = self

    async def read(self, n: int = -1) -> bytes:
        async with self._guard:
            return await self._resp.content.read(n)


def _mapped(exc: BaseException, provider: str, where: str, job: str | None) -> HarvesterError:
    """The ``NetworkError`` for a foreign exception, most specific match first."""
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, RefusedAddress):
        return ProtocolError(
            f"refusing to connect to {where}: {exc.os_error}{_LIFT % provider}",
            provider=provider,
            job=job,
        )
    if isinstance(exc, TimeoutError):
        text = f"timed out talking to {where}"
    elif isinstance(exc, aiohttp.ClientPayloadError):
        text = f"body from {where} cut short: {_exc_text(exc)}"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        text = f"cannot connect to {where}: {_exc_text(exc)}"
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        text = f"{where} closed the connection without answering"
    else:
        text = f"network error with {where}: {type(exc).__name__}: {_exc_text(exc)}"
    return NetworkError(text, provider=provider, job=job)


def _exc_text(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # some aiohttp errors cannot render themselves when half-built
        text = type(exc).__name__
    return redact_text(text)[:300]


class Transport:
    """All HTTP to one provider: its API (with auth) and its signed-URL hosts (without)."""

    def __init__(
        self,
        cfg: ProviderConfig,
        *,
        auth: Auth | None = None,
        credentials: Callable[[TokenPoster], Auth] | None = None,
        limiter: ProviderLimiter,
        clock: Clock,
        metrics: Metrics,
        rng: random.Random | None = None,
        exchange: Exchange | None = None,
    ) -> None:
        self.cfg = cfg
        #: what carries the bytes (the real network unless a test or simulator gives another)
        self.exchange: Exchange = exchange if exchange is not None else AiohttpExchange(cfg)
        self.name = cfg.name
        if (auth is None) == (credentials is None):
            raise TypeError("Transport needs exactly one of auth= and credentials=")
        # OAuth posts its token requests through this transport (its limiter and retries):
        # ``credentials`` builds the Auth around the transport's own sender.
        if credentials is not None:
            auth = credentials(self.post)
        assert auth is not None
        self.auth = auth
        self.limiter = limiter
        self.clock = clock
        self.metrics = metrics
        metrics.watch_gate(cfg.name, limiter.closed_s)
        self.rng = rng or random.Random()
        # Built once: per request they are measurable CPU at thousands of polls per second.
        self._poll_latency = metrics.poll_latency.labels(cfg.name)
        self._request_counters: dict[tuple[str, int], Any] = {}
        self._durations: dict[str, Any] = {}
        self.api_origin = _origin(cfg.base_url)
        # URLs the adapters build start with exactly this; anything else is parsed.
        self._api_prefix = "{}://{}/".format(*self.api_origin)

    async def __aenter__(self) -> Transport:
        await self.exchange.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.exchange.close()

    # -- one exchange -------------------------------------------------------------------
    async def credentials(self, spec: RequestSpec) -> dict[str, str]:
        """The auth headers ``spec`` gets: none off the API's origin or for signed URLs."""
        if spec.send_credentials and self.on_api(spec.url):
            return dict(await self.auth.headers())
        return {}

    def on_api(self, url: str) -> bool:
        """Whether ``url`` is on the API's origin (scheme, host and port)."""
        return url.startswith(self._api_prefix) or _origin(url) == self.api_origin

    async def send(
        self, spec: RequestSpec, *, job: str | None = None, auth: Mapping[str, str] | None = None
    ) -> Response:
        """One request through the limiter; raises for 429/5xx/network, returns the rest."""
        # Credentials first, outside the slot: an OAuth refresh is itself a request that
        # needs a slot, and must not wait behind requests that are waiting for it.
        if auth is None:
            auth = await self.credentials(spec)
        async with self.limiter.slot():
            return await self._exchange(spec, auth, job=job)

    async def _exchange(
        self, spec: RequestSpec, auth: Mapping[str, str], *, job: str | None
    ) -> Response:
        url, method = spec.url, spec.method
        params: Mapping[str, str] | None = spec.params or None
        content_type: str | None = None
        body: bytes | None = None
        if spec.form is not None:
            body = urlencode(spec.form).encode()  # never logged: it may hold a client secret
            content_type = "application/x-www-form-urlencoded"
        elif spec.json is not None:
            body = orjson.dumps(spec.json)
            content_type = "application/json"
        with_credentials = bool(auth)
        cap = self.cfg.max_answer_bytes
        for _hop in range(_MAX_REDIRECTS + 1):
            if not url.startswith(self._api_prefix):
                self.check_target(url, job=job)
            headers = dict(spec.headers)
            if content_type is not None:
                headers.setdefault("Content-Type", content_type)
            if with_credentials:
                headers.update(auth)
            start = self.clock.monotonic()
            async with (
                map_exceptions(self.name, url, job=job),
                self.exchange.request(
                    method, url, params=params, body=body, headers=headers
                ) as resp,
            ):
                payload = await _read_at_most(resp, cap)
                status = resp.status
                rheaders = resp.headers
            # params travel separately, so ``url`` is what was asked for, without its query
            real_url = url
            self._observe(spec.endpoint, self.clock.monotonic() - start)
            self._count(spec.endpoint, status)
            request_id = next((rheaders[h] for h in _REQUEST_ID_HEADERS if h in rheaders), None)
            if payload is None:
                # Not retried: the same request would get the same endless or inflating body.
                raise ProtocolError(
                    f"{spec.endpoint}: answer from {safe_url(real_url)} is larger than {cap}"
                    f" bytes decoded (providers.{self.name}.max_answer_bytes)",
                    provider=self.name,
                    job=job,
                    status=status,
                    request_id=request_id,
                )
            shown = real_url if "?" not in real_url else safe_url(real_url)
            response = Response(status, rheaders, payload, shown, request_id)
            if spec.follow_redirects and status in (301, 302, 303, 307, 308):
                location = rheaders.get("Location")
                if location:
                    url = urljoin(real_url, location)
                    params = None
                    # Credentials never follow a redirect off the API's origin.
                    with_credentials = with_credentials and self.on_api(url)
                    if status == 303:
                        method, body = "GET", None
                    continue
            self._classify(response, spec, job)
            return response
        raise NetworkError(f"too many redirects from {safe_url(spec.url)}", provider=self.name)

    def _classify(self, resp: Response, spec: RequestSpec, job: str | None) -> None:
        """Raise the shared table's error for a transient answer (429, 5xx) or one the
        provider marked safe to resend; anything else is the adapter's to read."""
        status = resp.status
        # A 401 is left to the auth refresh; anything else the provider marked may be sent
        # again, a create included, as the provider's own SDKs do.
        marked = status >= 400 and status != 401 and _marked_retryable(resp, spec)
        if not (marked or is_transient(status)):
            return
        if status == 429:
            self.metrics.rate_limited.labels(self.name).inc()
        # Only these name a deadline; a 500's Retry-After (if any) is backoff's to ignore.
        timed = marked or status in (429, 503)
        raise error_for_status(
            status,
            _body_hint(resp.body) or "no body",
            endpoint=spec.endpoint,
            own={status: _MARKED} if marked and status != 429 else None,
            retry_after=(
                parse_retry_after(resp.headers.get("Retry-After"), now_wall=self.clock.wall())
                if timed
                else None
            ),
            resend_safe=marked,
            provider=self.name,
            job=job,
            request_id=resp.request_id,
        )

    def _observe(self, endpoint: str, seconds: float) -> None:
        histogram = self._durations.get(endpoint)
        if histogram is None:
            histogram = self.metrics.request_duration.labels(self.name, endpoint)
            self._durations[endpoint] = histogram
        histogram.observe(seconds)
        if endpoint == "poll":
            self._poll_latency.observe(seconds)

    def _count(self, endpoint: str, status: int) -> None:
        counter = self._request_counters.get((endpoint, status))
        if counter is None:
            counter = self.metrics.requests.labels(self.name, endpoint, str(status))
            self._request_counters[(endpoint, status)] = counter
        counter.inc()

    # -- with retries -------------------------------------------------------------------
    async def post(self, spec: RequestSpec) -> Response:
        """``call`` returning the answer as it came (a ``TokenPoster``: OAuth token requests)."""
        return await self.call(spec, _identity)

    async def call(
        self,
        spec: RequestSpec,
        parse: Callable[[Response], T],
        *,
        job: str | None = None,
    ) -> T:
        """Send ``spec`` and parse the answer, retrying transient failures when allowed.

        Auth: a 401 lets the auth refresh once (OAuth) before the error stands.
        """
        attempts = self.cfg.max_retries + 1
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            try:
                auth = await self.credentials(spec)
                resp = await self.send(spec, job=job, auth=auth)
                if resp.status == 401 and auth and not refreshed:
                    refreshed = True
                    if await self.auth.unauthorized(auth):
                        attempt -= 1
                        continue
                result = parse(resp)
            except (NotYetAvailable, NotSent):
                raise  # asked too early, or stopping: the caller decides what comes next
            except RetryableError as exc:
                self._on_retryable(exc)
                # Only what is safe to send twice is sent again: idempotent requests, and any
                # request the provider marked as not carried out.
                if attempt >= attempts or not (spec.idempotent or exc.resend_safe):
                    raise
                self.metrics.retries.labels(self.name, spec.endpoint).inc()
                delay = self._retry_delay(exc, attempt)
                log.info(
                    "retrying",
                    provider=self.name,
                    endpoint=spec.endpoint,
                    job=job,
                    attempt=f"#{attempt + 1}/{attempts}",
                    error=str(exc),
                    delay_s=round(delay, 3),
                )
                if delay > 0:
                    await self.limiter.pause_until(self.clock.monotonic() + delay)
                continue
            except CredentialsError:
                raise
            self.limiter.note_success()
            return result

    def _on_retryable(self, exc: RetryableError) -> None:
        if isinstance(exc, RateLimited) or (
            isinstance(exc, ProviderUnavailable) and exc.status == 503
        ):
            deadline = self.limiter.close_gate(exc.retry_after, status=exc.status)
            log.warning(
                "gate closed",
                provider=self.name,
                status=exc.status,
                retry_after=exc.retry_after,
                closed_for_s=round(max(0.0, deadline - self.clock.monotonic()), 3),
            )

    def _retry_delay(self, exc: RetryableError, attempt: int) -> float:
        if isinstance(exc, RateLimited) or exc.status == 503:
            return 0.0  # the gate already holds every request until its deadline
        return backoff_delay(
            attempt - 1, base=self.cfg.backoff_base_s, cap=self.cfg.backoff_max_s, rng=self.rng
        )

    def check_target(self, url: str, *, job: str | None) -> None:
        """Refuse, before connecting, a URL harvester must not fetch (``netguard``)."""
        reason = url_reason(url, allow_link_local=self.cfg.allow_link_local)
        if reason is not None:
            lift = "" if reason.startswith("not an") else _LIFT % self.name
            raise ProtocolError(
                f"refusing to fetch {safe_url(url)}: {reason}{lift}",
                provider=self.name,
                job=job,
            )

    # -- signed URLs --------------------------------------------------------------------
    @asynccontextmanager
    async def open_stream(
        self, url: str, *, offset: int = 0, end: int | None = None, job: str | None = None
    ) -> AsyncIterator[StreamedAnswer]:
        """GET a signed URL with no credentials, for streaming (caller checks status and
        reads the body under its own size cap and deadline: ``download.stream_into``); from
        byte ``offset`` up to ``end`` (exclusive) when given."""
        self.check_target(url, job=job)
        headers = {}
        if offset or end is not None:
            headers["Range"] = f"bytes={offset}-{'' if end is None else end - 1}"
        start = self.clock.monotonic()
        guard = map_exceptions(self.name, url, job=job)
        # The exchange bounds the gap between chunks; the whole body's deadline is the
        # reader's. Entered and left by hand: the mapping covers those two steps and each
        # read, never the caller's block in between.
        stream = self.exchange.stream(url, headers=headers)
        async with guard:
            resp = await stream.__aenter__()
        failed: BaseException | None = None
        try:
            self.metrics.requests.labels(self.name, "download", str(resp.status)).inc()
            yield StreamedAnswer(resp, guard)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            async with guard:
                await stream.__aexit__(
                    type(failed) if failed else None,
                    failed,
                    failed.__traceback__ if failed else None,
                )
        self._observe("download", self.clock.monotonic() - start)  # the whole body streamed


async def _read_at_most(resp: Answer, limit: int) -> bytes | None:
    """The decoded body, or None as soon as it is known to exceed ``limit`` bytes.

    Read in bounded pieces: ``resp.read()`` would lift aiohttp's per-step decompression limit
    and inflate a gzip bomb whole before anything could look at its size.
    """
    declared = resp.content_length
    if declared is not None and declared > limit and "Content-Encoding" not in resp.headers:
        return None
    parts: list[bytes] = []
    size = 0
    content = resp.content
    while chunk := await content.read(_READ_BYTES):
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return (parts.scheme.lower(), parts.netloc.lower())


def _marked_retryable(resp: Response, spec: RequestSpec) -> bool:
    """Whether the answer carries the spec's retry header set to ``true``.

    Cognite's .NET and Rust SDKs retry on the value ``true``; its Python SDK on the header's
    mere presence. The stricter reading is the one that never re-sends a create on a doubt.
    """
    if spec.retry_header is None:
        return False
    return resp.headers.get(spec.retry_header, "").strip().lower() == "true"


def _body_hint(body: bytes) -> str:
    return redact_text(body[:256].decode("utf-8", "replace").strip())


def _identity(resp: Response) -> Response:
    return resp
