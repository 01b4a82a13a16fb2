from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import anyio
import pytest
from conftest import (
    PROJECT,
    WAIT_S,
    MakeClient,
    PlaymentClient,
    StartEmulator,
    introspect,
    point_cloud_body,
)

from harvester.emulator.faults import FaultBook
from harvester.emulator.ratelimit import TokenBucket
from harvester.emulator.scenario import parse_fault

pytestmark = pytest.mark.anyio
RATE_LIMITED = {"success": False, "error": {"code": "api_error", "message": "rate limit exceeded"}}


async def _raw_get(api: PlaymentClient, path: str) -> tuple[int, dict[str, str], Any]:
    async with api.session.get(api.base + path, headers=api.headers) as r:
        return r.status, dict(r.headers), await r.json(content_type=None)


async def _until_429(api: PlaymentClient) -> tuple[dict[str, str], Any]:
    for _ in range(20):  # burst is 2: the third request must already be limited
        status, headers, body = await _raw_get(api, f"/v1/projects/{PROJECT}/jobs/nope")
        if status == 429:
            return headers, body
    raise AssertionError("never rate limited")


async def test_rate_limit_answers_429_with_retry_after_seconds(make_client: MakeClient) -> None:
    api = await make_client({"playment": {"rate_limit": {"rate_per_s": 0.5, "burst": 2}}})
    headers, body = await _until_429(api)
    assert body == RATE_LIMITED
    assert headers["Retry-After"].isdigit() and 1 <= int(headers["Retry-After"]) <= 2
    stats = await api.introspect("GET", "/stats")
    assert stats["playment"]["rate_limited"] >= 1
    assert stats["playment"]["requests_by_status"]["429"] >= 1
    assert "storage" not in {r["provider"] for r in await api.introspect("GET", "/requests")}


async def test_rate_limit_retry_after_as_http_date(make_client: MakeClient) -> None:
    api = await make_client(
        {"playment": {"rate_limit": {"rate_per_s": 0.5, "burst": 2, "retry_after": "http-date"}}}
    )
    headers, body = await _until_429(api)
    assert body == RATE_LIMITED
    when = email.utils.parsedate_to_datetime(headers["Retry-After"])
    wait = (when - datetime.now(UTC)).total_seconds()
    assert 0 < wait <= 4


async def test_rate_limit_without_retry_after(make_client: MakeClient) -> None:
    api = await make_client(
        {"playment": {"rate_limit": {"rate_per_s": 0.5, "burst": 1, "retry_after": "none"}}}
    )
    headers, _ = await _until_429(api)
    assert "Retry-After" not in headers


async def test_runtime_429_storm_starts_when_asked(api: PlaymentClient) -> None:
    job_id = await api.create_job("storm-1")
    answer = await api.introspect(
        "POST", "/faults", json={"kind": "429", "retry_after_s": 3, "count": 2}
    )
    assert answer["ok"] is True and answer["fault"]["count"] == 2
    for _ in range(2):
        status, headers, body = await _raw_get(api, f"/v1/projects/{PROJECT}/jobs/{job_id}")
        assert (status, headers.get("Retry-After"), body) == (429, "3", RATE_LIMITED)
    status, _, _ = await _raw_get(api, f"/v1/projects/{PROJECT}/jobs/{job_id}")
    assert status == 200
    stats = await api.introspect("GET", "/stats")
    assert stats["playment"]["faults"] == {"429": 2}
    assert stats["playment"]["rate_limited"] == 2
    faults = await api.introspect("GET", "/faults")
    assert faults[0]["fired"] == 2


async def test_runtime_fault_is_validated(api: PlaymentClient) -> None:
    origin = api.base.removesuffix("/playment")
    async with api.session.post(f"{origin}/_emulator/faults", json={"kind": "lag"}) as r:
        assert r.status == 400 and "kind" in (await r.json())["error"]
    async with api.session.post(
        f"{origin}/_emulator/faults", json={"kind": "429", "delay_s": 1}
    ) as r:
        assert r.status == 400 and "delay_s" in (await r.json())["error"]


async def test_5xx_fault_uses_the_error_envelope(api: PlaymentClient) -> None:
    await api.introspect("POST", "/faults", json={"kind": "5xx", "status": 502, "count": 1})
    status, _, body = await _raw_get(api, f"/v1/projects/{PROJECT}/jobs/x")
    assert status == 502 and body["success"] is False and body["error"]["code"] == "api_error"


async def test_reset_after_create_loses_the_answer_but_not_the_job(api: PlaymentClient) -> None:
    await api.introspect(
        "POST", "/faults", json={"kind": "reset", "when": "after", "match": "/jobs", "count": 1}
    )
    with pytest.raises(aiohttp.ClientError):
        await api.create(point_cloud_body("lost-1"))
    status, doc = await api.create(point_cloud_body("lost-1"))  # a blind retry
    assert status == 400 and doc["error"]["code"] == "FS_0001"
    log = await api.introspect("GET", "/requests")
    assert [(r["status"], r["fault"]) for r in log] == [(0, "reset"), (400, None)]
    stats = await api.introspect("GET", "/stats")
    assert stats["playment"]["max_jobs_per_reference"] == 1


