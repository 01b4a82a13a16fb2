from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from conftest import RawApi, StartEmulator, introspect, poll_until

from harvester.emulator import Emulator

pytestmark = pytest.mark.anyio
KEY = "JbFkWZMx4Ea3epIrxSgA.a2fR36fZi3sdFPoztAXT"
STATUSES = {"SUBMITTED", "IN_PROGRESS", "COMPLETED", "CANCELED", "TIMEDOUT", "ERROR"}
TERMINAL = STATUSES - {"SUBMITTED", "IN_PROGRESS"}
BODY: dict[str, Any] = {
    "model": {"identifier": "ed542963de", "version": "1.0.1"},
    "explain": False,
    "input": {
        "type": "text",
        "sources": {f"item-{i}": {"input.txt": f"text number {i}"} for i in range(4)},
    },
}


class Modzy(RawApi):
    def __init__(self, emu: Emulator, session: aiohttp.ClientSession, key: str = KEY) -> None:
        headers = {"Authorization": f"ApiKey {key}", "Accept": "application/json"}
        super().__init__(emu, session, emu.urls["modzy"], headers)

    async def create(self, body: dict[str, Any] = BODY) -> dict[str, Any]:
        status, _, doc = await self.request("POST", "/api/jobs", json=body)
        assert status == 200, doc
        return dict(doc)

    async def job(self, job_id: str) -> dict[str, Any]:
        status, _, doc = await self.request("GET", f"/api/jobs/{job_id}")
        assert status == 200, doc
        return dict(doc)

    async def finish(self, job_id: str) -> list[dict[str, Any]]:
        return await poll_until(lambda: self.job(job_id), lambda d: d["status"] in TERMINAL)

    async def results(self, job_id: str) -> tuple[int, Any]:
        status, _, doc = await self.request("GET", f"/api/results/{job_id}")
        return status, doc

    async def visible_results(self, job_id: str) -> dict[str, Any]:
        """Poll through the 404 window, as the SDK does once it saw the job exist."""
        seen = await poll_until(lambda: self.results(job_id), lambda a: a[0] != 404)
        status, doc = seen[-1]
        assert status == 200, doc
        return dict(doc)


@pytest.fixture
async def make() -> Any:
    async def make(
        start: StartEmulator,
        session: aiohttp.ClientSession,
        overrides: dict[str, Any] | None = None,
    ) -> Modzy:
        return Modzy(await start(overrides), session)

    return make


