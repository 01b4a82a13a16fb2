"""Request bodies as the emulated APIs read them, ``Content-Encoding`` included.

cognite-sdk gzips every POST body. The provider port is served with aiohttp's own request
decompression off (see ``server``) and bodies are decoded here instead: a body that does not
decompress is then an ordinary 400 in the provider's own envelope on a connection that stays
usable, where aiohttp would fail the stream and drop the connection after answering.
"""

from __future__ import annotations

import zlib
from typing import Any

import orjson
from aiohttp import web

# Decoded bodies are bounded like raw ones: a small gzip must not inflate without limit.
MAX_DECODED_BYTES = 64 * 1024 * 1024
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class BodyError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def read_body(request: web.Request) -> bytes:
    raw = await request.read()
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return raw
    wbits = _WBITS.get(encoding)
    if wbits is None:
        raise BodyError(f"unsupported Content-Encoding {encoding!r}")
    decoder = zlib.decompressobj(wbits)
    try:
        body = decoder.decompress(raw, MAX_DECODED_BYTES)
    except zlib.error as exc:
        raise BodyError(f"request body could not be decoded as {encoding}: {exc}") from exc
    if decoder.unconsumed_tail:
        raise BodyError(f"decoded request body exceeds {MAX_DECODED_BYTES} bytes")
    if not decoder.eof:
        raise BodyError(f"request body is a truncated {encoding} stream")
    return body


async def read_json(request: web.Request) -> Any:
    raw = await read_body(request)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BodyError(f"request body is not valid JSON: {exc}") from exc


async def read_json_object(request: web.Request) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BodyError("request body must be a JSON object")
    return body
