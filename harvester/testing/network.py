"""A network in memory: requests go to handlers by origin, on the engine's clock.

``MemoryNetwork`` is an ``ExchangeFactory`` (``Engine(exchanges=network)``): each provider's
``Transport`` gets a ``MemoryExchange`` that hands its requests to the handler mounted for the
URL's origin. Faults are injected per request (``inject``): ``LOSE_ANSWER`` lets the handler act
and then drops its answer (the case the engine reconciles), ``RESET`` drops the request before
the handler sees it, and a ``MemoryAnswer`` is answered instead of the handler's (a 429 with
``Retry-After``). Errors are raised as the real network raises them (``ConnectionResetError``),
so the transport's own mapping turns them into ``NetworkError``.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from harvester.clock import Clock
from harvester.config import ProviderConfig
from harvester.emulator.storage import parse_range

__all__ = [
    "Fault",
    "Headers",
    "MemoryAnswer",
    "MemoryExchange",
    "MemoryNetwork",
    "MemoryRequest",
    "serve_bytes",
]


class Headers(dict[str, str]):
    """A case-insensitive header map (keys kept lower-case)."""

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        super().__init__((k.lower(), v) for k, v in pairs)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __setitem__(self, key: str, value: str) -> None:
        super().__setitem__(key.lower(), value)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


@dataclass(frozen=True, slots=True)
class MemoryRequest:
    method: str
    url: str  #: without its query
    path: str
    query: Mapping[str, str]  #: the URL's query and the request's params
    headers: Headers
    body: bytes | None
    at: float  #: the clock's time when it was sent

    def json(self) -> Any:
        return orjson.loads(self.body or b"null")


@dataclass(frozen=True, slots=True)
class MemoryAnswer:
    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(
        cls, doc: Any, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> MemoryAnswer:
        return cls(
            status, orjson.dumps(doc), {"Content-Type": "application/json", **(headers or {})}
        )


def serve_bytes(body: bytes, asked: str | None, headers: Mapping[str, str]) -> MemoryAnswer:
    """A GET of ``body``: whole (200) without a range asked, else the one range ``asked``
    names (206 with ``Content-Range``; 416 when it cannot be served), as storage hosts do."""
    if asked is None:
        return MemoryAnswer(200, body, headers)
    total = len(body)
    span = parse_range(asked, total)
    if span is None:
        return MemoryAnswer(416, b"", {**headers, "Content-Range": f"bytes */{total}"})
    start, end = span
    return MemoryAnswer(
        206, body[start:end], {**headers, "Content-Range": f"bytes {start}-{end - 1}/{total}"}
    )


class _Reader:
    __slots__ = ("_at", "_body")

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._at = 0

    async def read(self, n: int = -1) -> bytes:
        end = len(self._body) if n < 0 else self._at + n
        chunk = self._body[self._at : end]
        self._at += len(chunk)
        return chunk


class _Received:
    """A ``MemoryAnswer`` as an ``exchange.Answer``: its body read from the start."""

    __slots__ = ("content", "content_length", "headers", "status")

    def __init__(self, answer: MemoryAnswer) -> None:
        self.status = answer.status
        self.headers = Headers(answer.headers)
        self.content_length: int | None = len(answer.body)
        self.content = _Reader(answer.body)


class Fault(enum.Enum):
    #: the handler acts, then its answer never arrives (a reset after the request landed)
    LOSE_ANSWER = "lose-answer"
    #: the request never reaches the handler
    RESET = "reset"


Handler = Callable[[MemoryRequest], Awaitable[MemoryAnswer]]
Match = Callable[[MemoryRequest], bool]


@dataclass(slots=True)
class _Rule:
    match: Match
    fault: Fault | MemoryAnswer
    times: int  #: how many more requests it applies to (-1: every one)


class MemoryNetwork:
    """Handlers by origin (``http://host``), the requests sent, and the faults to inject."""

    def __init__(self, clock: Clock, *, latency_s: float = 0.0, record: bool = True) -> None:
        self.clock = clock
        #: virtual seconds each request takes before its handler sees it
        self.latency_s = latency_s
        self.record = record
        self.hosts: dict[str, Handler] = {}
        #: every request sent, in order (when ``record``)
        self.sent: list[MemoryRequest] = []
        self._rules: list[_Rule] = []

    def route(self, origin: str, handler: Handler) -> None:
        self.hosts[origin.rstrip("/").lower()] = handler

    def inject(self, match: Match, fault: Fault | MemoryAnswer, *, times: int = 1) -> None:
        """Apply ``fault`` to the next ``times`` requests ``match`` accepts (-1: all of them)."""
        self._rules.append(_Rule(match, fault, times))

    def clear_faults(self) -> None:
        self._rules.clear()

    def __call__(self, cfg: ProviderConfig) -> MemoryExchange:
        return MemoryExchange(self)

    async def deliver(
        self,
        method: str,
        url: str,
        params: Mapping[str, str] | None,
        body: bytes | None,
        headers: Mapping[str, str],
    ) -> MemoryAnswer:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        query.update(params or {})
        request = MemoryRequest(
            method,
            f"{parts.scheme}://{parts.netloc}{parts.path}",
            parts.path,
            query,
            Headers(headers),
            body,
            self.clock.monotonic(),
        )
        if self.record:
            self.sent.append(request)
        if self.latency_s > 0:
            await self.clock.sleep(self.latency_s)
        fault = self._fault_for(request)
        if fault is Fault.RESET:
            raise ConnectionResetError(f"connection reset before {method} {request.url} arrived")
        if isinstance(fault, MemoryAnswer):
            return fault
        handler = self.hosts.get(f"{parts.scheme}://{parts.netloc}".lower())
        if handler is None:
            raise ConnectionRefusedError(f"nothing listens at {parts.scheme}://{parts.netloc}")
        answer = await handler(request)
        if fault is Fault.LOSE_ANSWER:
            raise ConnectionResetError(f"connection reset before the answer to {method} came")
        return answer

    def _fault_for(self, request: MemoryRequest) -> Fault | MemoryAnswer | None:
        for rule in self._rules:
            if rule.times != 0 and rule.match(request):
                if rule.times > 0:
                    rule.times -= 1
                return rule.fault
        return None


class MemoryExchange:
    """One provider's ``exchange.Exchange`` on a ``MemoryNetwork``."""

    def __init__(self, network: MemoryNetwork) -> None:
        self.network = network
        self.open_now = False

    async def open(self) -> None:
        self.open_now = True

    async def close(self) -> None:
        self.open_now = False

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None,
        body: bytes | None,
        headers: Mapping[str, str],
    ) -> AbstractAsyncContextManager[_Received]:
        return self._answer(method, url, params, body, headers)

    def stream(
        self, url: str, *, headers: Mapping[str, str]
    ) -> AbstractAsyncContextManager[_Received]:
        return self._answer("GET", url, None, None, headers)

    @asynccontextmanager
    async def _answer(
        self,
        method: str,
        url: str,
        params: Mapping[str, str] | None,
        body: bytes | None,
        headers: Mapping[str, str],
    ) -> AsyncIterator[_Received]:
        if not self.open_now:
            raise RuntimeError("the exchange is not open")
        yield _Received(await self.network.deliver(method, url, params, body, headers))
