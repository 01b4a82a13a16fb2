"""A throwaway HTTP server on a free loopback port, for tests that need a peer of their own
(a hostile API, a recording or malformed proxy, storage that ignores ranges)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import web

Serve = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serving(
    handle: Serve, *, client_max_size: int = 1024**2, auto_decompress: bool = True
) -> AsyncIterator[str]:
    """A server answering every request with ``handle``, until the block ends; its origin."""
    app = web.Application(client_max_size=client_max_size)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, auto_decompress=auto_decompress)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
