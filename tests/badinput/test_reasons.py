"""Stored reasons are one short readable line (issue 13, item 15).

A Playment job says ``completed``, its results cannot be fetched, and when harvester polls
it again before the next attempt it says ``in_progress`` again (a provider reopening a job),
with a large document. (The first attempt works from the poll that saw the job finish, so only
a retry asks again.) It used to end in
error with the whole provider document in its reason as a Python repr (``Status(state=...,
document={...})``): tens of KB in the store, the API and ``harvester status``. The reason now
names the status the provider gave, and the document goes to the debug log only.
"""

from __future__ import annotations

import re
from pathlib import Path

import anyio
import orjson
import pytest
from aiohttp import web

from harvester.config import parse_config
from harvester.emulator.scenario import parse_scenario
from harvester.emulator.server import Emulator
from harvester.engine import Engine
from harvester.errors import REASON_MAX, brief
from harvester.jobs import JobState
from harvester.logs import configure
from harvester.store.base import NewJob
from harvester.store.sqlite import SqliteStore
from tests.integration.helpers import payload

from .helpers import SECRET_ENV
from .proxy import Malformed, Proxy

PADDING = "reopened-for-review " * 2000  #: a document of about 40 KB


class ReopeningProxy(Proxy):
    """Forwards everything; the marked job's status answers are the emulator's own until it
    has said ``completed`` once, then ``in_progress`` with a large document; its result file
    answers 500, so the harvest is retried and polls again."""

    completed_seen = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rid = self.remote.get("reopen")
        target = request.query.get("url", "")
        if rid is not None and request.path == "/playment/v1/attachments" and rid in target:
            return web.Response(status=500, text="results unavailable")
        poll = re.compile(rf"^/playment/v1/projects/[^/]+/jobs/{re.escape(rid or '-')}$")
        if rid is None or request.method != "GET" or not poll.match(request.path):
            return await super()._handle(request)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with self._session.get(self.upstream + str(request.rel_url), headers=headers) as r:
            doc = orjson.loads(await r.read())
        if doc["data"]["status"] == "completed":
            self.completed_seen += 1
            if self.completed_seen > 1:
                doc["data"]["status"] = "in_progress"
                doc["data"]["review_notes"] = PADDING
                self.served["reopen"] = self.served.get("reopen", 0) + 1
        return web.json_response(doc)


async def _run(root: Path) -> tuple[str | None, JobState, int]:
    sc = parse_scenario({"seed": 3, "playment": {"job_duration_s": 0.2, "points_per_frame": 300}})
    marker = b"reopened-job"
    case = Malformed("reopen", "playment", marker, "poll", b"")
    async with (
        Emulator(sc) as emu,
        ReopeningProxy(emu.urls["playment"].rsplit("/", 1)[0], [case]) as px,
    ):
        doc = {
            "store": {"url": "sqlite://state.db"},
            "output": {"dir": "out"},
            "harvest": {"max_attempts": 3},
            "providers": {
                "playment": {"base_url": px.url("playment"), "project_id": "reasons",
                             "api_key_env": "BI_PLAYMENT_KEY", "rate_per_s": 0,
                             "poll_min_s": 0.1, "poll_max_s": 0.2, "backoff_base_s": 0.05,
                             "backoff_max_s": 0.1},
            },
        }  # fmt: skip
        config = parse_config(doc, source=root / "config.toml")
        assert config.store.path is not None
        body = payload(1)
        body["data"]["note"] = marker.decode()
        async with SqliteStore(config.store.path) as store:
            await store.add_jobs(
                [NewJob("playment", "reopened", "reopened", None, body, "reasons")], now=0.0
            )
            with anyio.fail_after(60):
                await Engine(config, store).run()
            job = await store.get("playment", "reopened")
    assert job is not None
    return job.reason, job.state, px.served.get("reopen", 0)


def test_a_reopened_job_has_a_short_readable_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    configure("warning", "json")
    reason, state, served = anyio.run(_run, tmp_path)
    assert served >= 2, "the reopened status was never served"
    assert state == JobState.ERROR
    assert reason is not None
    assert len(reason) <= REASON_MAX and "\n" not in reason, reason
    assert "in_progress" in reason, reason
    for leak in ("reopened-for-review", "Status(", "document=", "{'"):
        assert leak not in reason, reason


def test_brief_makes_one_capped_line() -> None:
    assert brief("a\n  b\tc") == "a b c"
    long = brief("x" * (REASON_MAX * 3))
    assert len(long) == REASON_MAX and long.endswith("…")
