"""The Cognite adapter on recorded bodies (written from PROVIDERS.md): no network."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
import pytest

from harvester.config import CogniteConfig, SecretRef
from harvester.errors import (
    CredentialsError,
    HarvesterError,
    InvalidPayload,
    ProtocolError,
    ProviderJobFailed,
    ProviderUnavailable,
    RateLimited,
)
from harvester.jobs import Job
from harvester.providers.base import Accepted, RemoteState, Status
from harvester.providers.cognite import CogniteProvider
from harvester.wire import Response
from tests.unit.adapters import FakeClient, RecordingIO, answer, make_job

T = TypeVar("T")
CFG = CogniteConfig(
    name="cognite",
    base_url="https://westeurope-1.cognitedata.com/",
    project="my proj",
    token_url="https://login.example/token",
    client_id="c",
    client_secret=SecretRef("s", env="X"),
)
SEGMENT = "https://westeurope-1.cognitedata.com/api/v1/projects/my%20proj/context/vision/segment"
PAYLOAD: dict[str, Any] = {
    "items": [{"fileId": 1234}],
    "points": [{"x": 0.5, "y": 0.25, "label": 1}, {"x": 0, "y": 1, "label": 0}],
    "boundingBox": {"xMin": 0.1, "yMin": 0.1, "xMax": 0.9, "yMax": 0.8},
}
COMPLETED: dict[str, Any] = {
    "status": "Completed",
    "createdTime": 1700000000000,
    "startTime": 1700000001000,
    "statusTime": 1700000009000,
    "jobId": 777,
    "items": [
        {
            "fileId": 1234,
            "fileExternalId": "scan-1.png",
            "segments": [
                {
                    "score": 0.93,
                    "polygons": [
                        {
                            "vertices": [
                                {"x": 0.1, "y": 0.1, "confidence": 0.9},
                                {"x": 0.5, "y": 0.1, "confidence": 0.8},
                                {"x": 0.3, "y": 0.6, "confidence": 0.85},
                            ],
                            "confidence": 0.88,
                        }
                    ],
                }
            ],
        }
    ],
    "prompt": {"points": PAYLOAD["points"]},
}


def job(**kw: Any) -> Job:
    return make_job("cognite", "img-1", "777", **kw)


def resp(status: int, body: Any, request_id: str | None = "rid-9") -> Response:
    return answer(status, body, url=SEGMENT, request_id=request_id)


def err(code: int, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


@pytest.fixture
def p() -> CogniteProvider:
    return CogniteProvider(CFG)


# -- requests ---------------------------------------------------------------------------
def test_create_request(p: CogniteProvider) -> None:
    spec = p.build_create(job(remote_id=None), PAYLOAD)
    assert (spec.method, spec.url, spec.endpoint) == ("POST", SEGMENT, "create")
    assert spec.headers == {"cdf-version": "beta"}
    assert spec.json == PAYLOAD
    assert spec.idempotent is False and spec.send_credentials is True


def test_poll_request(p: CogniteProvider) -> None:
    spec = p.build_poll(job())
    assert (spec.method, spec.url) == ("GET", f"{SEGMENT}/777")
    assert spec.headers["cdf-version"] == "beta" and spec.idempotent is True


def test_no_lookup_and_no_setup(p: CogniteProvider) -> None:
    assert p.build_find(job(), None) is None
    assert p.setup_spec() is None
    assert p.ladder() is None


# -- create answers ---------------------------------------------------------------------
def test_create_answer(p: CogniteProvider) -> None:
    body = {"status": "Queued", "jobId": 777, "createdTime": 1700000000000}
    assert p.parse_create(resp(200, body), job()) == Accepted("777")
    assert p.parse_create(resp(201, {"jobId": "778"}), job()) == Accepted("778")


@pytest.mark.parametrize(
    "body",
    [
        {"status": "Queued"},
        {"jobId": None},
        {"jobId": True},
        {"jobId": 1.5},
        {"jobId": -3},
        {"jobId": "abc"},
        [777],
        b"<html>gateway</html>",
        b"",
        b'{"jobId": 100000000000000000000000000000}',
    ],
)
def test_malformed_create_answers(p: CogniteProvider, body: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        p.parse_create(resp(200, body), job())
    assert "cognite" in str(info.value) and "rid-9" in str(info.value)


# -- error envelopes ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "body", "exc", "code"),
    [
        (400, err(400, "Invalid points", missing=[{"fileId": 1234}]), InvalidPayload, "400"),
        (422, err(422, "Bad box"), InvalidPayload, "422"),
        (409, err(409, "Conflict", duplicated=[{"fileId": 1}]), InvalidPayload, "409"),
        (401, err(401, "Unauthorized"), CredentialsError, "401"),
        (
            403,
            err(403, "Resource not found. This may also be due to insufficient access rights."),
            CredentialsError,
            "403",
        ),
        (404, err(404, "Not found"), ProviderJobFailed, "404"),
        (429, err(429, "Too many concurrent requests"), RateLimited, "429"),
        (500, err(500, "Internal"), ProviderUnavailable, "500"),
        (418, err(418, "teapot"), ProtocolError, "418"),
    ],
)
def test_error_envelopes_are_typed(
    p: CogniteProvider, status: int, body: Any, exc: type, code: str
) -> None:
    for parse in (p.parse_create, p.parse_poll):
        with pytest.raises(exc) as info:
            parse(resp(status, body), job())
        err_ = info.value
        assert isinstance(err_, HarvesterError)
        assert err_.code == code and err_.request_id == "rid-9" and err_.status == status
        text = str(err_)
        assert f"code {code}" in text and "request id rid-9" in text and "cognite" in text
        assert body["error"]["message"][:20] in text


def test_missing_and_duplicated_are_named(p: CogniteProvider) -> None:
    body = err(400, "Files not found", missing=[{"fileId": i} for i in range(8)])
    with pytest.raises(InvalidPayload) as info:
        p.parse_create(resp(400, body), job())
    assert "missing: {'fileId': 0}" in str(info.value) and "and 3 more" in str(info.value)


@pytest.mark.parametrize(
    "body", [b"<html>", b"", {"error": "flat string"}, {"message": "x"}, {"error": {"code": []}}]
)
def test_odd_error_bodies_still_typed_by_status(p: CogniteProvider, body: Any) -> None:
    with pytest.raises(InvalidPayload):
        p.parse_create(resp(400, body), job())
    with pytest.raises(CredentialsError):
        p.parse_poll(resp(401, body, request_id=None), job())


# -- status mapping ------------------------------------------------------------------------
# One case per status of the segmentation reference (seed 001), then undocumented ones.
@pytest.mark.parametrize(
    ("raw", "state", "known"),
    [
        ("Queued", RemoteState.RUNNING, True),
        ("Running", RemoteState.RUNNING, True),
        ("Completed", RemoteState.SUCCEEDED, True),
        ("Failed", RemoteState.FAILED, True),
        ("Distributing", RemoteState.RUNNING, False),  # other CDF context jobs say this
        ("completed", RemoteState.RUNNING, False),
    ],
)
def test_status_mapping(p: CogniteProvider, raw: str, state: RemoteState, known: bool) -> None:
    body = {**COMPLETED, "status": raw}
    status = p.parse_poll(resp(200, body), job())
    assert isinstance(status, Status)
    assert (status.state, status.raw, status.known) == (state, raw, known)
    assert status.document == body


def test_failed_reason_joins_error_messages(p: CogniteProvider) -> None:
    body = {
        "status": "Failed",
        "jobId": 777,
        "errorMessage": "Segmentation failed",
        "failedItems": [
            {"errorMessage": "File 1234 is not an image", "items": [{"fileId": 1234}]},
            {"errorMessage": "File 1234 is not an image", "items": [{"fileId": 1234}]},
            "junk",
        ],
    }
    status = p.parse_poll(resp(200, body), job())
    assert isinstance(status, Status) and status.state == RemoteState.FAILED
    assert status.reason == "Segmentation failed; File 1234 is not an image"
    bare = p.parse_poll(resp(200, {"status": "Failed"}), job())
    assert isinstance(bare, Status) and bare.reason and "Failed" in bare.reason


def test_completed_with_only_failed_items_is_a_failure(p: CogniteProvider) -> None:
    body = {
        "status": "Completed",
        "items": [],
        "failedItems": [{"errorMessage": "image too large", "items": [{"fileId": 1}]}],
    }
    status = p.parse_poll(resp(200, body), job())
    assert isinstance(status, Status)
    assert status.state == RemoteState.FAILED and status.reason == "image too large"
    done = p.parse_poll(resp(200, COMPLETED), job())
    assert isinstance(done, Status) and done.state == RemoteState.SUCCEEDED
    assert done.progress == 100.0


@pytest.mark.parametrize(
    "body",
    [
        {"jobId": 777},
        {"status": 3},
        {"status": ""},
        {"status": "Completed", "items": {"a": 1}},
        ["Completed"],
        b"not json",
    ],
)
def test_malformed_poll_answers(p: CogniteProvider, body: Any) -> None:
    with pytest.raises(ProtocolError):
        p.parse_poll(resp(200, body), job())


def test_poll_404_is_a_failed_job(p: CogniteProvider) -> None:
    with pytest.raises(ProviderJobFailed, match="does not know this job id"):
        p.parse_poll(resp(404, err(404, "Job not found")), job())


@pytest.mark.anyio
async def test_poll_through_a_client(p: CogniteProvider) -> None:
    client = FakeClient(lambda spec: resp(200, {**COMPLETED, "status": "Running"}))
    status = await p.poll(job(), client)
    assert isinstance(status, Status) and status.state == RemoteState.RUNNING
    assert [s.url for s in client.specs] == [f"{SEGMENT}/777"]


# -- payload validation --------------------------------------------------------------------
def test_valid_payloads(p: CogniteProvider) -> None:
    p.validate_payload(PAYLOAD)
    # Every documented way to name the file, and a box without points ("points and/or box").
    p.validate_payload(
        {**PAYLOAD, "items": [{"fileInstanceId": {"space": "s", "externalId": "x"}}]}
    )
    p.validate_payload({**PAYLOAD, "points": []})
    p.validate_payload(
        {"items": [{"fileExternalId": "x"}], "points": [{"x": 1, "y": 0, "label": 0}]}
    )


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (None, "JSON object"),
        ({"points": PAYLOAD["points"]}, "exactly one file"),
        ({**PAYLOAD, "items": []}, "exactly one file"),
        ({**PAYLOAD, "items": [{"fileId": 1}, {"fileId": 2}]}, "exactly one file"),
        ({**PAYLOAD, "items": [{"fileId": 1, "fileExternalId": "a"}]}, "exactly one of"),
        ({**PAYLOAD, "items": [{}]}, "exactly one of"),
        ({**PAYLOAD, "items": ["x"]}, "must be an object"),
        ({**PAYLOAD, "items": [{"fileId": "12"}]}, "fileId must be an integer"),
        ({**PAYLOAD, "items": [{"fileId": True}]}, "fileId must be an integer"),
        ({**PAYLOAD, "items": [{"fileId": 0}]}, "fileId must be an integer"),
        ({**PAYLOAD, "items": [{"fileId": 2**64}]}, "fileId must be an integer"),
        ({**PAYLOAD, "items": [{"fileExternalId": ""}]}, "fileExternalId"),
        ({"items": PAYLOAD["items"], "points": []}, "non-empty without a boundingBox"),
        ({**PAYLOAD, "points": "x"}, "must be a list"),
        ({**PAYLOAD, "points": [PAYLOAD["points"][0]] * 2}, r"points\[1\] repeats .*points\[0\]"),
        ({**PAYLOAD, "points": [{"x": 0, "y": 0, "label": 1, "z": 0}]}, "only x, y and label"),
        ({**PAYLOAD, "prompt": {}}, "payload.prompt is not a field"),
        ({**PAYLOAD, "boundingBox": {**PAYLOAD["boundingBox"], "w": 1}}, "only xMin"),
        ({**PAYLOAD, "items": [{"fileInstanceId": {"space": "s"}}]}, r"\{space, externalId\}"),
        ({**PAYLOAD, "items": [{"fileInstanceId": "s/x"}]}, r"\{space, externalId\}"),
        (
            {**PAYLOAD, "items": [{"fileInstanceId": {"space": "", "externalId": "x"}}]},
            r"fileInstanceId\.space must be a string",
        ),
        (
            {**PAYLOAD, "items": [{"fileInstanceId": {"space": "s", "externalId": 7}}]},
            r"fileInstanceId\.externalId must be a string",
        ),
        (
            {
                **PAYLOAD,
                "items": [{"fileId": 1, "fileInstanceId": {"space": "s", "externalId": "x"}}],
            },
            "exactly one of",
        ),
        ({**PAYLOAD, "points": [5]}, r"points\[0\] must be an object"),
        ({**PAYLOAD, "points": [{"x": 1.5, "y": 0, "label": 1}]}, r"points\[0\]\.x"),
        ({**PAYLOAD, "points": [{"x": 0, "y": -0.1, "label": 1}]}, r"points\[0\]\.y"),
        ({**PAYLOAD, "points": [{"x": 0, "label": 1}]}, r"points\[0\]\.y"),
        ({**PAYLOAD, "points": [{"x": float("nan"), "y": 0, "label": 1}]}, r"\.x"),
        ({**PAYLOAD, "points": [{"x": True, "y": 0, "label": 1}]}, r"\.x"),
        ({**PAYLOAD, "points": [{"x": 0, "y": 0, "label": 2}]}, "label must be 0"),
        ({**PAYLOAD, "points": [{"x": 0, "y": 0, "label": True}]}, "label must be 0"),
        ({**PAYLOAD, "points": [{"x": 0, "y": 0, "label": 1.0}]}, "label must be 0"),
        ({**PAYLOAD, "boundingBox": [0, 0, 1, 1]}, "boundingBox must be an object"),
        ({**PAYLOAD, "boundingBox": {"xMin": 0, "yMin": 0, "xMax": 1}}, "yMax"),
        ({**PAYLOAD, "boundingBox": {"xMin": 0, "yMin": 0, "xMax": 2, "yMax": 1}}, "xMax"),
        (
            {**PAYLOAD, "boundingBox": {"xMin": 0.5, "yMin": 0, "xMax": 0.5, "yMax": 1}},
            "xMin < xMax",
        ),
        (
            {**PAYLOAD, "boundingBox": {"xMin": 0, "yMin": 0.9, "xMax": 1, "yMax": 0.1}},
            "yMin < yMax",
        ),
    ],
)
def test_invalid_payloads(p: CogniteProvider, payload: Any, words: str) -> None:
    with pytest.raises(InvalidPayload, match=words):
        p.validate_payload(payload)


# -- harvest -------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_harvest_writes_job_and_segments_as_served(p: CogniteProvider) -> None:
    status = p.parse_poll(resp(200, COMPLETED), job())
    assert isinstance(status, Status)
    io = RecordingIO()
    await p.harvest(job(), status, io)
    assert set(io.files) == {"job.json", "segments.json"}
    assert orjson.loads(io.files["job.json"]) == COMPLETED
    assert orjson.loads(io.files["segments.json"]) == {"items": COMPLETED["items"]}


@pytest.mark.anyio
async def test_harvest_refuses_a_document_without_items(p: CogniteProvider) -> None:
    io = RecordingIO()
    with pytest.raises(ProtocolError):
        await p.harvest(job(), Status(RemoteState.SUCCEEDED, "Completed", document={}), io)
    assert io.files == {}
