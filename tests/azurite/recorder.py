"""A recording HTTP proxy on loopback: forwards every request unchanged to one upstream and
keeps what each request carried (method, path and query, every header), so a test can prove
what harvester sent to storage from the wire rather than from a server's log format.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from tests.loopback import serving

#: hop-by-hop headers (RFC 9110 7.6.1) and those aiohttp sets itself
_NOT_FORWARDED = frozenset({"host", "content-length", "connection", "transfer-encoding"})


@dataclass
class Recorded:
    method: str
    path_qs: str
    headers: CIMultiDict[str]
    status: int = 0  #: the upstream's answer; 0 until it came


class RecordingProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.requests: list[Recorded] = []
        self.origin = ""
        self._stack = contextlib.AsyncExitStack()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> RecordingProxy:
        server = serving(self._forward, client_max_size=64 << 20)
        self.origin = await self._stack.enter_async_context(server)
        self._session = aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=60)
        )
        self._stack.push_async_callback(self._session.close)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        # raw_path: the path and query exactly as sent (a SAS signature is in there)
        record = Recorded(request.method, request.raw_path, CIMultiDict(request.headers))
        self.requests.append(record)
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED
        )
        assert self._session is not None
        async with self._session.request(
            request.method,
            URL(self.upstream + request.raw_path, encoded=True),
            data=await request.read(),
            headers=headers,
            allow_redirects=False,
        ) as upstream:
            record.status = upstream.status
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _NOT_FORWARDED:
                    response.headers.add(key, value)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(1 << 16):
                await response.write(chunk)
            await response.write_eof()
            return response
