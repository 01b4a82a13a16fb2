"""Malformed requests to the daemon's API: every one gets a JSON error with a 4xx status
(never a 500, never plain text) and changes nothing in the store or the output.

The API runs in this process over a real store, served by the daemon's own listener
(``harvester.httpserver``), and the requests are written byte by byte on a socket, since most
of them are what no HTTP client library would send.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
import orjson
import pytest

from harvester.api import MAX_BODY_BYTES, Api
from harvester.config import load_config
from harvester.engine import Engine
from harvester.httpserver import serve_http
from harvester.store import make_store

from .helpers import GOOD_LINE, SECRET_ENV, Workspace, line

pytestmark = pytest.mark.anyio

DEEP = 100_000  #: nesting depth of the deep cases (the report: a 100,000-deep array)
LONG = 20_000  #: length of the long names (the report: a 20,000-character key)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        doc = orjson.loads(self.body)
        assert isinstance(doc, dict)
        return doc


async def exchange(url: str, request: bytes, *, within: float = 10.0) -> Answer:
    """Send ``request`` as is and read the answer until the server closes (or, for an
    answer with a Content-Length, until it is complete)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    data = b""
    with anyio.fail_after(within):
        async with await anyio.connect_tcp(host, int(port)) as stream:
            # The server may answer and close before it has taken the whole request.
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await stream.send(request)
            while True:
                try:
                    chunk = await stream.receive(65536)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    break
                data += chunk
                head, sep, body = data.partition(b"\r\n\r\n")
                if sep and _complete(head, body):
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for h in header_lines:
        name, _, value = h.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, body)


def _complete(head: bytes, body: bytes) -> bool:
    for h in head.split(b"\r\n")[1:]:
        name, _, value = h.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def post(body: bytes, content_type: str | None = None, *, extra: str = "") -> bytes:
    ct = f"Content-Type: {content_type}\r\n" if content_type else ""
    return (
        f"POST /jobs HTTP/1.1\r\nHost: h\r\n{ct}{extra}Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


def get(path: str, *, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: h\r\n{extra}Connection: close\r\n\r\n".encode()


def nested_payload(depth: int) -> bytes:
    """A good job line whose payload holds an object ``depth`` levels deep."""
    good = json.dumps(GOOD_LINE).encode()
    deep = b'{"a": ' * depth + b"1" + b"}" * depth
    return good.replace(b'"work_flow_id"', b'"deep": ' + deep + b', "work_flow_id"', 1)


@dataclass(frozen=True)
class Case:
    id: str
    request: Callable[[], bytes]
    status: int
    says: str  #: the JSON error (or one of its per-line errors) contains this


CASES = [
    Case("deep-array", lambda: post(b"[" * DEEP + b"]" * DEEP), 400, "nested too deeply"),
    Case("deep-array-unclosed", lambda: post(b"[" * DEEP), 400, "nested too deeply"),
    Case("deep-array-of-objects", lambda: post(b"[" + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"]"),
         400, "nested too deeply"),
    Case("deep-line", lambda: post(b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"\n"), 400,
         "nested too deeply"),
    # Deep enough to pass the JSON parser, too deep for the store's serialiser.
    Case("deep-payload", lambda: post(nested_payload(300) + b"\n"), 400, "nested too deeply"),
    Case("long-json-key", lambda: post(b'{"' + b"k" * LONG + b'": 1}\n'), 400, "unknown key"),
    Case("long-reference-id",
         lambda: post(line({**GOOD_LINE, "reference_id": "r" * LONG})), 400, "512"),
    Case("long-url", lambda: get("/jobs/playment/" + "k" * LONG), 400, "bad request"),
    Case("long-header-name", lambda: post(line(GOOD_LINE), extra="X" * LONG + ": 1\r\n"), 400,
         "bad request"),
    Case("long-header-value",
         lambda: post(line(GOOD_LINE), extra="X-Long: " + "v" * LONG + "\r\n"), 400,
         "bad request"),
    Case("not-http", lambda: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64, 400,
         "bad request"),
    Case("both-lengths", lambda: post(line(GOOD_LINE), extra="Transfer-Encoding: chunked\r\n"),
         400, "bad request"),
    Case("invalid-utf8-line", lambda: post(b'{"provider": "playment", "reference_id": "\xff"}\n'),
         400, "UTF-8"),
    Case("invalid-utf8-array", lambda: post(b'[{"provider": "\xc3\x28"}]'), 400, "UTF-8"),
    Case("lone-surrogate",
         lambda: post(line(GOOD_LINE).replace(b'"good-1"', b'"good-\\ud800"')), 400,
         "surrogate"),
    Case("lone-surrogate-in-payload",
         lambda: post(line(GOOD_LINE).replace(b'"wf-it"', b'"wf-\\udfff"')), 400, "surrogate"),
    Case("multipart",
         lambda: post(b"--b\r\nContent-Disposition: form-data; name=f\r\n\r\n" + line(GOOD_LINE)
                      + b"\r\n--b--\r\n", "multipart/form-data; boundary=b"), 415,
         "Content-Type"),
    Case("xml", lambda: post(b"<jobs/>", "application/xml"), 415, "Content-Type"),
    Case("latin-1", lambda: post(line(GOOD_LINE), "application/json; charset=latin-1"), 415,
         "charset"),
    Case("oversized-declared",
         lambda: (f"POST /jobs HTTP/1.1\r\nHost: h\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n"
                  "Connection: close\r\n\r\n").encode() + b"[" * 1000, 413, "64 MiB"),
    Case("nul-bytes", lambda: post(b"\0" * 100), 400, "not valid JSON"),
]  # fmt: skip


@pytest.fixture
async def served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Workspace, str]]:
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    ws = await anyio.to_thread.run_sync(Workspace, tmp_path)  # it runs the CLI: its own loop
    config = load_config(ws.config)
    store = make_store(config.store)
    await store.open()
    try:
        api = Api(
            config=config,
            store=store,
            engine=Engine(config, store, burst=False),
            stopping=lambda: False,
            jobs_added=lambda: None,
            token=None,
        )
        async with serve_http(
            api.build_app(), config.server, "127.0.0.1", 0, on_close=lambda _: None
        ) as url:
            yield ws, url
    finally:
        await store.close()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
