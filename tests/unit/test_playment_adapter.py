"""The Playment adapter on recorded bodies: no network."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest

from harvester.config import PlaymentConfig, SecretRef
from harvester.errors import (
    CredentialsError,
    InvalidPayload,
    ProtocolError,
    ProviderJobFailed,
    ProviderUnavailable,
)
from harvester.jobs import Job
from harvester.providers.base import (
    Accepted,
    AlreadyExists,
    Found,
    NextPage,
    NotFound,
    RemoteState,
    Status,
)
from harvester.providers.playment import PlaymentProvider, classes_from_annotations
from harvester.wire import Response
from tests.unit.adapters import RecordingIO, answer, make_job

CFG = PlaymentConfig(
    name="playment",
    base_url="https://api.example/",
    api_key=SecretRef("k", env="X"),
    project_id="p1",
    batch_id="b1",
)


def job(**kw: Any) -> Job:
    return make_job("playment", "scan-1", "j-1", **kw)


def resp(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return answer(status, body, url="https://api.example/x", request_id="rid-1", headers=headers)


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
    assert (
        spec is not None and spec.idempotent is False and spec.url == "http://h/v1/projects/p/batch"
    )
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
        {"data": {"image_url": "https://x/1.jpg"}, "reference_id": 5},
        {"data": {"image_url": ""}},
        {"data": {"video_data": {"frames": []}}},
        {
            "data": {
                "video_data": {"frames": [{"frame_id": "a", "src": "https://x/1.jpg"}]},
                "reference_data": {"raster": {"images": [{"frame_id": "a", "data": [{}]}]}},
            }
        },
        {"data": {"sensor_data": {"frames": [{"frame_id": "a", "sensors": [{"data_url": "u"}]}]}}},
        {"data": {"image_url": "u"}, "work_flow_id": 5},
    ],
)
def test_payload_validation(p: PlaymentProvider, payload: Any) -> None:
    with pytest.raises(InvalidPayload):
        p.validate_payload(payload)


def test_work_flow_id_is_required_from_the_payload_or_the_config(p: PlaymentProvider) -> None:
    data = {"image_url": "https://x/1.jpg"}
    with pytest.raises(InvalidPayload, match=r"payload\.work_flow_id is missing"):
        p.validate_payload({"data": data})
    p.validate_payload({"data": data, "work_flow_id": "wf"})
    p.validate_payload({"data": data, "tag": "wf"})  # what the official SDK sends
    PlaymentProvider(dataclasses.replace(CFG, work_flow_id="wf")).validate_payload({"data": data})


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


# -- image/video results: attachments ------------------------------------------------------
VIDEO_RESULT: dict[str, Any] = {
    "frames": [
        {
            "frame_id": "f-001",
            "src": "https://bucket/in/f-001.jpg",  # the input frame: not a result file
            "label_url": "https://bucket/out/f-001/label.png",
            "annotations": [
                {"label": "car", "mask_url": "https://bucket/out/f-001/mask.png?v=1"},
                {"label": "bus", "mask_url": "https://bucket/out/f-001/other/mask.png"},
            ],
        },
        {
            "frame_id": 2,
            "label_url": "https://bucket/out/f-002/label.png",
            "urls": ["https://bucket/out/f-002/a.bin", "not a url", "ftp://bucket/x"],
        },
        {"imageUrl": "https://bucket/out/third.png", "url": 5},
    ],
    "legend": [{"id": "c1", "text": "car", "color": "#f00", "label_key": 1, "value": 1}],
    "summary_url": "https://bucket/out/summary.json",
    "also": {"label_url": "https://bucket/out/f-001/label.png"},  # a repeat: fetched once
    "notes": "see https://bucket/out/readme.txt",
}


def test_find_attachments_rule() -> None:
    from harvester.providers.playment import find_attachments

    found = find_attachments(VIDEO_RESULT)
    assert [(a.relpath, a.frame, a.json_path) for a in found] == [
        ("outputs/f-001/label.png", "f-001", "$.frames[0].label_url"),
        ("outputs/f-001/mask.png", "f-001", "$.frames[0].annotations[0].mask_url"),
        (
            f"outputs/f-001/mask+{_sha8('https://bucket/out/f-001/other/mask.png')}.png",
            "f-001",
            "$.frames[0].annotations[1].mask_url",
        ),
        ("outputs/2/label.png", "2", "$.frames[1].label_url"),
        ("outputs/2/a.bin", "2", "$.frames[1].urls[0]"),
        ("outputs/2/third.png", "2", "$.frames[2].imageUrl"),
        ("outputs/0/summary.json", "0", "$.summary_url"),
    ]


def test_find_attachments_frames_without_ids_use_the_outer_index() -> None:
    from harvester.providers.playment import find_attachments

    result = {
        "images": [{"layers": [{"mask_url": "https://b/a.png"}]}, {"mask_url": "https://b/b.png"}]
    }
    assert [a.relpath for a in find_attachments(result)] == [
        "outputs/0/a.png",
        "outputs/1/b.png",
    ]
    hostile = {"frame_id": "../../etc", "label_url": "https://b/x/..%2F..%2Fpasswd"}
    (att,) = find_attachments(hostile)
    assert ".." not in att.relpath.split("/") and att.relpath.count("/") == 2


def test_find_attachments_refuses_absurd_results() -> None:
    from harvester.providers.playment import MAX_RESULT_DEPTH, find_attachments

    deep: Any = "https://b/x.png"
    for _ in range(MAX_RESULT_DEPTH + 2):
        deep = {"n": deep}
    with pytest.raises(ValueError, match="nested deeper"):
        find_attachments(deep)


def _sha8(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:8]


class _AttachmentIO(RecordingIO):
    provider = "Playment's image/video result"

    def __init__(self, result: Any, inputs: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.input_urls = inputs
        self.result = orjson.dumps(result)
        self.downloads: dict[str, str] = {}

    async def request(self, spec: Any) -> Response:
        # The attachments API redirects to a signed URL on the storage host.
        url = spec.params["url"]
        return resp(302, b"", {"Location": f"https://storage.example/signed?src={url}"})

    async def fetch(self, resolve: Any, *, what: str) -> bytes:
        await resolve()
        return self.result

    async def download(self, relpath: str, resolve: Any) -> None:
        self.downloads[relpath] = await resolve()


@pytest.mark.anyio
async def test_image_video_result_downloads_attachments(p: PlaymentProvider) -> None:
    io = _AttachmentIO(VIDEO_RESULT)
    doc = {"status": "completed", "result": "https://bucket/out/result.json", "job_id": "j-1"}
    await p.harvest(job(), Status(RemoteState.SUCCEEDED, "completed", document=doc), io)
    assert set(io.files) == {"job.json", "result.json", "classes.json", "attachments.json"}
    assert len(io.downloads) == 7
    assert io.downloads["outputs/f-001/label.png"] == (
        "https://storage.example/signed?src=https://bucket/out/f-001/label.png"
    )
    classes = orjson.loads(io.files["classes.json"])
    assert classes == {"1": {"label": "car", "class_id": "c1", "color": "#f00", "value": 1}}
    index = orjson.loads(io.files["attachments.json"])
    assert index[1] == {
        "file": "outputs/f-001/mask.png",
        "frame": "f-001",
        "json_path": "$.frames[0].annotations[0].mask_url",
        "url_path": "/out/f-001/mask.png",
    }


@pytest.mark.anyio
async def test_result_without_attachments_keeps_just_the_result(p: PlaymentProvider) -> None:
    io = _AttachmentIO({"annotations": [{"label": "car"}]})
    doc = {"status": "completed", "result": "https://bucket/out/result.json"}
    await p.harvest(job(), Status(RemoteState.SUCCEEDED, "completed", document=doc), io)
    assert set(io.files) == {"job.json", "result.json"} and io.downloads == {}


@pytest.mark.anyio
async def test_inputs_echoed_in_a_result_are_not_downloaded(p: PlaymentProvider) -> None:
    result = {
        "annotation_data": {
            "annotations": [{"label": "car", "label_key": 1}],
            "image_url": "https://customer.example/in/1.jpg",
            "mask_url": "https://bucket/out/mask-0.png",
        },
        "legend": [{"id": "c1", "text": "car", "color": "#f00", "label_key": 1, "value": 1}],
    }
    io = _AttachmentIO(result, inputs=frozenset({"https://customer.example/in/1.jpg"}))
    doc = {"status": "completed", "result": "https://bucket/out/result.json"}
    await p.harvest(job(), Status(RemoteState.SUCCEEDED, "completed", document=doc), io)
    # annotation_data without masks is an image result, not a point cloud
    assert list(io.downloads) == ["outputs/0/mask-0.png"]
    assert "classes.json" in io.files


def test_mask_files_one_per_frame_and_sensor() -> None:
    from harvester.providers.playment import mask_files

    def m(frame: str, sensor: Any, n: int) -> dict[str, Any]:
        return {"frame_id": frame, "sensor_id": sensor, "label_url": f"https://b/{n}.txt"}

    masks = [m("0", "lidar", 1), m("1", "top", 2), m("1", "rear", 3), m("2", "", 4)]
    masks += [m("a/b", "x y", 5), m("a/b", None, 6)]
    names = [(name, frame, sensor) for name, frame, sensor, _url in mask_files(masks, job())]
    assert names[:4] == [
        ("0", "0", "lidar"),  # one mask: the single-sensor layout, unchanged
        ("1@top", "1", "top"),
        ("1@rear", "1", "rear"),
        ("2", "2", None),
    ]
    # ids are made safe like job keys (never an '@'), the sensorless one ends in '@'
    assert names[4][0].startswith("a_b+") and names[4][0].split("@")[1].startswith("x_y+")
    assert names[5][0] == names[4][0].split("@")[0] + "@"
    for dup in ([m("1", "top", 1), m("1", "top", 2)], [m("1", "", 1), m("1", None, 2)]):
        with pytest.raises(ProtocolError, match="two masks for frame '1'"):
            mask_files(dup, job())
    with pytest.raises(ProtocolError, match="sensor_id that is not a string"):
        mask_files([m("1", 7, 1)], job())
