from __future__ import annotations

import base64
from typing import Any

import aiohttp
import pytest
from conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    StartEmulator,
    get_token,
    introspect,
    poll_until,
    token_request,
)

from harvester.emulator import Emulator
from harvester.emulator.tokens import TokenBook, Verdict

pytestmark = pytest.mark.anyio
GRANT = "client_credentials"
VALID = {"oauth": {"clients": {CLIENT_ID: CLIENT_SECRET}}}


async def _segment_status(emu: Emulator, session: aiohttp.ClientSession, token: str) -> int:
    url = f"{emu.urls['cognite']}/api/v1/projects/p/context/vision/segment/1"
    async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status


async def test_form_body_issues_a_bearer_token(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    emu = await start_emulator({"oauth": {"token_ttl_s": 120.5}})
    # Exactly what cognite-sdk sends: a form body, scopes space-joined, no Basic header.
    async with session.post(
        emu.urls["token"],
        data="grant_type=client_credentials&client_id=any-id&client_secret=any%20secret"
        "&scope=https%3A%2F%2Fx.cognitedata.com%2F.default+itwin-platform",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ) as r:
        assert r.status == 200
        assert r.headers["Cache-Control"] == "no-store"
        doc = await r.json()
    assert set(doc) == {"access_token", "token_type", "expires_in", "scope"}
    assert doc["token_type"] == "Bearer" and doc["expires_in"] == 120
    assert doc["scope"] == "https://x.cognitedata.com/.default itwin-platform"
    token = emu.state.tokens.check(doc["access_token"]).token
    assert token is not None and token.client_id == "any-id"
    assert token.scopes == {"https://x.cognitedata.com/.default", "itwin-platform"}
    assert await _segment_status(emu, session, doc["access_token"]) == 400  # auth passed
    stats = await introspect(emu, session, "GET", "/stats")
    assert stats["token"]["tokens_issued"] == 1 and stats["token"]["tokens_active"] == 1


async def test_basic_auth_is_accepted(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    emu = await start_emulator(VALID)
    creds = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    async with session.post(
        emu.urls["token"],
        data={"grant_type": GRANT},
        headers={"Authorization": f"Basic {creds}"},
    ) as r:
        assert r.status == 200
        assert "scope" not in await r.json()
    wrong = base64.b64encode(f"{CLIENT_ID}:nope".encode()).decode()
    async with session.post(
        emu.urls["token"], data={"grant_type": GRANT}, headers={"Authorization": f"Basic {wrong}"}
    ) as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
        assert (await r.json())["error"] == "invalid_client"


OK_CLIENT = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}


@pytest.mark.parametrize(
    ("form", "status", "error"),
    [
        ({"grant_type": GRANT, **OK_CLIENT, "client_secret": "wrong"}, 401, "invalid_client"),
        ({"grant_type": GRANT, **OK_CLIENT, "client_id": "stranger"}, 401, "invalid_client"),
        ({"grant_type": GRANT, "client_id": CLIENT_ID}, 401, "invalid_client"),
        ({"grant_type": GRANT, "client_secret": CLIENT_SECRET}, 401, "invalid_client"),
        ({"grant_type": "password", **OK_CLIENT}, 400, "unsupported_grant_type"),
        (OK_CLIENT, 400, "invalid_request"),
    ],
)
async def test_refusals_use_the_oauth_error_form(
    start_emulator: StartEmulator,
    session: aiohttp.ClientSession,
    form: dict[str, str],
    status: int,
    error: str,
) -> None:
    emu = await start_emulator(VALID)
    got, doc = await token_request(emu, session, **form)
    assert got == status
    assert set(doc) == {"error", "error_description"} and doc["error"] == error
    stats = await introspect(emu, session, "GET", "/stats")
    assert stats["token"]["auth_refusals_by_reason"] == {error: 1}
    assert stats["token"]["tokens_issued"] == 0


async def test_any_client_is_accepted_unless_the_scenario_names_them(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    emu = await start_emulator()
    status, _ = await token_request(
        emu, session, grant_type=GRANT, client_id="who", client_secret="ever"
    )
    assert status == 200


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"json": {"grant_type": GRANT}}, "x-www-form-urlencoded"),
        ({"data": "grant_type=client_credentials&grant_type=client_credentials"}, "repeated"),
    ],
)
async def test_malformed_token_requests_are_invalid_request(
    start_emulator: StartEmulator,
    session: aiohttp.ClientSession,
    kw: dict[str, Any],
    fragment: str,
) -> None:
    emu = await start_emulator()
    if "data" in kw:
        kw["headers"] = {"Content-Type": "application/x-www-form-urlencoded"}
    async with session.post(emu.urls["token"], **kw) as r:
        assert r.status == 400
        doc = await r.json()
    assert doc["error"] == "invalid_request" and fragment in doc["error_description"]


