"""Time bounds that do not depend on the server's goodwill.

- A download trickled a byte at a time: only the gap between chunks used to be timed, so a
  body sent one byte every 0.1 s held a download as long as the server liked. Now the whole
  body must arrive by ``request_timeout_s + bytes / min_bytes_per_s``: the job ends in error
  ("too slow") after its bounded resumes, in seconds instead of the trickle's 30 s.
- An API answer trickled the same way is cut at ``request_timeout_s`` for the whole exchange.
- ``harvest --timeout`` with a request queued behind a gate closed for a day
  (``Retry-After: 86400``): the drain's grace (30 s) used to wait for that request, which had
  not even been sent. Now requests not sent yet are dropped at once: the process exits soon
  after its timeout, with the job as it was (exit 3; a rerun continues).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from aiohttp import web

from harvester.clock import FakeClock, SystemClock
from harvester.config import PlaymentConfig, SecretRef
from harvester.credentials import make_auth
from harvester.errors import NetworkError, NotSent
from harvester.jobs import JobState
from harvester.logs import configure
from harvester.metrics import Metrics
from harvester.ratelimit import ProviderLimiter
from harvester.transport import Transport
from harvester.wire import RequestSpec
from tests.badinput.helpers import SECRET_ENV
from tests.badinput.hostile import GOOD_JOBS, Case, harvest_through, trickle
from tests.integration.helpers import config_toml
from tests.loopback import serving

REPO = Path(__file__).resolve().parents[2]
#: a valid mask of 300 bytes, sent one byte every 0.1 s: 30 s for the whole body
TRICKLED_MASK = (b"[" + b"1, " * 100)[:299] + b"]"
TRICKLE_S = 0.1


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    configure("warning", "json")


@pytest.mark.anyio
@pytest.mark.usefixtures("secrets_env")
async def test_trickled_download_is_cut_by_its_body_deadline(tmp_path: Path) -> None:
    case = Case("mask-trickle", "playment", "mask-file", serve=trickle(TRICKLED_MASK,
                every_s=TRICKLE_S))  # fmt: skip
    run = await harvest_through(
        tmp_path,
        [case],
        provider_settings={"request_timeout_s": 0.5, "min_bytes_per_s": 100},
        harvest_settings={"max_attempts": 1},
        within_s=60,
    )
    bad = run.jobs[f"playment/{case.key}"]
    assert bad.state == JobState.ERROR, (bad.state, bad.reason)
    reason = bad.reason or ""
    for fragment in ("labels/f-001.npy too slow", "providers.playment.min_bytes_per_s = 100"):
        assert fragment in reason, reason
    # One download and its 5 resumes, each cut after about a second: far below the 30 s
    # the trickle takes to finish (what every attempt used to wait for).
    assert run.served[case.id] == 6, run.served
    assert run.elapsed_s < 20, run.elapsed_s
    for good in GOOD_JOBS:
        job = run.jobs[f"{good.provider}/{good.key}"]
        assert job.state == JobState.HARVESTED, (job.label, job.reason)


@pytest.fixture
async def slow_api() -> AsyncIterator[str]:
    """A Playment API whose every answer trickles in at 20 bytes a second."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = b'{"success": true, "data": {"status": "in_progress"}}' + b" " * 200
        return await trickle(body, every_s=0.05)(request)

    async with serving(handle) as origin:
        yield origin


@pytest.mark.anyio
@pytest.mark.usefixtures("secrets_env")
async def test_trickled_api_answer_is_cut_at_request_timeout(slow_api: str) -> None:
    """Already true before the download fix (the API's ``request_timeout_s`` is a total):
    kept so the two kinds of body stay bounded alike."""
    key = SecretRef("providers.playment.api_key", env="BI_PLAYMENT_KEY")
    cfg = PlaymentConfig(
        name="playment",
        base_url=slow_api,
        api_key=key,
        project_id="p",
        request_timeout_s=0.5,
        max_retries=0,
    )
    clock = SystemClock()
    limiter = ProviderLimiter("playment", rate_per_s=0, burst=1, max_concurrency=1, clock=clock)
    async with Transport(
        cfg,
        auth=make_auth(cfg),
        limiter=limiter,
        clock=clock,
        metrics=Metrics(),
    ) as transport:
        started = anyio.current_time()
        with pytest.raises(NetworkError, match="timed out"):
            await transport.call(RequestSpec("GET", f"{slow_api}/v1/x", "poll"), lambda r: r)
        assert anyio.current_time() - started < 2.0


# -- shutdown with a request queued behind a closed gate ------------------------------------

