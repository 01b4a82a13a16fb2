from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import aiohttp
import pytest
from conftest import RawApi, StartEmulator, get_token, introspect, origin, poll_until

from harvester.emulator import Emulator

pytestmark = pytest.mark.anyio
ITWIN = "f7cb7bbb-c0fd-437d-af2a-0a8c51cfc3c4"
ACCEPT = "application/vnd.bentley.itwin-platform.v2+json"
BODY: dict[str, Any] = {
    "name": "segment-site-1",
    "type": "Segmentation2D",
    "iTwinId": ITWIN,
    "specifications": {
        "inputs": {
            "photos": "401975b7-0c0a-4498-5896-84987921f4bb",
            "photoSegmentationDetector": "08342927-859c",
        },
        "outputs": ["segmentation2D", "segmentedPhotos"],
        "options": {"minPhotos": 5},
    },
}
TERMINAL = {"Success", "Failed", "Cancelled"}


class Bentley(RawApi):
    def __init__(self, emu: Emulator, session: aiohttp.ClientSession, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT}
        super().__init__(emu, session, emu.urls["bentley"], headers)

    async def create(self, body: dict[str, Any] = BODY) -> dict[str, Any]:
        status, _, doc = await self.request("POST", "/reality-analysis/jobs", json=body)
        assert status == 201, doc
        return dict(doc["job"])

    async def get(self, job_id: str, what: str = "") -> Any:
        status, _, doc = await self.request("GET", f"/reality-analysis/jobs/{job_id}{what}")
        assert status == 200, doc
        return doc

    async def finish(self, job_id: str) -> list[dict[str, Any]]:
        seen = await poll_until(
            lambda: self.get(job_id, "/progress"),
            lambda d: d["progress"]["state"] in TERMINAL,
        )
        return [d["progress"] for d in seen]

    async def read_access(self, rd_id: str) -> tuple[int, Any]:
        path = f"/reality-management/reality-data/{rd_id}/readaccess"
        status, _, doc = await self.request("GET", path, params={"iTwinId": ITWIN})
        return status, doc

    async def container(self, rd_id: str) -> str:
        status, doc = await self.read_access(rd_id)
        assert status == 200, doc
        return str(doc["_links"]["containerUrl"]["href"])

    async def list_page(self, href: str, **params: str) -> tuple[int, bytes]:
        url = _with_query(href, {"restype": "container", "comp": "list", **params})
        async with self.session.get(url) as r:
            return r.status, await r.read()


def _with_query(href: str, extra: dict[str, str], path_suffix: str = "") -> str:
    parts = urlsplit(href)
    query = urlencode([*parse_qsl(parts.query), *extra.items()])
    return urlunsplit(parts._replace(path=parts.path + path_suffix, query=query))


def blob_url(href: str, name: str) -> str:
    return _with_query(href, {}, "/" + quote(name))


@pytest.fixture
async def make() -> Any:
    async def make(
        start: StartEmulator,
        session: aiohttp.ClientSession,
        overrides: dict[str, Any] | None = None,
    ) -> Bentley:
        emu = await start(overrides)
        return Bentley(emu, session, await get_token(emu, session))

    return make


