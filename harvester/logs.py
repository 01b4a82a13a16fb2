"""Structured logging: structlog, JSON lines off a terminal, with secrets redacted.

The redaction processor runs before any renderer, so no sink (console, JSON, a test's
capture) ever sees a credential header or a signed URL's query string.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, MutableMapping
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


def _redact_traceback(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    text = event_dict.get("exception")
    if isinstance(text, str):
        event_dict["exception"] = redact_text(text)
    return event_dict


class Throttle:
    """At most ``burst`` log lines per key in any ``window_s``: a flood of the same event (a
    port under attack, a disk that keeps failing) costs a few lines a minute, not megabytes.

    ``admit(key)`` answers None for a line to drop, else how many were dropped since the
    last one let through, so the line that is written can say so.
    """

    def __init__(
        self, burst: int = 5, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        self._sent: dict[Hashable, deque[float]] = {}
        self._dropped: dict[Hashable, int] = {}

    def admit(self, key: Hashable) -> int | None:
        now = self.clock()
        sent = self._sent.setdefault(key, deque())
        while sent and now - sent[0] >= self.window_s:
            sent.popleft()
        if len(sent) >= self.burst:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return None
        sent.append(now)
        return self._dropped.pop(key, 0)


class _StdlibBridge(logging.Handler):
    """Records of the standard ``logging`` module (asyncio, aiohttp's server) as structlog
    events: one JSON line each, the exception as its type and message instead of a
    traceback, throttled per logger and message."""

    def __init__(self, throttle: Throttle) -> None:
        super().__init__(logging.WARNING)
        self.throttle = throttle

    def emit(self, record: logging.LogRecord) -> None:
        try:
            suppressed = self.throttle.admit((record.name, str(record.msg)))
            if suppressed is None:
                return
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                fields["error"] = f"{type(exc).__name__}: {exc}"
            if suppressed:
                fields["suppressed"] = suppressed
            structlog.get_logger(record.name).log(record.levelno, record.getMessage(), **fields)
        except Exception:  # a logging failure must never become a traceback of its own
            pass


def _orjson_dumps(obj: Any, **_kw: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


class _CurrentStderr:
    """Whatever ``sys.stderr`` is when a line is written, not when logging was configured: a
    stream swapped in and closed later (a test runner's capture, a daemoniser) would
    otherwise turn every later log line into ``ValueError: I/O operation on closed file``."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog: JSON lines unless ``fmt`` is console (or auto on a tty)."""
    out: Any = stream or _CurrentStderr()
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if use_console
        else structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    )
    from harvester import tracing  # here: tracing imports this module

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            # only while tracing is on: off, a log line costs nothing more
            *([tracing.log_processor] if tracing.enabled() else []),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_processor,
            structlog.processors.format_exc_info,
            # A traceback is text made only now: a chained cause (an aiohttp error behind a
            # NetworkError) may name a signed URL, query and all.
            _redact_traceback,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    # Libraries log through the standard module; without a handler Python prints those
    # records (with tracebacks) as plain text, the one thing on stderr that is not JSON.
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibBridge)]:
        root.removeHandler(old)
    root.addHandler(_StdlibBridge(Throttle()))
    root.setLevel(max(logging.WARNING, logging.getLevelNamesMapping()[level.upper()]))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