async def test_expired_and_revoked_tokens_are_refused(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    emu = await start_emulator({"oauth": {"token_ttl_s": 0.2}})
    short = await get_token(emu, session)
    assert await _segment_status(emu, session, short) == 400
    await poll_until(lambda: _segment_status(emu, session, short), lambda s: s == 401)

    emu2 = await start_emulator()
    token = await get_token(emu2, session)
    assert await _segment_status(emu2, session, token) == 400
    answer = await introspect(emu2, session, "POST", "/revoke-tokens")
    assert answer == {"ok": True, "revoked": 1}
    assert await _segment_status(emu2, session, token) == 401
    fresh = await get_token(emu2, session)  # revocation is not a ban: new tokens work
    assert await _segment_status(emu2, session, fresh) == 400
    stats = await introspect(emu2, session, "GET", "/stats")
    assert stats["cognite"]["auth_refusals_by_reason"] == {"revoked": 1}
    assert stats["token"]["revocations"] == 1


async def test_token_requests_are_rate_limited_and_faulted(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    emu = await start_emulator({"oauth": {"rate_limit": {"rate_per_s": 0.5, "burst": 2}}})
    form = {"grant_type": GRANT, "client_id": "a", "client_secret": "b"}
    statuses = []
    for _ in range(3):
        async with session.post(emu.urls["token"], data=form) as r:
            statuses.append(r.status)
            if r.status == 429:
                assert r.headers["Retry-After"].isdigit()
                assert (await r.json())["error"] == "temporarily_unavailable"
    assert statuses == [200, 200, 429]

    emu2 = await start_emulator()
    await introspect(
        emu2, session, "POST", "/faults", json={"kind": "5xx", "provider": "token", "count": 1}
    )
    status, doc = await token_request(emu2, session, **form)
    assert status == 503 and doc["error"] == "temporarily_unavailable"
    assert (await token_request(emu2, session, **form))[0] == 200
    stats = await introspect(emu2, session, "GET", "/stats")
    assert stats["token"]["requests"] == 2 and stats["token"]["faults"] == {"5xx": 1}


async def test_wrong_method_on_the_token_url(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    emu = await start_emulator()
    async with session.get(emu.urls["token"]) as r:
        assert r.status == 405 and (await r.json())["error"] == "invalid_request"


def test_token_book_verdicts() -> None:
    now = [10.0]
    book = TokenBook(5.0, clock=lambda: now[0])
    token = book.issue("c", frozenset({"s"}))
    assert book.check_header(None).verdict is Verdict.MISSING
    assert book.check_header("Basic abc").verdict is Verdict.MALFORMED
    assert book.check_header("Bearer nope").verdict is Verdict.UNKNOWN
    assert book.check_header(f"bearer {token}").ok
    now[0] = 15.0
    assert book.check(token).verdict is Verdict.EXPIRED
    live = book.issue("c", frozenset())
    assert book.revoke_all() == 1
    assert book.check(live).verdict is Verdict.REVOKED and book.active() == 0
    assert book.expires_in == 5 and "active=0" in repr(book)
