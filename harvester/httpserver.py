"""The daemon's HTTP listener: aiohttp, with bounds on what a client can hold.

aiohttp alone keeps a connection that sends half a request for about an hour and accepts
connections until the process runs out of file descriptors; then even ``/healthz`` cannot be
accepted, and the liveness probe restarts a pod that was fine. So every connection is bounded:

- **count**: at most ``max_connections`` (and never more than half the open-files limit, so
  the store, provider connections and output files keep theirs). A connection over the cap
  closes the oldest one that has no request being handled (half-sent headers, or idle between
  requests), else the oldest one still sending a body; when every connection is busy in a
  handler the newcomer is closed. A probe's connection sends its request at once, so it gets
  in however many half-open connections an attacker holds.
- **headers**: a request's headers must be complete within ``header_timeout_s`` of the
  connection being made, or of its first byte after an idle pause between requests.
- **body**: the handler that reads one bounds it (``Api.post_jobs``: ``body_timeout_s``), and
  marks the connection with ``reading_body`` meanwhile.
- **idle**: aiohttp's own keep-alive timeout closes a connection that sits between requests.

aiohttp's own answers to a malformed request (request line or header too long, bad syntax)
are JSON like every other answer, and what the guard closes is logged through a throttle: an
attack costs a few log lines a minute and a counter, not megabytes of tracebacks.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import orjson
from aiohttp import web

from harvester.config import ServerConfig
from harvester.logs import Throttle, get_logger

log = get_logger("harvester.http")

#: how long stopping the HTTP server may take (it waits for in-flight requests)
SHUTDOWN_S = 3.0
#: longest request line / header line accepted (aiohttp's default); longer is a JSON 400
MAX_LINE_BYTES = 8190
#: after answering a request whose body was not read (a 408, a 413), how long the rest of
#: the body is read and dropped so the client sees the answer rather than a reset
LINGER_S = 3.0
#: connections the kernel completes and queues before we accept them (they cost us no file
#: descriptor); when the queue is full a client's SYN is dropped and retried a second later,
#: as long as a kubelet probe waits, so a flood must not fill it (net.core.somaxconn caps it)
BACKLOG = 1024
#: connections asyncio accepts in one go before any of them reaches the guard (it passes
#: the listen backlog as this number, hence the separate listen() below): with the cap at
#: half the open-files limit, a burst must fit in the other half
ACCEPT_BURST = 64

Closed = Callable[[str], None]  #: told the reason of every connection the guard closes


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, reporting to the guard and timing the headers."""

    def __init__(self, manager: web.Server, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = guard
        self.in_request = False  #: a handler is running for a request of this connection
        self.reading_body = False  #: ...and it is waiting for the request body
        self._awaiting_headers = True
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()
        self.guard.opened(self)

    def data_received(self, data: bytes) -> None:
        if not self.in_request and not self._awaiting_headers:
            self._awaiting_headers = True  # the first byte of the next request on this
            self._arm_header_timer()  # keep-alive connection starts its clock
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        self.guard.lost(self)
        super().connection_lost(exc)

    def request_started(self) -> None:
        self.in_request = True
        self._awaiting_headers = False
        self._cancel_header_timer()

    def request_finished(self) -> None:
        self.in_request = False
        self.reading_body = False

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self._loop.call_later(self.guard.header_timeout_s, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._awaiting_headers and not self.in_request:
            self.guard.close(self, "header_timeout")

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp answers these without reaching the app (the request could not be parsed),
        # in plain text and with a logged traceback; we answer JSON and log one line.
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started; no error answer can follow")
        self.guard.note_error(status, exc)
        if status >= 500:
            text = "internal error (see the daemon's log)"
        else:
            # The parser's message may quote what was sent; it goes back to its sender only.
            text = f"bad request: {(message or 'malformed HTTP request')[:200]}"
        resp = web.Response(
            body=orjson.dumps({"error": text}), status=status, content_type="application/json"
        )
        resp.force_close()
        return resp


class ConnectionGuard:
    """The open connections of one listener, oldest first, and the cap on their number."""

    def __init__(
        self, *, max_connections: int, header_timeout_s: float, on_close: Closed | None = None
    ) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.on_close = on_close
        self.throttle = Throttle(burst=3, window_s=60.0)
        self._open: dict[GuardedRequestHandler, None] = {}  # insertion order: oldest first

    @property
    def open_count(self) -> int:
        return len(self._open)

    def opened(self, conn: GuardedRequestHandler) -> None:
        self._open[conn] = None
        if len(self._open) <= self.max_connections:
            return
        victim = next((c for c in self._open if not c.in_request and c is not conn), None)
        if victim is None:
            victim = next((c for c in self._open if c.reading_body), None)
        if victim is None:
            self.close(conn, "refused")
        else:
            self.close(victim, "evicted")

    def lost(self, conn: GuardedRequestHandler) -> None:
        self._open.pop(conn, None)

    def close(self, conn: GuardedRequestHandler, reason: str) -> None:
        # Out of the table at once: several accepts can land before the loss is reported.
        self._open.pop(conn, None)
        conn.abort()
        if self.on_close is not None:
            self.on_close(reason)
        suppressed = self.throttle.admit(reason)
        if suppressed is not None:
            log.warning(
                _CLOSE_EVENTS[reason],
                reason=reason,
                open_connections=len(self._open),
                max_connections=self.max_connections,
                header_timeout_s=self.header_timeout_s,
                suppressed=suppressed,
            )

    def note_error(self, status: int, exc: BaseException | None) -> None:
        suppressed = self.throttle.admit(("error", status))
        if suppressed is not None:
            log.warning(
                "http: request refused by the HTTP parser",
                status=status,
                error=type(exc).__name__ if exc is not None else None,
                suppressed=suppressed,
            )


_CLOSE_EVENTS = {
    "header_timeout": "http: closed a connection that did not send its request headers in time",
    "evicted": "http: connection limit reached; closed the oldest connection not in a request",
    "refused": "http: connection limit reached and every connection is in a request; refused",
}


def connection_cap(configured: int) -> int:
    """``server.max_connections``, lowered to half the open-files limit if that is less."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft // 2))


@web.middleware
async def track_requests(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    conn = request.protocol
    if not isinstance(conn, GuardedRequestHandler):
        return await handler(request)
    conn.request_started()
    try:
        return await handler(request)
    finally:
        conn.request_finished()


@contextmanager
def reading_body(request: web.BaseRequest) -> Iterator[None]:
    """Mark the request's connection as waiting for its body: under a flood of connections
    it may be closed before one whose handler is working."""
    conn = request.protocol
    if not isinstance(conn, GuardedRequestHandler):
        yield
        return
    conn.reading_body = True
    try:
        yield
    finally:
        conn.reading_body = False


class GuardedSite(web.BaseSite):
    """A TCP listener whose connections are ``GuardedRequestHandler`` s under one guard."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        guard: ConnectionGuard,
        handler_kwargs: dict[str, Any],
    ) -> None:
        super().__init__(runner, backlog=ACCEPT_BURST)
        self.host = host
        self.port = port
        self.guard = guard
        self.handler_kwargs = handler_kwargs

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()

        def protocol() -> GuardedRequestHandler:
            return GuardedRequestHandler(server, self.guard, loop=loop, **self.handler_kwargs)

        self._server = await loop.create_server(
            protocol, self.host, self.port, backlog=ACCEPT_BURST
        )
        for listening in self._server.sockets:
            # listen() again on the same socket only deepens the kernel's queue.
            with socket.socket(fileno=os.dup(listening.fileno())) as sock:
                sock.listen(BACKLOG)


@asynccontextmanager
async def serve_http(
    app: web.Application, settings: ServerConfig, host: str, port: int, *, on_close: Closed
) -> AsyncIterator[str]:
    """Serve ``app`` on host:port until the block ends; yields the URL it listens on."""
    app.middlewares.insert(0, track_requests)
    runner = web.AppRunner(
        app,
        handle_signals=False,  # signals are the daemon's: the first one drains, not exits
        access_log=None,  # probes every few seconds would drown the job events
        shutdown_timeout=SHUTDOWN_S,
    )
    await runner.setup()
    try:
        cap = connection_cap(settings.max_connections)
        if cap < settings.max_connections:
            log.warning(
                "server.max_connections lowered to half the open-files limit",
                configured=settings.max_connections,
                max_connections=cap,
            )
        guard = ConnectionGuard(
            max_connections=cap, header_timeout_s=settings.header_timeout_s, on_close=on_close
        )
        handler_kwargs: dict[str, Any] = {
            "keepalive_timeout": settings.idle_timeout_s,
            "max_line_size": MAX_LINE_BYTES,
            "max_field_size": MAX_LINE_BYTES,
            "lingering_time": LINGER_S,
            "access_log": None,
        }
        site = GuardedSite(runner, host, port, guard=guard, handler_kwargs=handler_kwargs)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        yield f"http://{shown}:{bound_port}"
    finally:
        # Real time: a bound on closing sockets and their handlers, which no virtual clock moves.
        with anyio.move_on_after(SHUTDOWN_S + 1, shield=True):
            await runner.cleanup()
