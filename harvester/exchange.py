"""The byte exchange under a ``Transport``: one HTTP request out, one answer's bytes back.

This is the only swappable part of talking to a provider. Everything around it stays in
``transport.py`` and runs the same whatever carries the bytes: the limiter, credentials,
retries, redirects, the link-local guard on URLs, the answer-size bound, error classification
and the mapping of foreign exceptions. ``AiohttpExchange`` is the real network (one aiohttp
session per provider, with its timeouts and its guarded resolver); ``harvester.testing``
has one in memory, so the real engine runs on a virtual clock without sockets.

An exchange raises what its network raises (``OSError``, ``TimeoutError``, aiohttp's errors):
``transport.map_exceptions`` turns those into ``NetworkError`` around every use of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import aiohttp
import orjson

from harvester.config import ProviderConfig
from harvester.netguard import GuardedResolver

__all__ = ["AiohttpExchange", "Answer", "Body", "Exchange", "ExchangeFactory"]


class Body(Protocol):
    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes of the decoded body; ``b""`` at its end."""
        ...


class Answer(Protocol):
    """An answer whose body is read in pieces (aiohttp's ``ClientResponse`` is one)."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]:
        """Case-insensitive."""
        ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def content(self) -> Body: ...


class Exchange(Protocol):
    """Carries requests to one provider's hosts (its API and its storage)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None,
        body: bytes | None,
        headers: Mapping[str, str],
    ) -> AbstractAsyncContextManager[Answer]:
        """An API request, redirects not followed (``Transport`` follows them itself)."""
        ...

    def stream(
        self, url: str, *, headers: Mapping[str, str]
    ) -> AbstractAsyncContextManager[Answer]:
        """A GET of a (signed) download URL whose body the caller streams."""
        ...


#: what the engine takes to reach a provider: an ``Exchange`` for its configuration
ExchangeFactory = Callable[[ProviderConfig], Exchange]


class AiohttpExchange:
    """The real network: one aiohttp session, bounded in time by ``request_timeout_s``."""

    def __init__(self, cfg: ProviderConfig) -> None:
        self.cfg = cfg
        self._session: aiohttp.ClientSession | None = None
        # Built once: per request they are measurable CPU at thousands of polls per second.
        self._request_timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s)
        # A download's whole-body deadline is its reader's (``download.stream_into``); this
        # bounds the connect and each gap between chunks.
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=cfg.request_timeout_s,
            sock_read=cfg.request_timeout_s,
        )

    async def open(self) -> None:
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.cfg.request_timeout_s,
            sock_read=self.cfg.request_timeout_s,
        )
        connector = aiohttp.TCPConnector(
            limit=max(self.cfg.max_concurrency * 2, 16),
            resolver=None if self.cfg.allow_link_local else GuardedResolver(),
        )
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            connector=connector,
            auto_decompress=True,
            json_serialize=lambda o: orjson.dumps(o).decode(),
            # Each request sets its own headers; nothing shared may carry credentials.
            headers={"User-Agent": "harvester/0.1"},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"transport for {self.cfg.name} is not open")
        return self._session

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None,
        body: bytes | None,
        headers: Mapping[str, str],
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        return self.session.request(
            method,
            url,
            params=params,
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=self._request_timeout,
        )

    def stream(
        self, url: str, *, headers: Mapping[str, str]
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        return self.session.get(
            url, headers=headers, allow_redirects=False, timeout=self._stream_timeout
        )
