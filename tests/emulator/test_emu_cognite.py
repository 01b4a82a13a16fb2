from __future__ import annotations

import gzip
import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from conftest import RawApi, StartEmulator, get_token, introspect, poll_until

from harvester.emulator import Emulator

pytestmark = pytest.mark.anyio
PROJECT = "my-project"
BODY: dict[str, Any] = {
    "items": [{"fileId": 4242}],
    "points": [{"x": 0.4, "y": 0.5, "label": 1}, {"x": 0.9, "y": 0.1, "label": 0}],
    "boundingBox": {"xMin": 0.1, "yMin": 0.2, "xMax": 0.8, "yMax": 0.9},
}
BODY_POINTS = {"points": BODY["points"]}
JOB_KEYS = {"status", "createdTime", "statusTime", "jobId", "items", "prompt"}


class Cognite(RawApi):
    def __init__(self, emu: Emulator, session: aiohttp.ClientSession, token: str) -> None:
        base = f"{emu.urls['cognite']}/api/v1/projects/{PROJECT}"
        headers = {"Authorization": f"Bearer {token}", "cdf-version": "beta"}
        super().__init__(emu, session, base, headers)

    async def create(self, body: dict[str, Any], *, gzipped: bool = True) -> tuple[int, Any]:
        # cognite-sdk gzips every POST body; so do these tests unless asked not to.
        raw = json.dumps(body).encode()
        headers = {**self.headers, "Content-Type": "application/json"}
        if gzipped:
            raw = gzip.compress(raw)
            headers["Content-Encoding"] = "gzip"
        status, _, doc = await self.request(
            "POST", "/context/vision/segment", data=raw, headers=headers
        )
        return status, doc

    async def job(self, job_id: int) -> dict[str, Any]:
        status, headers, doc = await self.request("GET", f"/context/vision/segment/{job_id}")
        assert status == 200, doc
        assert headers["x-request-id"]
        return dict(doc)

    async def run(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        status, doc = await self.create(body)
        assert status == 200, doc
        return await poll_until(
            lambda: self.job(doc["jobId"]), lambda d: d["status"] in ("Completed", "Failed")
        )


@pytest.fixture
async def make() -> Any:
    async def make(
        start: StartEmulator,
        session: aiohttp.ClientSession,
        overrides: dict[str, Any] | None = None,
    ) -> Cognite:
        emu = await start(overrides)
        return Cognite(emu, session, await get_token(emu, session, scope="cdf"))

    return make


async def test_job_goes_queued_running_completed_with_truthful_segments(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Cognite = await make(start_emulator, session)
    status, created = await api.create(BODY)
    assert status == 200
    assert created["status"] == "Queued" and isinstance(created["jobId"], int)
    # The create answer echoes the prompt at the top level (the POST reference's sample).
    assert set(created) == JOB_KEYS - {"prompt"} | {"points", "boundingBox"}
    assert created["items"] == [{"fileId": 4242}]
    assert (created["points"], created["boundingBox"]) == (BODY["points"], BODY["boundingBox"])
    seen = await poll_until(lambda: api.job(created["jobId"]), lambda d: d["status"] == "Completed")
    statuses = [d["status"] for d in seen]
    assert statuses[0] in ("Queued", "Running") and "Running" in statuses
    done = seen[-1]
    assert set(done) == JOB_KEYS | {"startTime"}
    assert done["createdTime"] <= done["startTime"] <= done["statusTime"]
    (item,) = done["items"]
    assert item["fileId"] == 4242 and item["segments"]
    for seg in item["segments"]:
        assert 0.5 <= seg["score"] <= 1
        for poly in seg["polygons"]:
            assert len(poly["vertices"]) >= 6 and 0 <= poly["confidence"] <= 1
            for v in poly["vertices"]:
                assert 0.1 <= v["x"] <= 0.8 and 0.2 <= v["y"] <= 0.9  # inside the box
                assert set(v) == {"x", "y", "confidence"}
    truth = await introspect(api.emu, session, "GET", f"/truth/cognite/{created['jobId']}")
    assert truth["outcome"] == "Completed" and truth["items"] == done["items"]

    # Same request, same model: same segments (order of arrival does not matter).
    again = (await api.run(BODY))[-1]
    assert again["items"] == done["items"] and again["jobId"] != done["jobId"]
    stats = await introspect(api.emu, session, "GET", "/stats")
    cog = stats["cognite"]
    assert cog["creates"] == 2 and cog["jobs"] == 2 and cog["jobs_by_status"] == {"Completed": 2}
    assert list(cog["creates_by_reference"][PROJECT].values()) == [2]  # identical bodies


async def test_external_id_and_plain_json_bodies(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Cognite = await make(start_emulator, session)
    status, created = await api.create(
        {"items": [{"fileExternalId": "img-7"}], "points": [{"x": 1, "y": 0, "label": 1}]},
        gzipped=False,
    )
    assert status == 200, created
    (item,) = created["items"]
    assert item["fileExternalId"] == "img-7" and isinstance(item["fileId"], int)


async def test_a_file_named_by_its_instance_id(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Cognite = await make(start_emulator, session)
    node = {"space": "site-a", "externalId": "photo-9"}
    status, created = await api.create({"items": [{"fileInstanceId": node}], **BODY_POINTS})
    assert status == 200 and created["items"][0]["fileInstanceId"] == node, created
    done = await poll_until(lambda: api.job(created["jobId"]), lambda d: d["status"] == "Completed")
    # A job document's items show fileId (and fileExternalId), as seed 001's sample does.
    (item,) = done[-1]["items"]
    assert isinstance(item["fileId"], int) and "fileInstanceId" not in item and item["segments"]
    for bad in ({"space": "s"}, {"space": "s", "externalId": "x", "id": 1}, "site-a/photo-9"):
        status, doc = await api.create({"items": [{"fileInstanceId": bad}], "points": []})
        assert status == 400 and "fileInstanceId" in doc["error"]["message"], doc


async def test_failed_jobs_carry_error_message_and_failed_items(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Cognite = await make(start_emulator, session, {"cognite": {"failure_rate": 1.0}})
    done = (await api.run(BODY))[-1]
    assert done["status"] == "Failed" and done["items"] == []
    assert isinstance(done["errorMessage"], str) and done["errorMessage"]
    assert done["failedItems"] == [
        {"errorMessage": done["errorMessage"], "items": [{"fileId": 4242}]}
    ]
    truth = await introspect(api.emu, session, "GET", f"/truth/cognite/{done['jobId']}")
    assert truth["outcome"] == "Failed" and truth["errorMessage"] == done["errorMessage"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"points": BODY["points"]}, "items"),
        ({**BODY, "items": [{"fileId": 1}, {"fileId": 2}]}, "items"),
        ({**BODY, "items": [{"fileId": 1, "fileExternalId": "x"}]}, "exactly one"),
        ({**BODY, "items": [{}]}, "exactly one"),
        ({**BODY, "items": [{"fileId": 0}]}, "fileId"),
        ({**BODY, "items": [{"fileId": "12"}]}, "fileId"),
        ({**BODY, "points": [{"x": 1.5, "y": 0.5, "label": 1}]}, "points[0].x"),
        ({**BODY, "points": [{"x": 0.5, "y": 0.5, "label": 2}]}, "label"),
        ({**BODY, "points": [{"x": 0.5, "y": 0.5, "label": True}]}, "label"),
        ({**BODY, "boundingBox": {"xMin": 0.5, "yMin": 0, "xMax": 0.4, "yMax": 1}}, "xMin < xMax"),
        ({**BODY, "boundingBox": {"xMin": 0, "yMin": 0, "xMax": 1}}, "yMax"),
        ({"items": [{"fileId": 1}], "points": []}, "at least one point"),
        ({**BODY, "features": []}, "Unrecognized field"),
    ],
)
async def test_bad_bodies_get_cognites_400_envelope(
    start_emulator: StartEmulator,
    session: aiohttp.ClientSession,
    make: Any,
    body: dict[str, Any],
    fragment: str,
) -> None:
    api: Cognite = await make(start_emulator, session)
    status, doc = await api.create(body)
    assert status == 400
    assert set(doc) == {"error"} and doc["error"]["code"] == 400
    assert fragment in doc["error"]["message"]


async def test_undecodable_gzip_and_missing_files(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Cognite = await make(
        start_emulator, session, {"cognite": {"missing_files": [404, "gone"]}}
    )
    headers = {**api.headers, "Content-Encoding": "gzip", "Content-Type": "application/json"}
    status, _, doc = await api.request(
        "POST", "/context/vision/segment", data=b"not gzip at all", headers=headers
    )
    assert status == 400 and doc["error"]["code"] == 400
    status, doc = await api.create({**BODY, "items": [{"fileId": 404}]})
    assert status == 400 and doc["error"]["missing"] == [{"fileId": 404}]
    status, doc = await api.create({**BODY, "items": [{"fileExternalId": "gone"}]})
    assert status == 400 and doc["error"]["missing"] == [{"fileExternalId": "gone"}]


async def test_auth_failures_use_cognites_401_body(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Cognite = await make(start_emulator, session, {"oauth": {"token_ttl_s": 0.15}})
    path = "/context/vision/segment/1"
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic x"}):
        status, hdrs, doc = await api.request("GET", path, headers=headers)
        assert status == 401 and doc["error"]["code"] == 401
        assert doc["error"]["message"].startswith("Unauthorized") and hdrs["x-request-id"]
    seen = await poll_until(lambda: api.request("GET", path), lambda a: a[0] == 401)
    assert "expired" in seen[-1][2]["error"]["message"]
    stats = await introspect(api.emu, session, "GET", "/stats")
    assert stats["cognite"]["auth_refusals_by_reason"] == {
        "missing": 1, "unknown": 1, "malformed": 1, "expired": 1,
    }  # fmt: skip


async def test_required_scope_and_cdf_version(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    overrides = {"cognite": {"required_scope": "cdf", "required_cdf_version": "beta"}}
    api: Cognite = await make(start_emulator, session, overrides)
    assert (await api.create(BODY))[0] == 200
    status, _, doc = await api.request(
        "POST",
        "/context/vision/segment",
        json=BODY,
        headers={**api.headers, "cdf-version": "20230101"},
    )
    assert status == 400 and "cdf-version: beta" in doc["error"]["message"]
    other = await get_token(api.emu, session, scope="something-else")
    status, _, doc = await api.request(
        "GET", "/context/vision/segment/1", headers={"Authorization": f"Bearer {other}"}
    )
    assert status == 401 and "scope" in doc["error"]["message"]


async def test_rate_limit_is_429_without_retry_after(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Cognite = await make(
        start_emulator, session, {"cognite": {"rate_limit": {"rate_per_s": 0.5, "burst": 2}}}
    )
    answers = [await api.request("GET", "/context/vision/segment/1") for _ in range(3)]
    status, headers, doc = answers[-1]
    assert status == 429 and "Retry-After" not in headers and headers["x-request-id"]
    assert doc["error"]["code"] == 429 and "(rate)" in doc["error"]["message"]


async def test_concurrency_limit_is_a_429_that_says_so(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Cognite = await make(
        start_emulator, session, {"cognite": {"max_active_jobs": 2, "job_duration_s": 0.4}}
    )
    assert [(await api.create(BODY))[0] for _ in range(2)] == [200, 200]
    status, doc = await api.create(BODY)
    assert status == 429 and "concurrency" in doc["error"]["message"]
    # Slots free up as jobs finish: a bounded wait, not a sleep for luck.
    seen = await poll_until(lambda: api.create(BODY), lambda a: a[0] == 200, interval=0.05)
    assert all(s == 429 for s, _ in seen[:-1])


async def test_faults_answer_503_and_429_without_retry_after(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Cognite = await make(start_emulator, session)
    for fault in (
        {"kind": "5xx", "provider": "cognite", "count": 1},
        {"kind": "429", "provider": "cognite", "retry_after_s": 5, "count": 1},
    ):
        await introspect(api.emu, session, "POST", "/faults", json=fault)
        status, headers, doc = await api.request("GET", "/context/vision/segment/1")
        assert status in (503, 429) and "Retry-After" not in headers
        assert doc["error"]["code"] == status and headers["x-request-id"]


async def test_auto_retryable_statuses_carry_the_header(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Cognite = await make(
        start_emulator, session, {"cognite": {"auto_retryable_statuses": [500]}}
    )
    for code in (500, 502):
        fault = {"kind": "5xx", "provider": "cognite", "status": code, "count": 1}
        await introspect(api.emu, session, "POST", "/faults", json=fault)
        status, headers, _ = await api.request("GET", "/context/vision/segment/1")
        assert status == code
        assert headers.get("cdf-is-auto-retryable") == ("true" if code == 500 else None)
    status, headers, _ = await api.request("GET", "/context/vision/segment/1")
    assert status == 400 and "cdf-is-auto-retryable" not in headers


async def test_unknown_jobs_and_routes(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Cognite = await make(start_emulator, session)
    status, _, doc = await api.request("GET", "/context/vision/segment/123")
    assert status == 400 and doc["error"]["missing"] == [{"jobId": 123}]
    status, _, doc = await api.request("GET", "/context/vision/segment/abc")
    assert status == 400 and "jobId" in doc["error"]["message"]
    status, headers, doc = await api.request("GET", "/no/such/route")
    assert status == 404 and doc == {"error": {"code": 404, "message": "Not Found"}}
    assert headers["x-request-id"]
    _, created = await api.create(BODY)
    async with session.get(
        f"{api.emu.urls['cognite']}/api/v1/projects/other/context/vision/segment/{created['jobId']}",
        headers=api.headers,
    ) as r:
        assert r.status == 400  # jobs belong to their project


async def test_download_links_are_signed_and_expire_per_docs(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Cognite = await make(start_emulator, session)
    body = {"items": [{"id": 7}, {"externalId": "img-7"}]}
    status, _, doc = await api.request("POST", "/files/downloadlink", json=body)
    assert status == 200
    assert [{k: v for k, v in i.items() if k != "downloadUrl"} for i in doc["items"]] == body[
        "items"
    ]
    url = doc["items"][0]["downloadUrl"]
    assert url.startswith(api.emu.urls["storage"])
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["30"]
    async with session.get(url) as r:  # fetched with no auth, as the SDK does
        assert r.status == 200 and len(await r.read()) == 4096
    status, _, doc = await api.request(
        "POST", "/files/downloadlink", json=body, params={"extendedExpiration": "true"}
    )
    assert parse_qs(urlsplit(doc["items"][0]["downloadUrl"]).query)["X-Amz-Expires"] == ["3600"]
    status, _, doc = await api.request(
        "POST", "/files/downloadlink", json={"items": [{"id": 7}, {"id": 7}]}
    )
    assert status == 400 and doc["error"]["duplicated"] == [{"id": 7}]
    async with session.get(url, headers={"Authorization": api.headers["Authorization"]}) as r:
        assert r.status == 400
    assert api.emu.state.stats()["credential_hits"][0]["header"] == "authorization"


async def test_token_inspect(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Cognite = await make(start_emulator, session)
    await api.create(BODY)
    async with session.get(
        f"{api.emu.urls['cognite']}/api/v1/token/inspect", headers=api.headers
    ) as r:
        doc = await r.json()
    assert doc["subject"] == "client-1"
    assert doc["projects"] == [{"projectUrlName": PROJECT, "groups": []}]
