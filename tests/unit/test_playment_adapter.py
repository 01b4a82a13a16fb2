"""The Playment adapter on recorded bodies: no network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict

from harvester.config import PlaymentConfig, SecretRef
from harvester.errors import (
    CredentialsError,
    InvalidPayload,
    ProtocolError,
    ProviderJobFailed,
    ProviderUnavailable,
)
from harvester.jobs import Job, JobState
from harvester.providers.base import (
    Accepted,
    AlreadyExists,
    Found,
    NextPage,
    NotFound,
    RemoteState,
    Response,
    Status,
)
from harvester.providers.playment import PlaymentProvider, classes_from_annotations

CFG = PlaymentConfig(
    name="playment",
    base_url="https://api.example/",
    api_key=SecretRef("k", env="X"),
    project_id="p1",
    batch_id="b1",
)


def job(**kw: Any) -> Job:
    base: dict[str, Any] = {
        "provider": "playment",
        "key": "scan-1",
        "reference_id": "scan-1",
        "remote_id": "j-1",
        "state": JobState.RUNNING,
        "created_at": 0.0,
        "updated_at": 0.0,
    }
    base.update(kw)
    return Job(**base)


def resp(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(status, CIMultiDict(headers or {}), raw, "https://api.example/x", "rid-1")


def err(code: str, message: str = "m") -> dict[str, Any]:
    return {"success": False, "error": {"code": code, "message": message}}


@pytest.fixture
def p() -> PlaymentProvider:
    return PlaymentProvider(CFG)


def test_create_body_carries_reference_batch_and_workflow(p: PlaymentProvider) -> None:
    spec = p.build_create(job(remote_id=None), {"data": {"image_url": "u"}, "work_flow_id": "w"})
    assert spec.method == "POST"
    assert spec.url == "https://api.example/v1/projects/p1/jobs"
    assert spec.idempotent is False
    assert spec.json == {
        "reference_id": "scan-1",
        "data": {"image_url": "u"},
        "work_flow_id": "w",
        "batch_id": "b1",
    }


def test_create_answers(p: PlaymentProvider) -> None:
    ok = {"data": {"job_id": "j-9", "reference_id": "scan-1", "work_flow_id": "w"}, "success": True}
    assert p.parse_create(resp(200, ok), job()) == Accepted("j-9")
    dup = p.parse_create(resp(400, err("FS_0001", "reference_id already exists")), job())
    assert isinstance(dup, AlreadyExists)


@pytest.mark.parametrize(
    ("status", "body", "exc"),
    [
        (400, err("FS_0003"), InvalidPayload),
        (400, err("GE_0001"), InvalidPayload),
        (401, err("auth-failure"), CredentialsError),
        (200, err("unauthorized"), CredentialsError),
        (400, err("FS_0000"), ProviderUnavailable),
        (200, err("api_error"), ProviderUnavailable),
        (200, {"success": True, "data": {}}, ProtocolError),
        (200, {"data": {"job_id": "x"}}, ProtocolError),
        (200, b"<html>bad gateway</html>", ProtocolError),
        (502, b"<html>bad gateway</html>", ProviderUnavailable),
    ],
)
def test_create_errors_are_typed(p: PlaymentProvider, status: int, body: Any, exc: type) -> None:
    with pytest.raises(exc) as info:
        p.parse_create(resp(status, body), job())
    assert "playment" in str(info.value)


def test_200_with_success_false_keeps_code_and_request_id(p: PlaymentProvider) -> None:
    with pytest.raises(InvalidPayload) as info:
        p.parse_create(resp(200, err("FS_0004", "bad frames")), job())
    text = str(info.value)
    assert "bad frames" in text and "FS_0004" in text and "rid-1" in text


def test_status_mapping_keeps_raw_value(p: PlaymentProvider) -> None:
    def doc(status: str, result: str = "") -> dict[str, Any]:
        return {"data": {"status": status, "result": result, "job_id": "j-1"}, "success": True}

    running = p.parse_poll(resp(200, doc("in_progress")), job())
    assert isinstance(running, Status)
    assert (running.state, running.raw) == (RemoteState.RUNNING, "in_progress")
    odd = p.parse_poll(resp(200, doc("something-new")), job())
    assert isinstance(odd, Status) and odd.state == RemoteState.RUNNING
    assert odd.raw == "something-new"
    early = p.parse_poll(resp(200, doc("completed")), job())
    assert isinstance(early, Status) and early.state == RemoteState.RUNNING
    done = p.parse_poll(resp(200, doc("completed", "https://s/r.json")), job())
    assert isinstance(done, Status) and done.state == RemoteState.SUCCEEDED
    assert done.document["result"] == "https://s/r.json"
    with pytest.raises(ProviderJobFailed):
        p.parse_poll(resp(404, err("GE_0001")), job())
    with pytest.raises(ProtocolError):
        p.parse_poll(resp(200, {"success": True, "data": {"status": 3}}), job())


def test_find_pages_through_batch(p: PlaymentProvider) -> None:
    spec = p.build_find(job(remote_id=None), None)
    assert spec is not None and spec.url.endswith("/v1/projects/p1/batch/b1")
    assert spec.params == {}
    page = {
        "success": True,
        "data": {"jobs": [{"id": "a", "reference_id": "other"}], "next_page_token": "t2"},
    }
    assert p.parse_find(resp(200, page), job()) == NextPage("t2")
    spec2 = p.build_find(job(), "t2")
    assert spec2 is not None and spec2.params == {"page_token": "t2"}
    last = {"success": True, "data": {"jobs": [{"id": "z", "reference_id": "scan-1"}]}}
    assert p.parse_find(resp(200, last), job()) == Found("z")
    none = {"success": True, "data": {"jobs": [], "next_page_token": None}}
    assert p.parse_find(resp(200, none), job()) == NotFound()


def test_no_batch_means_setup_then_find() -> None:
    p = PlaymentProvider(PlaymentConfig(name="playment", base_url="http://h", project_id="p"))
    assert p.build_find(job(), None) is None
    spec = p.setup_spec()
    assert spec is not None and spec.idempotent is False and spec.url == "http://h/v1/projects/p/batch"
    assert p.parse_setup(resp(200, {"success": True, "data": {"batch_id": "B"}})) == "B"
    assert p.setup_spec() is None and p.batch_id == "B"


def test_attachment_redirect_resolves_relative_and_absolute(p: PlaymentProvider) -> None:
    spec = p.build_attachment("https://bucket/x/mask.txt")
    assert spec.params == {"url": "https://bucket/x/mask.txt"}
    assert spec.follow_redirects is False
    r = resp(302, b"", {"Location": "http://storage:9/x/mask.txt?X-Amz-Signature=abc"})
    assert p.parse_attachment(r, "u") == "http://storage:9/x/mask.txt?X-Amz-Signature=abc"
    r = resp(307, b"", {"Location": "/x/m?sig=1"})
    assert p.parse_attachment(r, "u") == "https://api.example/x/m?sig=1"
    with pytest.raises(ProtocolError):
        p.parse_attachment(resp(302, b"", {}), "u")
    with pytest.raises(InvalidPayload):
        p.parse_attachment(resp(404, err("FS_0007")), "u")


@pytest.mark.parametrize(
    "payload",
    [
        None,
        [],
        {"data": {}},
        {"data": "x"},
        {"data": {"sensor_data": {"frames": []}}},
        {"data": {"sensor_data": {"frames": [{"frame_id": 3}]}}},
        {"data": {"image_url": "u"}, "reference_id": "x"},
        {"data": {"image_url": "u"}, "work_flow_id": 5},
    ],
)
def test_payload_validation(p: PlaymentProvider, payload: Any) -> None:
    with pytest.raises(InvalidPayload):
        p.validate_payload(payload)


def test_classes_from_annotations_one_per_label_key() -> None:
    ad = {
        "annotations": [
            {"label": "car", "label_key": 3, "class_id": "c3", "color": "#f00"},
            {"label": "car", "label_key": 3, "class_id": "c3", "color": "#f00"},
            {"label": "road", "label_key": 10, "class_id": "c10", "color": "#0f0"},
            {"label": "ground", "label_key": 2, "class_id": "c2", "color": "#00f"},
        ]
    }
    classes = classes_from_annotations(ad, job())
    assert list(classes) == ["2", "3", "10"]
    assert classes["3"] == {"label": "car", "class_id": "c3", "color": "#f00"}


def test_module_has_no_network_imports() -> None:
    import harvester.providers.playment as mod

    source = Path(mod.__file__).read_text()
    for forbidden in ("aiohttp", "harvester.transport", "harvester.engine", "anyio"):
        assert forbidden not in source
