"""The status page's parts without a browser: sessions, the login and cookie rules over real
HTTP (an in-process API on 127.0.0.1), the gate snapshot, throughput and escaping."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp.test_utils import TestServer

from harvester.api import Api
from harvester.clock import FakeClock
from harvester.config import parse_config
from harvester.engine import Engine
from harvester.jobs import JobState
from harvester.metrics import Metrics
from harvester.ratelimit import ProviderLimiter
from harvester.statuspage import Throughput, gate_document, iso, render_page
from harvester.store.sqlite import SqliteStore
from harvester.websession import COOKIE, SESSION_S, Sessions

TOKEN = "s3cret-token-for-the-status-page"
NOW = 1_700_000_000.0
STATES = [s.value for s in JobState]


# -- sessions ------------------------------------------------------------------------------
def test_a_session_is_derived_from_the_token_and_expires() -> None:
    sessions = Sessions(TOKEN)
    value = sessions.issue(NOW)
    assert TOKEN not in value
    assert sessions.valid(value, NOW + SESSION_S - 1)
    assert not sessions.valid(value, NOW + SESSION_S)  # expired
    assert not Sessions("another token").valid(value, NOW)  # the token changed
    expires, _, mac = value.partition(".")
    assert not sessions.valid(f"{int(expires) + 3600}.{mac}", NOW)  # a later expiry, forged
    assert not sessions.valid(f"{expires}.{'0' * len(mac)}", NOW)
    for junk in (None, "", "x", ".", "1e99.ab", "-5.ab", "9" * 40 + ".ab"):
        assert not sessions.valid(junk, NOW)
    # Every replica derives the same: a session works whichever one answers.
    assert Sessions(TOKEN).valid(value, NOW)


# -- the routes -----------------------------------------------------------------------------
@pytest.fixture
async def api_server(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    token = getattr(request, "param", TOKEN)
    config = parse_config(
        {
            "store": {"url": "sqlite://state.db"},
            "providers": {
                "playment": {
                    "base_url": "http://127.0.0.1:9/never-contacted",
                    "api_key_env": "UNUSED_KEY",
                    "project_id": "p",
                }
            },
        },
        source=tmp_path / "config.toml",
    )
    store = SqliteStore(tmp_path / "state.db")
    await store.open()
    engine = Engine(config, store, burst=False)
    api = Api(
        config=config,
        store=store,
        engine=engine,
        stopping=lambda: False,
        jobs_added=lambda: None,
        token=token,
    )
    server = TestServer(api.build_app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()
        await store.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=10), cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as s:
        yield s


async def login(client: aiohttp.ClientSession, base: str, token: str, **kw: Any) -> Any:
    return await client.post(base + "/login", data={"token": token}, allow_redirects=False, **kw)


@pytest.mark.anyio
async def test_the_login_form_trades_the_token_for_a_cookie(
    api_server: str, client: aiohttp.ClientSession
) -> None:
    base = api_server
    async with client.get(base + "/", allow_redirects=False) as r:
        assert (r.status, r.headers["Location"]) == (303, "/login")
    async with client.get(base + "/login") as r:
        assert r.status == 200 and 'name="token"' in await r.text()
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]

    async with await login(client, base, "wrong") as r:
        assert r.status == 401 and "Wrong token" in await r.text()
        assert "Set-Cookie" not in r.headers
    async with await login(client, base, TOKEN, headers={"Origin": "http://evil.example"}) as r:
        assert r.status == 403 and "Set-Cookie" not in r.headers
    # A token in the URL opens nothing: it would land in logs.
    async with client.get(base + f"/?token={TOKEN}", allow_redirects=False) as r:
        assert r.status == 303
    async with client.get(base + f"/status.json?token={TOKEN}") as r:
        assert r.status == 401

    async with await login(client, base, TOKEN, headers={"Origin": base}) as r:
        assert (r.status, r.headers["Location"]) == (303, "/")
        set_cookie = r.headers["Set-Cookie"]
    assert re.search(r"(?i)\bHttpOnly\b", set_cookie) and "SameSite=Strict" in set_cookie
    assert "Path=/" in set_cookie and TOKEN not in set_cookie
    assert "Secure" not in set_cookie  # plain HTTP here: a Secure cookie would not be kept

    async with client.get(base + "/") as r:
        assert r.status == 200 and 'id="providers"' in await r.text()
    async with client.get(base + "/status.json") as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["providers"][0]["name"] == "playment" and doc["failures"] == []
    # The cookie opens the status page only, not the job API.
    async with client.get(base + "/jobs/playment/x") as r:
        assert r.status == 401

    # Behind a proxy that ends TLS: the browser's origin is https, the cookie gets Secure.
    async with await login(
        client,
        base,
        TOKEN,
        headers={"Origin": base.replace("http://", "https://"), "X-Forwarded-Proto": "https"},
    ) as r:
        assert r.status == 303 and "Secure" in r.headers["Set-Cookie"]

    async with client.post(base + "/logout", allow_redirects=False) as r:
        assert r.status == 303
    async with client.get(base + "/", allow_redirects=False) as r:
        assert r.status == 303


@pytest.mark.anyio
async def test_a_forged_cookie_opens_nothing_and_the_bearer_header_still_does(
    api_server: str, client: aiohttp.ClientSession
) -> None:
    base = api_server
    forged = Sessions("not the token").issue(NOW + 10**6)
    async with client.get(base + "/status.json", cookies={COOKIE: forged}) as r:
        assert r.status == 401
    async with client.get(base + "/status.json", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        assert r.status == 200


@pytest.mark.anyio
@pytest.mark.parametrize("api_server", [None], indirect=True)
async def test_without_a_token_the_page_is_open_like_the_job_routes(
    api_server: str, client: aiohttp.ClientSession
) -> None:
    async with client.get(api_server + "/") as r:
        page = await r.text()
        assert r.status == 200 and "Log out" not in page
    async with client.get(api_server + "/login", allow_redirects=False) as r:
        assert (r.status, r.headers["Location"]) == (303, "/")
    async with client.get(api_server + "/static/status.js") as r:
        assert r.status == 200 and r.content_type == "text/javascript"
    async with client.get(api_server + "/static/..%2Fapi.py") as r:
        assert r.status == 404


# -- the gate, rates, escaping --------------------------------------------------------------
def test_the_gate_snapshot_says_until_when_and_why() -> None:
    clock = FakeClock()
    limiter = ProviderLimiter("p", rate_per_s=0, burst=1, max_concurrency=4, clock=clock)
    assert gate_document(limiter.gate_state(), clock.wall())["open"] is True
    limiter.close_gate(30.0, status=429)
    clock.advance(10)
    doc = gate_document(limiter.gate_state(), clock.wall())
    assert not doc["open"] and doc["seconds_left"] == 20.0
    assert doc["why"] == "429 with Retry-After 30 s" and doc["status"] == 429
    assert doc["until"] == iso(NOW + 30)  # the wall time of the deadline
    clock.advance(20)
    doc = gate_document(limiter.gate_state(), clock.wall())
    assert doc["open"] and doc["probing"] and doc["why"] == "429 with Retry-After 30 s"
    # Without Retry-After (Cognite) the delay was our backoff, and the page says so.
    limiter.close_gate(None, status=503)
    doc = gate_document(limiter.gate_state(), clock.wall())
    assert doc["why"].startswith("503 without Retry-After: backoff ") and not doc["open"]


def test_throughput_is_measured_over_the_last_minute() -> None:
    clock = FakeClock()
    metrics = Metrics()
    throughput = Throughput(metrics, clock)
    assert throughput.rates() == (0.0, {})  # no time has passed: no rate yet
    for _ in range(12):
        clock.advance(5)
        metrics.requests.labels("p", "poll", "200").inc(50)  # 10 requests/s
        metrics.transitions.labels("p", "harvested").inc(1)  # 12 jobs/min
        metrics.transitions.labels("p", "running").inc(7)  # not a harvest
        throughput.sample()
    clock.advance(5)
    metrics.requests.labels("p", "poll", "200").inc(50)
    metrics.transitions.labels("p", "harvested").inc(1)
    window, rates = throughput.rates()
    assert 60 <= window <= 65
    assert rates["p"] == pytest.approx((10.0, 12.0))


@pytest.mark.anyio
async def test_throughput_samples_every_sample_s_of_its_clock() -> None:
    clock = FakeClock()
    throughput = Throughput(Metrics(), clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(throughput.run)
        await clock.run_until(clock.monotonic() + 70)
        # Samples at 5, 10, ... 70 s: the window is the last minute, not all 70 s.
        assert throughput.rates()[0] == 60
        tg.cancel_scope.cancel()


def test_everything_on_the_page_is_escaped() -> None:
    evil = "<script>alert(1)</script>"
    doc: dict[str, Any] = {
        "generated_at": evil,
        "version": evil,
        "ready": False,
        "not_ready_reason": evil,
        "uptime_s": 1.0,
        "counts_available": True,
        "window_s": 0.0,
        "providers": [
            {
                "name": evil,
                "configured": True,
                "counts": dict.fromkeys(STATES, 0),
                "total": 0,
                "active": 0,
                "requests_per_s": None,
                "harvested_per_min": None,
                "gate": {
                    "open": False,
                    "until": evil,
                    "seconds_left": 5.0,
                    "probing": False,
                    "why": evil,
                },
                "in_flight": 0,
                "queued": 0,
            }
        ],
        "totals": dict.fromkeys(STATES, 0),
        "requests_per_s": None,
        "harvested_per_min": None,
        "failures": [
            {"updated_at": evil, "provider": evil, "key": evil, "state": evil, "reason": evil}
        ],
        "replica": evil,
        "replicas": [
            {
                "id": evil,
                "host": evil,
                "this": True,
                "live": True,
                "started_at": evil,
                "heartbeat_s_ago": 1.0,
                "lease_s_left": 2.0,
                "held_jobs": 3,
            }
        ],
    }
    page = render_page(doc, logout=True)
    assert "<script>alert" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 12
    assert page.count("<script") == 1  # the page's own, from /static
