"""The signed-URL storage host: a separate port that behaves like a private S3 bucket (and,
under ``/bentley/``, like Azure blob containers: see ``azure``).

Objects are only reachable through a presigned URL; an unsigned, forged or expired one gets S3's
403 XML. A request carrying an API key or ``Authorization`` header is the client leaking
credentials to a third-party host: it is recorded (header name and path, never the value) and
refused as S3 refuses a second auth mechanism.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from aiohttp import web

from harvester.emulator.middleware import TRUNCATE_KEY, drop_connection, provider_middlewares
from harvester.emulator.objects import ObjectStore, StoredObject
from harvester.emulator.responses import s3_error
from harvester.emulator.signing import Signer, Verdict
from harvester.emulator.state import EmulatorState

_CREDENTIAL_HEADERS = ("authorization", "x-api-key")


StorageHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class StorageHost:
    """The store, the signer and the counters of URLs handed out by attachment APIs.

    Paths are S3-style by default; a provider whose signed URLs follow another cloud's rules
    (Bentley's Azure SAS) mounts its own handler under a path prefix.
    """

    def __init__(self, state: EmulatorState) -> None:
        cfg = state.scenario.storage
        self.state = state
        self.objects = ObjectStore()
        self.signer = Signer(ttl_s=cfg.url_ttl_s)
        self.base_url = ""  # set once listening
        self._expire_first_n = cfg.expire_first_n
        self._chunk = cfg.chunk_size
        self._conn_rate = cfg.connection_bytes_per_s
        self._link_rate = cfg.link_bytes_per_s
        self._link_free_at = 0.0  # when the link has sent every byte handed to it so far
        self._issued = 0
        self._issued_expired = 0
        self._rejected_expired = 0
        self._handlers: list[tuple[str, StorageHandler]] = []
        state.add_stats_source("storage", self._stats)

    def mount_handler(self, prefix: str, handler: StorageHandler) -> None:
        self._handlers.append((prefix, handler))

    def signed_url(self, path: str, ttl_s: float | None = None) -> str:
        self._issued += 1
        expired = self._issued <= self._expire_first_n
        self._issued_expired += expired
        query = self.signer.query(path, expired=expired, ttl_s=ttl_s)
        return f"{self.private_url(path)}?{query}"

    def private_url(self, path: str) -> str:
        return self.base_url + quote(path)

    def build_app(self) -> web.Application:
        app = web.Application(
            middlewares=provider_middlewares("storage", self.state, _render_error)
        )
        app.router.add_get("/{key:.+}", self._get)
        return app

    def _stats(self) -> dict[str, int]:
        return {
            "signed_urls_issued": self._issued,
            "expired_urls_issued": self._issued_expired,
            "expired_rejected": self._rejected_expired,
        }

    def leaked_credential(self, request: web.Request) -> str | None:
        """The name of a header that carries a credential, recorded as a hit; None if the
        request is clean."""
        for name, value in request.headers.items():
            if name.lower() in _CREDENTIAL_HEADERS or self.state.is_api_key(value):
                self.state.record_credential_hit(name, request.path)
                return name
        return None

    async def _get(self, request: web.Request) -> web.StreamResponse:
        for prefix, handler in self._handlers:
            if request.path.startswith(prefix):
                return await handler(request)
        if self.leaked_credential(request) is not None:
            return s3_error(
                400,
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                "Signature query string parameter or the Authorization header should be "
                "specified",
            )
        check = self.signer.check(request.path, request.query)
        if check.verdict is Verdict.UNSIGNED:
            return s3_error(403, "AccessDenied", "Access Denied")
        if check.verdict is Verdict.BAD_SIGNATURE:
            return s3_error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you "
                "provided. Check your key and signing method.",
            )
        if check.verdict is Verdict.EXPIRED:
            self._rejected_expired += 1
            assert check.expires_at is not None
            return s3_error(
                403,
                "AccessDenied",
                "Request has expired",
                {
                    "X-Amz-Expires": request.query.get("X-Amz-Expires", ""),
                    "Expires": _iso(check.expires_at),
                    "ServerTime": _iso(time.time()),
                },
            )
        obj = await self.objects.get(request.path)
        if obj is None:
            return s3_error(404, "NoSuchKey", "The specified key does not exist.")
        range_header = request.headers.get("Range")
        span = None
        if range_header is not None:
            span = parse_range(range_header, len(obj.body))
            if span is None:
                return s3_error(
                    416,
                    "InvalidRange",
                    "The requested range is not satisfiable",
                    {"RangeRequested": range_header, "ActualObjectSize": str(len(obj.body))},
                )
        return await self.send_object(request, obj, span=span)

    async def send_object(
        self,
        request: web.Request,
        obj: StoredObject,
        headers: dict[str, str] | None = None,
        *,
        span: tuple[int, int] | None = None,
        body: bytes | None = None,
    ) -> web.StreamResponse:
        """Stream ``obj`` in chunks: whole (200) or the half-open ``span`` (206, with
        ``Content-Range``), honouring a truncate fault. ``body`` replaces the stored bytes
        (same length) for a fault that corrupts what is sent but not what is stored."""
        data = obj.body if body is None else body
        total = len(data)
        start, end = span if span is not None else (0, total)
        response = web.StreamResponse(status=200 if span is None else 206)
        response.content_type = obj.content_type
        response.headers["ETag"] = obj.etag
        response.headers["Accept-Ranges"] = "bytes"
        response.headers.update(headers or {})
        if span is not None:
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{total}"
        response.content_length = end - start
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        fraction = request.get(TRUNCATE_KEY)
        stop = end if fraction is None else start + int((end - start) * fraction)
        view = memoryview(data)
        began = time.monotonic()
        for pos in range(start, stop, self._chunk):
            piece = view[pos : min(pos + self._chunk, stop)]
            await self._pace(began, pos + len(piece) - start, len(piece))
            await response.write(piece)
        if fraction is not None:
            drop_connection(request, reset=False)
        return response

    async def _pace(self, began: float, sent: int, size: int) -> None:
        """Hold a body to the scenario's bandwidth caps: this connection may have sent
        ``sent`` bytes ``sent / connection_bytes_per_s`` after it began; the link sends
        every connection's pieces one after another at ``link_bytes_per_s``."""
        now = time.monotonic()
        until = now
        if self._conn_rate > 0:
            until = max(until, began + sent / self._conn_rate)
        if self._link_rate > 0:
            self._link_free_at = max(self._link_free_at, now) + size / self._link_rate
            until = max(until, self._link_free_at)
        if until > now:
            await asyncio.sleep(until - now)


def parse_range(header: str, total: int) -> tuple[int, int] | None:
    """``bytes=N-``, ``bytes=N-M`` or ``bytes=-N`` (one range) as a half-open [start, end);
    None when malformed or unsatisfiable (416)."""
    unit, _, spec = header.partition("=")
    first, sep, last = spec.strip().partition("-")
    if unit.strip() != "bytes" or not sep or "," in spec:
        return None
    try:
        if first == "":  # suffix: the last N bytes
            n = int(last)
            return (max(0, total - n), total) if n > 0 and total > 0 else None
        start = int(first)
        end = total if last == "" else min(int(last) + 1, total)
    except ValueError:
        return None
    return (start, end) if 0 <= start < end else None


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _render_error(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.StreamResponse:
    code = {
        404: "NoSuchKey",
        405: "MethodNotAllowed",
        429: "SlowDown",
        503: "ServiceUnavailable",
    }.get(status, "InternalError")
    response = s3_error(status, code, message)
    response.headers.update(headers or {})
    return response
