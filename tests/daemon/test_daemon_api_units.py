"""The API's pure helpers, without a daemon: body shapes, error lines, timestamps, caching."""

from __future__ import annotations

import json

import anyio
import pytest

from harvester.api import BadBody, Cached, body_as_json_lines, iso, line_errors
from harvester.clock import FakeClock
from harvester.errors import JobsFileError


def test_an_array_becomes_one_line_per_item_exactly_as_sent() -> None:
    body = b' [\n {"a": 1,\n  "a": 2},\n [1, 2],\n "x"\n ] \n'
    lines = body_as_json_lines(body).split(b"\n")
    assert lines == [b'{"a": 1,   "a": 2}', b"[1, 2]", b'"x"']  # the duplicate key survives
    assert body_as_json_lines(b"[]") == b""
    jsonl = b'{"a": 1}\n{"b": 2}\n'
    assert body_as_json_lines(jsonl) is jsonl


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[1, 2", "after item 2"),
        (b"[1 2]", "after item 1"),
        (b"[{]", "item 1 is not valid JSON"),
        (b"[1] 2", "after the JSON array"),
        (b"[\xff]", "not UTF-8"),
    ],
)
def test_a_broken_array_is_refused_before_any_job(body: bytes, message: str) -> None:
    with pytest.raises(BadBody, match=message):
        body_as_json_lines(body)


def test_line_errors_keep_the_line_numbers() -> None:
    exc = JobsFileError("request:2: bad one\nrequest:10: worse\nnothing from request was added")
    assert line_errors(exc) == [{"line": 2, "error": "bad one"}, {"line": 10, "error": "worse"}]


def test_timestamps_are_iso_8601_utc() -> None:
    assert iso(0.5) == "1970-01-01T00:00:00.500Z"
    assert iso(None) is None
    assert json.dumps(iso(1e9))  # a plain string


@pytest.mark.anyio
async def test_concurrent_probes_share_one_computation() -> None:
    clock = FakeClock()
    calls = 0
    release = anyio.Event()

    async def compute() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return calls

    cached = Cached(10.0, compute, clock)
    results: list[int] = []

    async def probe() -> None:
        results.append(await cached.get())

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(probe)
        await clock.settle()  # every probe is waiting: on the computation or its lock
        release.set()
    assert calls == 1 and results == [1] * 20
    clock.advance(9.9)
    assert await cached.get() == 1  # fresh for ttl seconds of its clock
    clock.advance(0.1)
    assert await cached.get() == 2  # expired: computed again