GRACE_S = 30.0
TIMEOUT_S = 1.0


@pytest.fixture
async def throttling_api() -> AsyncIterator[tuple[str, list[str]]]:
    """A Playment API that answers every request 429 with ``Retry-After: 86400``."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(f"{request.method} {request.path}")
        return web.json_response(
            {"success": False, "error": {"code": "rate_limited", "message": "slow down"}},
            status=429,
            headers={"Retry-After": "86400"},
        )

    async with serving(handle) as origin:
        yield f"{origin}/playment", seen


@pytest.mark.anyio
async def test_timeout_does_not_wait_for_requests_behind_a_closed_gate(
    tmp_path: Path, throttling_api: tuple[str, list[str]]
) -> None:
    base_url, seen = throttling_api
    config = tmp_path / "harvester.toml"
    playment = {
        "base_url": base_url,
        "api_key_env": "BI_PLAYMENT_KEY",
        "project_id": "p",
        "batch_id": "b",
        "max_retries": 5,
    }
    config.write_text(
        config_toml(server={"drain_grace_s": GRACE_S}, providers={"playment": playment})
    )
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"provider": "playment", "job_id": "j-1"}\n')
    env = {**os.environ, **SECRET_ENV}
    started = anyio.current_time()
    with anyio.fail_after(GRACE_S + 30):
        done = await anyio.run_process(
            [sys.executable, "-m", "harvester.cli", "harvest", "-c", str(config), str(jobs),
             "--timeout", str(TIMEOUT_S), "--no-progress", "--json"],
            env=env, cwd=REPO, check=False,
        )  # fmt: skip
    elapsed = anyio.current_time() - started
    assert done.returncode == 3, done.stderr.decode()[-2000:]
    # The poll went out once, got its 429, and its retry queued behind the day-long gate. A
    # drain waiting for it would take TIMEOUT_S + GRACE_S; dropping it takes no time (the
    # rest is the interpreter starting and stopping).
    assert seen == ["GET /playment/v1/projects/p/jobs/j-1"], seen
    assert elapsed < TIMEOUT_S + 8, elapsed
    # ... and the job is as it was: running, to be polled by the next run.
    summary = json.loads(done.stdout)
    assert summary["interrupted"] is True
    assert summary["providers"] == {"playment": {"running": 1}}, summary


@pytest.mark.anyio
async def test_stop_drops_what_cannot_start_before_the_deadline_at_once() -> None:
    """The limiter on its own, on an injected clock, told at t0 that the process stops at
    t0 + 30 s: the requests queued behind a day-long gate and a retry whose backoff ends after
    the deadline get ``NotSent`` at once, the clock not moved at all; a backoff that ends in
    time sleeps on and its request goes out; a request admissible now goes ahead (the next
    request of a harvest still in flight)."""
    clock = FakeClock()
    gated = ProviderLimiter("gated", rate_per_s=0, burst=1, max_concurrency=4, clock=clock)
    gated.close_gate(86_400.0)
    free = ProviderLimiter("free", rate_per_s=0, burst=1, max_concurrency=4, clock=clock)
    outcomes: dict[str, str] = {}
    t0 = clock.monotonic()

    async def queued(name: str) -> None:
        try:
            async with gated.slot():
                outcomes[name] = "sent"
        except NotSent:
            outcomes[name] = f"dropped at +{clock.monotonic() - t0:g}"

    async def backing_off(name: str, delay: float) -> None:
        try:
            await free.pause_until(t0 + delay)
            outcomes[name] = f"woke at +{clock.monotonic() - t0:g}"
        except NotSent:
            outcomes[name] = f"dropped at +{clock.monotonic() - t0:g}"

    async with anyio.create_task_group() as tg:
        tg.start_soon(queued, "gate-1")
        tg.start_soon(queued, "gate-2")
        tg.start_soon(backing_off, "backoff-60", 60.0)
        tg.start_soon(backing_off, "backoff-5", 5.0)
        await clock.settle()
        assert outcomes == {} and gated.stats().waiting == 2
        gated.stop(t0 + 30.0)
        free.stop(t0 + 30.0)
        await clock.settle()
        assert outcomes == {
            "gate-1": "dropped at +0",
            "gate-2": "dropped at +0",
            "backoff-60": "dropped at +0",
        }
        await clock.advance_to_next()
    assert outcomes["backoff-5"] == "woke at +5"
    async with free.slot():
        pass  # admissible now: not dropped
    with pytest.raises(NotSent):
        async with gated.slot():
            pass