async def test_job_runs_queued_active_success_with_stepped_progress(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Bentley = await make(start_emulator, session, {"bentley": {"progress_step": 25}})
    job = await api.create()
    assert job["state"] == "Queued" and job["name"] == BODY["name"]
    assert job["type"] == "Segmentation2D" and job["iTwinId"] == ITWIN
    assert set(job) == {
        "id", "state", "userId", "executionInfo", "specifications", "name", "type", "iTwinId",
    }  # fmt: skip
    specs = job["specifications"]
    assert specs["inputs"] == BODY["specifications"]["inputs"]
    assert set(specs["outputs"]) == {"segmentation2D", "segmentedPhotos"}
    assert specs["options"] == {"minPhotos": 5}
    assert set(job["executionInfo"]) == {"createdDateTime", "estimatedUnits"}
    progress = await api.finish(job["id"])
    pcts = [p["percentage"] for p in progress]
    assert pcts == sorted(pcts) and pcts[-1] == 100
    assert all(p % 25 == 0 for p in pcts) and len(set(pcts)) >= 2
    states = [p["state"] for p in progress]
    assert "Active" in states and states[-1] == "Success"
    done = (await api.get(job["id"]))["job"]
    info = done["executionInfo"]
    assert info["createdDateTime"] <= info["startedDateTime"] <= info["endedDateTime"]
    assert info["endedDateTime"].endswith("Z")
    assert await api.get(job["id"], "/messages") == {"messages": {"errors": [], "warnings": []}}
    stats = await introspect(api.emu, session, "GET", "/stats")
    assert stats["bentley"]["creates"] == 1
    assert stats["bentley"]["creates_by_reference"] == {ITWIN: {BODY["name"]: 1}}
    assert stats["bentley"]["jobs_by_state"] == {"Success": 1}


async def test_outputs_list_in_pages_and_stream_blobs_matching_truth(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Bentley = await make(
        start_emulator, session, {"bentley": {"list_page_size": 2, "parts_per_output": 5}}
    )
    job = await api.create()
    rd_id = job["specifications"]["outputs"]["segmentation2D"]
    status, doc = await api.read_access(rd_id)
    assert status == 404 and doc["error"]["code"] == "RealityDataNotFound"  # not done yet
    await api.finish(job["id"])
    href = await api.container(rd_id)
    assert href.startswith(f"{api.emu.urls['storage']}/bentley/{rd_id}?")
    assert {"sv", "se", "sig", "sp", "sr"} <= dict(parse_qsl(urlsplit(href).query)).keys()

    listed: dict[str, int] = {}
    marker: str | None = None
    pages = 0
    while True:
        params = {"marker": marker} if marker else {}
        status, body = await api.list_page(href, **params)
        assert status == 200, body
        root = ET.fromstring(body)
        assert root.tag == "EnumerationResults" and root.get("ContainerName") == rd_id
        for blob in root.iter("Blob"):
            size = blob.findtext("Properties/Content-Length")
            assert size is not None
            listed[blob.findtext("Name") or ""] = int(size)
        pages += 1
        marker = root.findtext("NextMarker") or None
        if marker is None:
            break
        assert pages < 10
    assert pages == 3  # 6 blobs, 2 per page
    truth = await introspect(api.emu, session, "GET", f"/truth/bentley/{job['id']}")
    expected = truth["outputs"]["segmentation2D"]["blobs"]
    assert listed == {name: b["size"] for name, b in expected.items()}
    assert "segmentation2D/labels.json" in listed
    assert "segmentation2D/segmentation/part-0005.bin" in listed
    for name, info in expected.items():
        async with session.get(blob_url(href, name)) as r:
            assert r.status == 200 and r.headers["x-ms-blob-type"] == "BlockBlob"
            assert hashlib.sha256(await r.read()).hexdigest() == info["sha256"]
    async with session.get(
        blob_url(href, "segmentation2D/labels.json"), headers={"Range": "bytes=0-9"}
    ) as r:
        assert r.status == 206 and len(await r.read()) == 10


async def test_listing_three_pages_prefix_and_delimiter(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Bentley = await make(
        start_emulator, session, {"bentley": {"list_page_size": 5000, "parts_per_output": 4}}
    )
    job = await api.create()
    await api.finish(job["id"])
    href = await api.container(job["specifications"]["outputs"]["segmentedPhotos"])
    names: list[str] = []
    marker = ""
    for _ in range(10):
        params = {"maxresults": "2", **({"marker": marker} if marker else {})}
        status, body = await api.list_page(href, **params)
        root = ET.fromstring(body)
        names += [n.text or "" for n in root.iter("Name")]
        marker = root.findtext("NextMarker") or ""
        if not marker:
            break
    assert len(names) == 5 and names == sorted(names)  # 3 pages: 2 + 2 + 1
    status, body = await api.list_page(href, prefix="segmentedPhotos/", delimiter="/")
    root = ET.fromstring(body)
    assert [b.findtext("Name") for b in root.iter("Blob")] == ["segmentedPhotos/labels.json"]
    assert [p.findtext("Name") for p in root.iter("BlobPrefix")] == [
        "segmentedPhotos/segmentation/"
    ]
    status, body = await api.list_page(href, maxresults="0")
    assert status == 400 and b"<Code>InvalidQueryParameterValue</Code>" in body
    status, body = await api.list_page(href, marker="bogus")
    assert status == 400


async def test_expired_sas_is_403_then_a_fresh_read_access_works(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Bentley = await make(start_emulator, session, {"bentley": {"expire_first_n": 1}})
    job = await api.create()
    await api.finish(job["id"])
    rd_id = job["specifications"]["outputs"]["segmentation2D"]
    stale = await api.container(rd_id)
    status, body = await api.list_page(stale)
    assert status == 403 and b"<Code>AuthenticationFailed</Code>" in body
    assert b"Signed expiry time" in body
    async with session.get(blob_url(stale, "segmentation2D/labels.json")) as r:
        assert r.status == 403 and r.headers["x-ms-error-code"] == "AuthenticationFailed"
    fresh = await api.container(rd_id)
    assert fresh != stale
    assert (await api.list_page(fresh))[0] == 200
    stats = (await introspect(api.emu, session, "GET", "/stats"))["bentley"]
    assert stats["expired_sas_issued"] == 1 and stats["expired_sas_rejected"] == 2


async def test_storage_refuses_credentials_forgeries_and_unknown_blobs(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Bentley = await make(start_emulator, session)
    job = await api.create()
    await api.finish(job["id"])
    href = await api.container(job["specifications"]["outputs"]["segmentation2D"])
    url = blob_url(href, "segmentation2D/labels.json")
    async with session.get(url, headers={"Authorization": api.headers["Authorization"]}) as r:
        assert r.status == 400 and r.headers["x-ms-error-code"] == "InvalidAuthenticationInfo"
    hits = (await introspect(api.emu, session, "GET", "/stats"))["credential_hits"]
    assert [h["header"] for h in hits] == ["authorization"]
    assert hits[0]["path"].endswith("/segmentation2D/labels.json")
    async with session.get(url.split("?")[0]) as r:
        assert r.status == 404 and r.headers["x-ms-error-code"] == "ResourceNotFound"
    later = {**dict(parse_qsl(urlsplit(url).query)), "se": "2099-01-01T00:00:00Z"}
    forged = urlunsplit(urlsplit(url)._replace(query=urlencode(later)))
    async with session.get(forged) as r:
        assert r.status == 403 and r.headers["x-ms-error-code"] == "AuthenticationFailed"
    async with session.get(blob_url(href, "segmentation2D/nope.bin")) as r:
        assert r.status == 404 and r.headers["x-ms-error-code"] == "BlobNotFound"
    other = href.replace(job["specifications"]["outputs"]["segmentation2D"], "x" * 36)
    async with session.get(_with_query(other, {"restype": "container", "comp": "list"})) as r:
        assert r.status == 403  # a SAS names one container only


async def test_failed_job_terminates_on_failure_with_error_messages(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Bentley = await make(start_emulator, session, {"bentley": {"failure_rate": 1.0}})
    job = await api.create()
    progress = await api.finish(job["id"])
    states = [p["state"] for p in progress]
    assert states[-1] == "Failed" and progress[-1]["percentage"] < 100
    assert "Terminating" in states  # the v2 schema's one Terminating state
    messages = (await api.get(job["id"], "/messages"))["messages"]
    (error,) = messages["errors"]
    assert set(error) == {"code", "title", "message", "params"}
    assert isinstance(error["params"], list) and messages["warnings"] == []
    done = (await api.get(job["id"]))["job"]
    assert done["state"] == "Failed" and "endedDateTime" in done["executionInfo"]
    rd_id = job["specifications"]["outputs"]["segmentation2D"]
    assert (await api.read_access(rd_id))[0] == 404
    truth = await introspect(api.emu, session, "GET", f"/truth/bentley/{job['id']}")
    assert truth["outcome"] == "Failed" and truth["outputs"] == {}


async def test_cancel_goes_through_terminating(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Bentley = await make(start_emulator, session, {"bentley": {"job_duration_s": 5}})
    job = await api.create()
    status, _, doc = await api.request("DELETE", f"/reality-analysis/jobs/{job['id']}")
    assert status == 200 and doc["job"]["state"] == "Terminating"
    status, _, _ = await api.request("DELETE", f"/reality-analysis/jobs/{job['id']}")
    assert status == 200  # a retried cancel is harmless
    progress = await api.finish(job["id"])
    assert progress[-1] == {"percentage": 0, "state": "Cancelled"}
    warnings = (await api.get(job["id"], "/messages"))["messages"]["warnings"]
    assert warnings[0]["code"] == "JobCancelled"

    quick: Bentley = await make(start_emulator, session)
    done = await quick.create()
    await quick.finish(done["id"])
    status, _, doc = await quick.request("DELETE", f"/reality-analysis/jobs/{done['id']}")
    assert status == 422 and doc["error"]["code"] == "InvalidChange"


async def test_auth_failures_use_bentleys_401_bodies(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Bentley = await make(start_emulator, session)
    path = "/reality-analysis/jobs/x"
    status, _, doc = await api.request("GET", path, headers={"Accept": ACCEPT})
    assert status == 401 and doc["error"]["code"] == "HeaderNotFound"
    wrong_scope = await get_token(api.emu, session, scope="other")
    status, _, doc = await api.request(
        "GET", path, headers={"Authorization": f"Bearer {wrong_scope}"}
    )
    assert status == 401 and doc["error"]["code"] == "InvalidToken"
    assert "scope" in doc["error"]["message"]
    await introspect(api.emu, session, "POST", "/revoke-tokens")
    status, _, doc = await api.request("GET", path)
    assert status == 401 and doc["error"]["code"] == "InvalidToken"
    assert "revoked" in doc["error"]["message"]
    stats = await introspect(api.emu, session, "GET", "/stats")
    assert stats["bentley"]["auth_refusals_by_reason"] == {"missing": 1, "scope": 1, "revoked": 1}


V1_INPUTS = [{"name": "photos", "realityDataId": "rd"}]


@pytest.mark.parametrize(
    ("change", "target"),
    [
        ({"type": None}, "type"),
        ({"type": "Sculpture3D"}, "type"),
        ({"iTwinId": None}, "iTwinId"),
        ({"name": "x"}, "name"),
        ({"name": "a:b"}, "name"),
        ({"costEstimationParameters": {}}, "costEstimationParameters"),
        ({"specifications": None}, "specifications"),
        ({"specifications": {**BODY["specifications"], "inputs": {}}}, "specifications.inputs"),
        ({"specifications": {**BODY["specifications"], "inputs": V1_INPUTS}},
         "specifications.inputs"),
        ({"specifications": {**BODY["specifications"], "inputs": {"pointClouds": "rd"}}},
         "specifications.inputs.pointClouds"),
        ({"specifications": {**BODY["specifications"], "outputs": ["segmentation2D"] * 2}},
         "specifications.outputs[1]"),
        ({"specifications": {**BODY["specifications"], "outputs": ["objects3D"]}},
         "specifications.outputs[0]"),
        ({"specifications": {**BODY["specifications"], "outputs": "a"}}, "specifications.outputs"),
        ({"specifications": {**BODY["specifications"], "options": {"minQuality": 0.5}}},
         "specifications.options.minQuality"),
    ],
)  # fmt: skip
async def test_bad_create_bodies(
    start_emulator: StartEmulator,
    session: aiohttp.ClientSession,
    make: Any,
    change: dict[str, Any],
    target: str,
) -> None:
    api: Bentley = await make(start_emulator, session)
    body = {k: v for k, v in {**BODY, **change}.items() if v is not None}
    got, _, doc = await api.request("POST", "/reality-analysis/jobs", json=body)
    assert got == 400 and doc["error"]["code"] == "InvalidRealityAnalysisRequest"
    (detail,) = doc["error"]["details"]
    assert detail["code"] == "InvalidProperty" and detail["target"] == target
    assert f"'{target}'" in detail["message"]
    stats = await introspect(api.emu, session, "GET", "/stats")
    assert stats["bentley"]["jobs"] == 0  # nothing was created
    got, _, doc = await api.request("POST", "/reality-analysis/jobs", data=b"{nope")
    assert got == 400 and doc["error"]["code"] == "InvalidRealityAnalysisRequest"


async def test_unknown_jobs_routes_and_reality_data(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Bentley = await make(start_emulator, session)
    for what in ("", "/progress", "/messages"):
        status, _, doc = await api.request("GET", f"/reality-analysis/jobs/nope{what}")
        assert status == 404 and doc == {
            "error": {"code": "JobNotFound", "message": "Requested job is not available."}
        }
    status, _, doc = await api.request("GET", "/reality-analysis/whatever")
    assert status == 404 and doc["error"]["code"] == "NotFound"
    status, doc = await api.read_access("no-such-id")
    assert status == 404 and doc["error"]["code"] == "RealityDataNotFound"
    async with session.get(f"{origin(api.emu)}/_emulator/truth/bentley/nope") as r:
        assert r.status == 404


async def test_rate_limit_answers_429_with_retry_after_seconds(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Bentley = await make(
        start_emulator, session, {"bentley": {"rate_limit": {"rate_per_s": 0.5, "burst": 2}}}
    )
    answers = [await api.request("GET", "/reality-analysis/jobs/x") for _ in range(3)]
    assert [a[0] for a in answers] == [404, 404, 429]
    _, headers, doc = answers[-1]
    assert headers["Retry-After"].isdigit() and 1 <= int(headers["Retry-After"]) <= 2
    assert doc["error"]["code"] == "RateLimitExceeded"
    assert f"{headers['Retry-After']} seconds" in doc["error"]["message"]
    stats = await introspect(api.emu, session, "GET", "/stats")
    assert stats["bentley"]["rate_limited"] == 1


async def test_jobs_are_listed_with_filter_top_and_continuation_token(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Bentley = await make(start_emulator, session)
    made = [await api.create({**BODY, "name": f"site {i}"}) for i in range(5)]
    await api.create({**BODY, "name": "it's here", "iTwinId": "other-twin"})

    async def page(**params: str) -> tuple[int, Any]:
        status, _, doc = await api.request("GET", "/reality-analysis/jobs", params=params)
        return status, doc

    status, doc = await page(**{"$filter": "name eq 'site 3'"})
    assert status == 200 and [j["id"] for j in doc["jobs"]] == [made[3]["id"]]
    assert "_links" not in doc
    status, doc = await page(**{"$filter": "name eq 'it''s here'"})
    assert [j["name"] for j in doc["jobs"]] == ["it's here"]
    seen: list[str] = []
    params = {"$filter": f"iTwinId eq {ITWIN}", "$top": "2"}
    for _ in range(5):
        status, doc = await page(**params)
        assert status == 200 and len(doc["jobs"]) <= 2
        seen += [j["id"] for j in doc["jobs"]]
        nxt = doc.get("_links", {}).get("next")
        if nxt is None:
            break
        query = dict(parse_qsl(urlsplit(nxt["href"]).query))
        assert query["$filter"] == params["$filter"] and query["$top"] == "2"
        params = query
    assert seen == [j["id"] for j in made]
    status, doc = await page(**{"$filter": f"id eq {made[0]['id']} or id eq {made[4]['id']}"})
    assert [j["id"] for j in doc["jobs"]] == [made[0]["id"], made[4]["id"]]
    ids = ", ".join(f"'{v}'" for v in made[1]["specifications"]["outputs"].values())
    status, doc = await page(**{"$filter": f"outputId in ({ids})"})
    assert [j["id"] for j in doc["jobs"]] == [made[1]["id"]]


@pytest.mark.parametrize(
    ("params", "target"),
    [
        ({}, "$filter"),
        ({"$filter": "colour eq 'red'"}, "$filter"),
        ({"$filter": "name eq"}, "$filter"),
        ({"$filter": "name eq 'a'", "$top": "0"}, "$top"),
        ({"$filter": "name eq 'a'", "$top": "1001"}, "$top"),
        ({"$filter": "name eq 'a'", "continuationToken": "bm9wZQ"}, "continuationToken"),
    ],
)
async def test_bad_listings_are_refused(
    start_emulator: StartEmulator,
    session: aiohttp.ClientSession,
    make: Any,
    params: dict[str, str],
    target: str,
) -> None:
    api: Bentley = await make(start_emulator, session)
    status, _, doc = await api.request("GET", "/reality-analysis/jobs", params=params)
    assert status == 400 and doc["error"]["code"] == "InvalidRealityAnalysisRequest"
    assert doc["error"]["details"][0]["target"] == target


async def test_a_listing_without_itwin_shows_only_the_callers_jobs(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Bentley = await make(start_emulator, session)
    mine = await api.create({**BODY, "name": "shared name"})
    other = Bentley(api.emu, session, await get_token(api.emu, session, client_id="someone"))
    theirs = await other.create({**BODY, "name": "shared name"})
    for who, expected in ((api, mine), (other, theirs)):
        status, _, doc = await who.request(
            "GET", "/reality-analysis/jobs", params={"$filter": "name eq 'shared name'"}
        )
        assert status == 200 and [j["id"] for j in doc["jobs"]] == [expected["id"]]
    status, _, doc = await api.request(
        "GET",
        "/reality-analysis/jobs",
        params={"$filter": f"name eq 'shared name' and iTwinId eq {ITWIN}"},
    )
    assert {j["id"] for j in doc["jobs"]} == {mine["id"], theirs["id"]}
