"""Log redaction: credentials and signed-URL query strings never reach a sink."""

from __future__ import annotations

import io

import orjson

from harvester.logs import configure, get_logger, redact_text


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
