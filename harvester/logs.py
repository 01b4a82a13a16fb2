"""Structured logging: structlog, JSON lines off a terminal, with secrets redacted.

The redaction processor runs before any renderer, so no sink (console, JSON, a test's
capture) ever sees a credential header or a signed URL's query string.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

_SECRET_KEYS = re.compile(
    r"(authorization|x-api-key|api[_-]?key|secret|password|token|cookie|signature)", re.I
)
# A URL with a query string: the query of a signed URL is its credential.
_URL_QUERY = re.compile(r"(https?://[^\s?#\"']+)\?[^\s#\"']*")
REDACTED = "***"


def redact_text(text: str) -> str:
    """Drop the query string of every URL in ``text``."""
    return _URL_QUERY.sub(lambda m: f"{m.group(1)}?{REDACTED}", text)


def _redact(value: Any, depth: int = 0) -> Any:
    if depth > 6:
        return value
    if isinstance(value, str):
        return redact_text(value) if "?" in value else value
    if isinstance(value, Mapping):
        return {
            k: (
                REDACTED if isinstance(k, str) and _SECRET_KEYS.search(k) else _redact(v, depth + 1)
            )
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(v, depth + 1) for v in value]
    return value


def redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        if key == "event":
            event_dict[key] = _redact(event_dict[key])
        elif _SECRET_KEYS.search(key) and key not in ("token_url",):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact(event_dict[key])
    return event_dict


def _orjson_dumps(obj: Any, **_kw: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog: JSON lines unless ``fmt`` is console (or auto on a tty)."""
    out = stream or sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if use_console
        else structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_processor,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
