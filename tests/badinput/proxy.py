"""A tiny HTTP server in front of the emulator that answers chosen requests with malformed
bodies: the emulator only ever serves correct ones.

Everything is forwarded to the emulator unchanged, except:

- a create request whose body contains a case's *marker* teaches the proxy that job's
  remote id (read from the emulator's answer);
- a request for that job at the case's *place* (its status, its results, its result file or
  one of its mask files) gets the case's body instead. File bodies are served by the proxy
  itself, at ``/_bad/<case>``, where the attachments redirect points (or a case's own
  ``location``). A case with ``serve`` answers through it instead of a fixed body: endless,
  trickling or gzip-bombed answers.
"""

from __future__ import annotations

import contextlib
import gzip
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import aiohttp
import orjson
from aiohttp import web

from tests.loopback import serving

#: how each provider's create answer names the new job
_REMOTE_ID: dict[str, Callable[[Any], Any]] = {
    "playment": lambda doc: doc["data"]["job_id"],
    "cognite": lambda doc: doc["jobId"],
    "bentley": lambda doc: doc["job"]["id"],
    "modzy": lambda doc: doc["jobIdentifier"],
}
_CREATE = {
    "playment": re.compile(r"^/playment/v1/projects/[^/]+/jobs$"),
    "cognite": re.compile(r"^/cognite/api/v1/projects/[^/]+/context/vision/segment$"),
    "bentley": re.compile(r"^/bentley/reality-analysis/jobs$"),
    "modzy": re.compile(r"^/modzy/api/jobs$"),
}
#: where a case's malformed body goes, given the job's remote id
_PLACES: dict[str, Callable[[str], re.Pattern[str]]] = {
    "poll": lambda rid: re.compile(
        rf"^/(playment/v1/projects/[^/]+/jobs|cognite/api/v1/projects/[^/]+/context/vision/"
        rf"segment|bentley/reality-analysis/jobs)/{re.escape(rid)}$"
    ),
    "results": lambda rid: re.compile(rf"^/modzy/api/results/{re.escape(rid)}$"),
    "result-file": lambda rid: re.compile(rf"/{re.escape(rid)}/result\.json$"),
    "mask-file": lambda rid: re.compile(rf"/{re.escape(rid)}/masks/1\.txt$"),
    "mask-files": lambda rid: re.compile(rf"/{re.escape(rid)}/masks/\d+\.txt$"),
}


@dataclass(frozen=True)
class Malformed:
    name: str
    provider: str
    marker: bytes  #: found in the create request body of the job this case targets
    place: str  #: a key of _PLACES
    body: bytes
    status: int = 200
    #: answers the request instead of ``body`` (streamed, slow or encoded answers)
    serve: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None
    #: where the attachments endpoint redirects for this case's file, instead of /_bad/
    location: str | None = None


class Proxy:
    def __init__(self, upstream: str, cases: list[Malformed]) -> None:
        self.upstream = upstream.rstrip("/")
        self.cases = cases
        self.remote: dict[str, str] = {}  #: case name -> remote id
        self.served: dict[str, int] = {}  #: case name -> malformed answers given
        self.origin = ""
        self._stack = contextlib.AsyncExitStack()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Proxy:
        server = serving(self._handle, client_max_size=64 << 20, auto_decompress=False)
        self.origin = await self._stack.enter_async_context(server)
        self._session = aiohttp.ClientSession(auto_decompress=True)
        self._stack.push_async_callback(self._session.close)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def url(self, service: str) -> str:
        return {
            "playment": f"{self.origin}/playment",
            "cognite": f"{self.origin}/cognite",
            "bentley": f"{self.origin}/bentley",
            "modzy": f"{self.origin}/modzy",
            "token": f"{self.origin}/oauth2/token",
        }[service]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith("/_bad/"):
            case = self._case(path.removeprefix("/_bad/"))
            self.served[case.name] = self.served.get(case.name, 0) + 1
            if case.serve is not None:
                return await case.serve(request)
            return web.Response(status=case.status, body=case.body)
        for case in self.cases:
            rid = self.remote.get(case.name)
            if rid is None:
                continue
            if case.place in ("poll", "results") and _PLACES[case.place](rid).search(path):
                self.served[case.name] = self.served.get(case.name, 0) + 1
                if case.serve is not None:
                    return await case.serve(request)
                return web.Response(
                    status=case.status, body=case.body, content_type="application/json"
                )
            target = unquote(request.query.get("url", ""))
            if path == "/playment/v1/attachments" and _PLACES[case.place](rid).search(target):
                if case.location is not None:
                    self.served[case.name] = self.served.get(case.name, 0) + 1
                location = case.location or f"/_bad/{case.name}"
                return web.Response(status=302, headers={"Location": location})
        body = await request.read()
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        assert self._session is not None
        async with self._session.request(
            request.method,
            self.upstream + str(request.rel_url),
            data=body,
            headers=headers,
            allow_redirects=False,
        ) as resp:
            answer = await resp.read()
            status = resp.status
            out_headers = {
                k: v
                for k, v in resp.headers.items()
                if k.lower()
                not in ("content-length", "content-encoding", "transfer-encoding", "connection")
            }
        self._learn(request, body, status, answer)
        return web.Response(status=status, body=answer, headers=out_headers)

    def _case(self, name: str) -> Malformed:
        return next(c for c in self.cases if c.name == name)

    def _learn(self, request: web.Request, body: bytes, status: int, answer: bytes) -> None:
        if request.method != "POST" or not 200 <= status < 300:
            return
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        for case in self.cases:
            if case.name in self.remote or not _CREATE[case.provider].match(request.path):
                continue
            if case.marker in body:
                self.remote[case.name] = str(_REMOTE_ID[case.provider](orjson.loads(answer)))
