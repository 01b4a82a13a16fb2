"""Small response builders shared by the emulator's apps."""

from __future__ import annotations

import email.utils
import math
import time
from typing import Any
from xml.sax.saxutils import escape

import orjson
from aiohttp import web

from harvester.emulator.scenario import RetryAfterFormat


def json_response(
    doc: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc), status=status, headers=headers, content_type="application/json"
    )


def retry_after_header(seconds: float, fmt: RetryAfterFormat) -> dict[str, str]:
    """``Retry-After`` as whole seconds (rounded up: never invite an early retry), as an
    HTTP-date, or not at all."""
    wait = max(0, math.ceil(seconds))
    if fmt == "seconds":
        return {"Retry-After": str(wait)}
    if fmt == "http-date":
        # HTTP-dates have whole-second resolution: round the deadline up, not down.
        deadline = math.ceil(time.time() + seconds)
        return {"Retry-After": email.utils.formatdate(deadline, usegmt=True)}
    return {}


def s3_error(
    status: int, code: str, message: str, extra: dict[str, str] | None = None
) -> web.Response:
    fields = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in (extra or {}).items())
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>{fields}"
        "<RequestId>EMULATOR</RequestId><HostId>emulator</HostId></Error>"
    )
    return web.Response(text=body, status=status, content_type="application/xml")
