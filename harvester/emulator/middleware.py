"""The layers every emulated host puts around its handlers.

Outermost first: ``observe`` (record every request and its final status), ``inject`` (scenario
and runtime faults), ``limit`` (the token bucket), ``not_found`` (unknown paths answered in the
provider's own error format). A provider app gets them from ``provider_middlewares`` and only
supplies how its errors look.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from harvester.emulator.ratelimit import TokenBucket
from harvester.emulator.responses import retry_after_header
from harvester.emulator.scenario import RateLimit, RetryAfterFormat
from harvester.emulator.state import EmulatorState

FAULTS_KEY = web.RequestKey[tuple[str, ...]]("faults")
# Set when a truncate fault fired; a streaming handler must honour it itself, because its
# body is gone by the time the middleware sees the response.
TRUNCATE_KEY = web.RequestKey("truncate_fraction", float)


class ErrorRenderer(Protocol):
    def __call__(
        self, status: int, message: str, headers: dict[str, str] | None = None
    ) -> web.StreamResponse: ...


def provider_middlewares(
    provider: str,
    state: EmulatorState,
    render_error: ErrorRenderer,
    *,
    rate_limit: RateLimit | None = None,
    retry_after: RetryAfterFormat | None = None,
) -> list[Middleware]:
    """The layers for one host. ``rate_limit``: its scenario's token bucket (none at rate 0);
    ``retry_after``: how the bucket's 429 says when to come back, where the provider has one
    fixed way (else as ``rate_limit`` says)."""
    bucket = None
    wait_format: RetryAfterFormat = retry_after or "seconds"
    if rate_limit is not None and rate_limit.rate_per_s:
        bucket = TokenBucket(rate_limit.rate_per_s, rate_limit.burst, state.clock)
        wait_format = retry_after or rate_limit.retry_after

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        status = 500
        state.request_started(provider)
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            state.request_ended(provider)
            faults = request.get(FAULTS_KEY, ())
            if "reset" in faults:
                status = 0
            state.record_request(
                provider, request.method, request.path, endpoint_of(request), status, faults
            )

    @web.middleware
    async def inject(request: web.Request, handler: Handler) -> web.StreamResponse:
        decision = state.faults.decide(provider, request.path)
        request[FAULTS_KEY] = tuple(decision.kinds)
        if decision.delay_s > 0:
            await asyncio.sleep(decision.delay_s)
        fault = decision.fault
        if fault is None:
            return await handler(request)
        if fault.kind == "429":
            headers = retry_after_header(fault.retry_after_s, fault.retry_after)
            return render_error(429, "rate limit exceeded", headers)
        if fault.kind == "5xx":
            return render_error(fault.status, "internal error (injected fault)")
        if fault.kind == "reset":
            if fault.when == "after":
                await handler(request)
            drop_connection(request, reset=True)
            return web.Response(status=500)  # never sent: the socket is gone
        request[TRUNCATE_KEY] = fault.fraction
        response = await handler(request)
        if isinstance(response, web.Response) and not response.prepared:
            return await send_truncated(request, response, fault.fraction)
        return response

    @web.middleware
    async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        assert bucket is not None
        wait = bucket.take()
        if wait > 0:
            return render_error(429, "rate limit exceeded", retry_after_header(wait, wait_format))
        return await handler(request)

    @web.middleware
    async def not_found(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
            return render_error(exc.status, exc.reason)

    stack: list[Middleware] = [observe, inject]
    if bucket is not None:
        stack.append(limit)
    stack.append(not_found)
    return stack


def endpoint_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "(unmatched)"


def drop_connection(request: web.Request, *, reset: bool) -> None:
    """Close the client's connection: with a TCP RST (``reset``), or after flushing what was
    written so far (a truncated body)."""
    transport = request.transport
    if transport is None:
        return
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:  # SO_LINGER 0 turns close into an RST: "connection reset by peer"
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()


async def send_truncated(
    request: web.Request, response: web.Response, fraction: float
) -> web.StreamResponse:
    body = response.body if isinstance(response.body, bytes) else b""
    out = web.StreamResponse(status=response.status, reason=response.reason)
    for name, value in response.headers.items():
        if name.lower() != "content-length":
            out.headers.add(name, value)
    out.content_length = len(body)
    await out.prepare(request)
    await out.write(body[: int(len(body) * fraction)])
    drop_connection(request, reset=False)
    return out