async def test_sdk_construction_probes(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Modzy = await make(start_emulator, session)
    status, _, doc = await api.request("GET", "/models")
    assert not 200 <= status < 300  # so the SDK appends /api to the base
    assert doc["statusCode"] == status
    status, _, models = await api.request("GET", "/api/models")
    assert status == 200 and isinstance(models, list)
    assert {"modelId": "ed542963de", "latestVersion": "1.0.1", "versions": ["1.0.1"]} in models
    status, _, reqs = await api.request("GET", "/api/models/requirements/account")
    assert status == 200 and isinstance(reqs, list)
    active = [r for r in reqs if r["status"] == "ACTIVE"]
    assert active and all(
        {"requirementId", "cpuAmount", "memoryAmount"} <= r.keys() for r in active
    )
    assert active[0]["cpuAmount"] == "500m" and active[0]["memoryAmount"] == "2Gi"


async def test_job_completes_and_results_appear_after_the_404_window(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Modzy = await make(start_emulator, session)
    created = await api.create()
    assert created["status"] == "SUBMITTED" and created["totalInputs"] == 4
    assert created["accessKey"] == KEY.split(".")[0]
    job_id = created["jobIdentifier"]
    status, doc = await api.results(job_id)
    assert status == 404
    assert set(doc) == {"statusCode", "status", "message", "reportErrorUrl"}
    assert doc["statusCode"] == 404 and doc["status"] == "NOT_FOUND"
    # The window is the SDK's quirk: the job itself is visible all along.
    assert (await api.job(job_id))["status"] in ("SUBMITTED", "IN_PROGRESS")

    seen = await api.finish(job_id)
    statuses = [d["status"] for d in seen]
    assert "IN_PROGRESS" in statuses and statuses[-1] == "COMPLETED"
    assert all(d["status"] in STATUSES for d in seen)
    for d in seen:
        assert d["pending"] + d["completed"] + d["failed"] == d["total"] == 4
    assert seen[-1]["completed"] == 4 and seen[-1]["pending"] == 0
    status, results = await api.results(job_id)
    assert status == 200 and results["finished"] is True
    assert results["total"] == 4 and results["completed"] == 4 and results["failures"] == {}
    item = results["results"]["item-0"]
    assert item["status"] == "SUCCESSFUL"
    assert {"engine", "startTime", "updateTime", "endTime", "elapsedTime", "voting"} <= set(item)
    predictions = item["results.json"]["data"]["result"]["classPredictions"]
    assert predictions and all({"class", "score"} == set(p) for p in predictions)
    truth = await introspect(api.emu, session, "GET", f"/truth/modzy/{job_id}")
    assert truth["outcome"] == "COMPLETED"
    assert truth["results"] == {k: v["results.json"] for k, v in results["results"].items()}
    stats = await introspect(api.emu, session, "GET", "/stats")
    assert stats["modzy"]["creates"] == 1 and stats["modzy"]["results_not_yet"] >= 1


async def test_partial_results_while_in_progress(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Modzy = await make(
        start_emulator, session, {"modzy": {"job_duration_s": 0.8, "results_404_s": 0}}
    )
    job_id = (await api.create())["jobIdentifier"]
    seen = await poll_until(lambda: api.results(job_id), lambda a: a[1]["finished"])
    counts = [doc["completed"] for _, doc in seen]
    assert counts == sorted(counts) and counts[-1] == 4
    assert any(not doc["finished"] and 0 < doc["completed"] < 4 for _, doc in seen)


async def test_item_failures_and_failed_and_timed_out_jobs(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Modzy = await make(start_emulator, session, {"modzy": {"item_failure_rate": 0.5}})
    body = {**BODY, "input": {"type": "text", "sources": {
        f"s{i}": {"input.txt": f"t{i}"} for i in range(20)
    }}}  # fmt: skip
    job_id = (await api.create(body))["jobIdentifier"]
    done = (await api.finish(job_id))[-1]
    assert done["status"] == "COMPLETED" and 0 < done["failed"] < 20
    results = await api.visible_results(job_id)
    assert results["failed"] == done["failed"] and len(results["failures"]) == done["failed"]
    for failure in results["failures"].values():
        assert failure["status"] == "FAILED" and failure["error"]
    truth = await introspect(api.emu, session, "GET", f"/truth/modzy/{job_id}")
    assert {k: v["error"] for k, v in results["failures"].items()} == truth["failures"]

    for rate, final in (("failure_rate", "ERROR"), ("timeout_rate", "TIMEDOUT")):
        api2: Modzy = await make(start_emulator, session, {"modzy": {rate: 1.0}})
        job_id = (await api2.create())["jobIdentifier"]
        done = (await api2.finish(job_id))[-1]
        assert done["status"] == final and done["failed"] >= 2
        results = await api2.visible_results(job_id)
        assert results["finished"] is True and results["failed"] == done["failed"]


async def test_cancel(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Modzy = await make(start_emulator, session, {"modzy": {"job_duration_s": 5}})
    job_id = (await api.create())["jobIdentifier"]
    status, _, doc = await api.request("DELETE", f"/api/jobs/{job_id}")
    assert status == 200 and doc["status"] == "CANCELED"
    assert (await api.request("DELETE", f"/api/jobs/{job_id}"))[0] == 200
    assert (await api.job(job_id))["status"] == "CANCELED"
    results = await api.visible_results(job_id)
    assert results["finished"] is True
    assert {f["status"] for f in results["failures"].values()} == {"CANCELED"}

    quick: Modzy = await make(start_emulator, session)
    done_id = (await quick.create())["jobIdentifier"]
    await quick.finish(done_id)
    status, _, doc = await quick.request("DELETE", f"/api/jobs/{done_id}")
    assert status == 400 and doc["status"] == "BAD_REQUEST"


async def test_auth_failures_use_modzys_401_body(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Modzy = await make(start_emulator, session, {"modzy": {"valid_api_keys": [KEY]}})
    for headers in (
        {},
        {"Authorization": f"Bearer {KEY}"},
        {"Authorization": "ApiKey wrong.key"},
    ):
        status, _, doc = await api.request("GET", "/api/models", headers=headers)
        assert status == 401
        assert doc["statusCode"] == 401 and doc["status"] == "UNAUTHORIZED"
        assert doc["message"] and doc["reportErrorUrl"].startswith("https://")
    assert (await api.request("GET", "/api/models"))[0] == 200
    stats = await introspect(api.emu, session, "GET", "/stats")
    assert stats["modzy"]["auth_refusals_by_reason"] == {"missing": 1, "malformed": 1, "invalid": 1}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"model": None}, "model"),
        ({"model": {"identifier": "m"}}, "model.version"),
        ({"explain": "yes"}, "explain"),
        ({"input": None}, "input"),
        ({"input": {"type": "carrier-pigeon", "sources": {"a": {"b": "c"}}}}, "input.type"),
        ({"input": {"type": "text", "sources": {}}}, "sources"),
        ({"input": {"type": "text", "sources": {"a": {"b": 1}}}}, "string"),
        ({"input": {"type": "embedded", "sources": {"a": {"b": "plain"}}}}, "data URI"),
        ({"input": {"type": "aws-s3", "sources": {"a": {"b": "s3://x"}}}}, "object"),
    ],
)
async def test_bad_bodies_get_the_400_envelope(
    start_emulator: StartEmulator,
    session: aiohttp.ClientSession,
    make: Any,
    change: dict[str, Any],
    fragment: str,
) -> None:
    api: Modzy = await make(start_emulator, session)
    body = {k: v for k, v in {**BODY, **change}.items() if v is not None}
    status, _, doc = await api.request("POST", "/api/jobs", json=body)
    assert status == 400 and doc["status"] == "BAD_REQUEST" and fragment in doc["message"]


async def test_embedded_input_and_explanations(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Modzy = await make(start_emulator, session)
    body = {
        **BODY,
        "explain": True,
        "input": {"type": "embedded", "sources": {"job": {"image": "data:image/png;base64,AAAA"}}},
    }
    job_id = (await api.create(body))["jobIdentifier"]
    await api.finish(job_id)
    results = await api.visible_results(job_id)
    explanation = results["results"]["job"]["results.json"]["data"]["explanation"]
    assert explanation["importances"][0]["input"] == "image"


async def test_unknown_job_and_no_rate_limit_unless_configured(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, make: Any
) -> None:
    api: Modzy = await make(start_emulator, session)
    status, _, doc = await api.request("GET", "/api/jobs/nope")
    assert status == 404 and doc["status"] == "NOT_FOUND"
    statuses = {(await api.request("GET", "/api/models"))[0] for _ in range(30)}
    assert statuses == {200}

    limited: Modzy = await make(
        start_emulator, session, {"modzy": {"rate_limit": {"rate_per_s": 0.5, "burst": 2}}}
    )
    answers = [await limited.request("GET", "/api/models") for _ in range(3)]
    status, headers, doc = answers[-1]
    assert status == 429 and "Retry-After" not in headers
    assert doc["statusCode"] == 429 and doc["status"] == "TOO_MANY_REQUESTS"
