"""Log redaction: credentials and signed-URL query strings never reach a sink."""

from __future__ import annotations

import io
import logging
import sys

import orjson
import pytest

from harvester.logs import Throttle, configure, get_logger, redact_text


def test_redact_text_drops_query_strings() -> None:
    text = "GET http://h:1/a/b.txt?X-Amz-Signature=abc&X-Amz-Date=1 failed; see https://x/y?sig=2"
    out = redact_text(text)
    assert "abc" not in out and "sig=2" not in out
    assert "http://h:1/a/b.txt?***" in out and "https://x/y?***" in out


def test_logged_events_are_redacted() -> None:
    buf = io.StringIO()
    configure("debug", "json", stream=buf)
    log = get_logger("t")
    log.info(
        "request",
        url="http://storage/x?X-Amz-Signature=SECRETSIG",
        headers={"x-api-key": "KEYMARKER", "Accept": "json"},
        authorization="Bearer TOKENMARKER",
        client_secret="CS",
        nested=[{"Authorization": "ApiKey K2"}],
    )
    line = buf.getvalue()
    for marker in ("SECRETSIG", "KEYMARKER", "TOKENMARKER", "ApiKey K2", '"CS"'):
        assert marker not in line
    event = orjson.loads(line)
    assert event["headers"]["Accept"] == "json"
    assert event["url"] == "http://storage/x?***"


def test_the_throttle_lets_a_burst_through_then_counts_what_it_drops() -> None:
    now = [0.0]
    throttle = Throttle(burst=2, window_s=10.0, clock=lambda: now[0])
    assert [throttle.admit("a") for _ in range(5)] == [0, 0, None, None, None]
    assert throttle.admit("b") == 0  # another key has its own budget
    now[0] = 9.9
    assert throttle.admit("a") is None
    now[0] = 10.0  # the first two have left the window: the next line says 4 were dropped
    assert throttle.admit("a") == 4
    assert throttle.admit("a") == 0
    assert throttle.admit("a") is None


def test_library_log_records_become_json_lines_without_tracebacks() -> None:
    buf = io.StringIO()
    configure("info", "json", stream=buf)
    try:
        raise OSError(24, "Too many open files")
    except OSError:
        for _ in range(50):  # asyncio logs this for every failed accept()
            logging.getLogger("asyncio").error(
                "socket.accept() out of system resource", exc_info=True
            )
    logging.getLogger("aiohttp.access").info("not shown: below warning")
    lines = buf.getvalue().splitlines()
    events = [orjson.loads(line) for line in lines]  # every line is JSON
    assert len(events) == 5, events  # the default throttle: 5 a minute per message
    assert events[0]["event"] == "socket.accept() out of system resource"
    assert events[0]["logger"] == "asyncio" and events[0]["level"] == "error"
    assert events[0]["error"] == "OSError: [Errno 24] Too many open files"
    assert "Traceback" not in buf.getvalue()


def test_default_logging_follows_sys_stderr_when_it_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Configured while one stderr was in place, logging writes to the stderr of the moment:
    the one it saw at configure time may be closed since (it was, by pytest's capture, and
    every later log line raised ``ValueError: I/O operation on closed file``)."""
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure("info", "json")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    get_logger("t").info("after the swap")
    assert orjson.loads(second.getvalue())["event"] == "after the swap"