async def test_reset_before_handling_creates_nothing(api: PlaymentClient) -> None:
    await api.introspect("POST", "/faults", json={"kind": "reset", "count": 1})
    with pytest.raises(aiohttp.ClientError):
        await api.create(point_cloud_body("never-1"))
    assert (await api.create(point_cloud_body("never-1")))[0] == 200


async def test_truncated_download_and_slow_answers(make_client: MakeClient) -> None:
    api = await make_client({"playment": {"job_duration_s": 0}})
    done = await api.wait_completed(await api.create_job("trunc-1"))
    _, location = await api.resolve(done["result"])
    assert location is not None
    await api.introspect(
        "POST", "/faults", json={"kind": "truncate", "provider": "storage", "count": 1}
    )
    with pytest.raises(aiohttp.ClientPayloadError):
        async with api.session.get(location) as r:
            await r.read()
    async with api.session.get(location) as r:
        assert r.status == 200 and len(await r.read()) == int(r.headers["Content-Length"])

    await api.introspect("POST", "/faults", json={"kind": "slow", "delay_s": 0.2, "count": 1})
    t0 = time.monotonic()
    await api.job(done["job_id"])
    assert time.monotonic() - t0 >= 0.2


async def test_scenario_fault_windows_count_from_start(make_client: MakeClient) -> None:
    api = await make_client({"faults": [{"kind": "5xx", "start_s": 0.2, "duration_s": 0.3}]})
    path = f"/v1/projects/{PROJECT}/jobs/x"
    seen: list[int] = []
    with anyio.fail_after(WAIT_S):
        while 404 not in seen or 503 not in seen or seen[-1] != 404:
            seen.append((await _raw_get(api, path))[0])
            await anyio.sleep(0.02)
    assert seen[0] == 404 and 503 in seen
    first_503 = seen.index(503)
    assert all(s == 503 for s in seen[first_503 : seen.index(404, first_503)])


async def test_request_log_and_reset_stats(api: PlaymentClient) -> None:
    await api.create_job("log-1")
    log = await api.introspect("GET", "/requests")
    assert log[0]["provider"] == "playment" and log[0]["method"] == "POST"
    assert log[0]["path"] == f"/playment/v1/projects/{PROJECT}/jobs"
    assert log[0]["status"] == 200 and isinstance(log[0]["t"], float)
    await api.job((await api.create(point_cloud_body("log-2")))[1]["data"]["job_id"])
    assert [r["i"] for r in await api.introspect("GET", "/requests?since=1")] == [1, 2]
    await api.introspect("POST", "/reset-stats")
    assert await api.introspect("GET", "/requests") == []
    stats = await api.introspect("GET", "/stats")
    assert stats["playment"]["creates"] == 0 and stats["playment"]["jobs"] == 2


def test_fault_book_is_reproducible_and_windowed() -> None:
    now = [100.0]

    def fired(seed: int) -> list[bool]:
        now[0] = 100.0  # windows count from add()
        book = FaultBook(seed, clock=lambda: now[0])
        book.add(parse_fault({"kind": "5xx", "probability": 0.5, "start_s": 1, "duration_s": 2}))
        out: list[bool] = []
        for t in (100.5, 101.0, 101.5, 102.0, 102.5, 103.0, 103.5):
            now[0] = t
            out.extend(book.decide("playment", "/p").fault is not None for _ in range(10))
        return out

    a = fired(1)
    assert a == fired(1) and a != fired(2)
    assert not any(a[:10]) and not any(a[-20:])  # outside [101, 103)
    assert 5 < sum(a[10:50]) < 35


def test_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(2.0, 3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)
    now[0] = 0.5
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("provider", "path", "error_of"),
    [
        ("cognite", "/api/v1/projects/p/context/vision/segment/1", lambda d: d["error"]["code"]),
        ("bentley", "/reality-analysis/jobs/x", lambda d: d["error"]["code"]),
        ("modzy", "/api/jobs/x", lambda d: d["status"]),
    ],
)
async def test_faults_reach_every_provider_in_its_own_envelope(
    start_emulator: StartEmulator,
    session: aiohttp.ClientSession,
    provider: str,
    path: str,
    error_of: Callable[[Any], object],
) -> None:
    emu = await start_emulator()
    await introspect(
        emu, session, "POST", "/faults", json={"kind": "5xx", "provider": provider, "count": 1}
    )
    async with session.get(emu.urls[provider] + path) as r:
        assert r.status == 503
        assert error_of(await r.json()) in (503, "ServiceUnavailable", "SERVICE_UNAVAILABLE")
    async with session.get(emu.urls[provider] + path) as r:
        assert r.status == 401  # the fault is spent; no credentials were sent
    stats = await introspect(emu, session, "GET", "/stats")
    assert stats[provider]["faults"] == {"5xx": 1}