async def test_a_malformed_request_is_a_json_error_and_changes_nothing(
    served: tuple[Workspace, str], case: Case
) -> None:
    ws, url = served
    before = ws.snapshot()
    answer = await exchange(url, case.request())
    assert answer.status == case.status, (answer.status, answer.body[:500])
    assert answer.headers["content-type"].startswith("application/json"), answer.headers
    doc = answer.json()
    errors = [doc["error"]] + [e["error"] for e in doc.get("errors", [])]  # type: ignore[attr-defined]
    assert any(case.says.lower() in str(e).lower() for e in errors), doc
    assert len(answer.body) < 4096, "an error echoes at most a bounded part of the request"
    assert ws.snapshot() == before
    # The server is still fine: a good request after the bad one is answered.
    ok = await exchange(url, get("/healthz"))
    assert ok.status == 200 and ok.json() == {"status": "ok"}


async def test_an_oversized_chunked_body_is_a_json_413(served: tuple[Workspace, str]) -> None:
    """No Content-Length to refuse up front: the server must stop reading at 64 MiB."""
    ws, url = served
    before = ws.snapshot()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    chunk = b"[" + b" " * (1 << 20)
    head = b"POST /jobs HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    data = b""
    with anyio.fail_after(60):
        async with await anyio.connect_tcp(host, int(port)) as stream:
            await stream.send(head)
            try:
                for _ in range((MAX_BODY_BYTES >> 20) + 8):
                    await stream.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (anyio.BrokenResourceError, OSError):
                pass  # refused before we were done: what should happen
            while b"\r\n\r\n" not in data or not _complete(*data.split(b"\r\n\r\n", 1)):
                try:
                    data += await stream.receive(65536)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    break
    assert data.startswith(b"HTTP/1.1 413 "), data[:300]
    assert b"application/json" in data.split(b"\r\n\r\n")[0]
    assert "64 MiB" in orjson.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
    assert ws.snapshot() == before
