from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from conftest import API_KEY, PROJECT, MakeClient, PlaymentClient, point_cloud_body

from harvester.emulator import truth

pytestmark = pytest.mark.anyio

JOB_KEYS = {
    "project_id",
    "reference_id",
    "job_id",
    "batch_id",
    "status",
    "work_flow_id",
    "priority_weight",
    "tag",
    "result",
}


async def test_job_runs_to_completed_and_masks_match_ground_truth(api: PlaymentClient) -> None:
    frames = ("f0", "f1", "f2")
    job_id = await api.create_job("scan-1", frames)
    first = await api.job(job_id)
    assert first["status"] == "created" and first["result"] == ""
    done = await api.wait_completed(job_id)
    assert done["_seen"][0] == "created" and done["_seen"][-1] == "completed"
    assert done["result"].startswith(api.emu.urls["storage"] + "/playment-private/")

    result = json.loads(await api.download(done["result"]))
    ann = result["annotation_data"]
    assert [f["_id"] for f in ann["frames"]] == list(frames)
    assert [m["frame_id"] for m in ann["masks"]] == list(frames)
    assert result["sensor_data"]["frames"][0]["frame_id"] == "f0"
    seed, p = api.emu.scenario.seed, api.emu.scenario.playment
    present: set[int] = set()
    for mask in ann["masks"]:
        assert mask["sensor_id"] == "lidar" and mask["type"] == "segmentation3d"
        labels = np.array(json.loads(await api.download(mask["label_url"])), dtype=np.uint16)
        n = truth.points_for_frame(seed, "scan-1", mask["frame_id"], p.points_per_frame)
        expected = truth.frame_labels(seed, "scan-1", mask["frame_id"], n, p.num_labels)
        assert np.array_equal(labels, expected)
        served = await api.introspect("GET", f"/truth/playment/scan-1/{mask['frame_id']}")
        assert served == expected.tolist()
        present |= set(expected.tolist())
    assert {a["label_key"] for a in ann["annotations"]} == present
    for a in ann["annotations"]:
        assert {"label", "label_key", "class_id", "track_id", "color"} <= a.keys()
        assert a["color"].startswith("#") and len(a["color"]) == 7


async def test_duplicate_reference_id_is_fs_0001_and_creates_one_job(api: PlaymentClient) -> None:
    body = point_cloud_body("dup-1")
    assert (await api.create(body))[0] == 200
    status, doc = await api.create(body)
    assert status == 400
    assert doc == {
        "success": False,
        "error": {"code": "FS_0001", "message": "reference_id already exists"},
    }
    stats = await api.introspect("GET", "/stats")
    pm = stats["playment"]
    assert pm["creates"] == 1 and pm["duplicate_creates"] == 1
    assert pm["creates_by_reference"] == {PROJECT: {"dup-1": 2}}
    assert pm["jobs_by_reference"] == {PROJECT: {"dup-1": 1}}
    assert pm["max_jobs_per_reference"] == 1


async def test_sdk_paths_and_body_are_accepted(api: PlaymentClient) -> None:
    status, doc = await api.request(
        "POST",
        f"/v1/project/{PROJECT}/batch",
        json={"name": "b1", "label": "b1", "description": ""},
    )
    assert status == 200 and doc["success"] is True
    batch_id = doc["data"]["batch_id"]
    sdk_body = {
        "id": None,
        "reference_id": "sdk-1",
        "tag": "my-tag",
        "data": point_cloud_body("x")["data"],
        "batch_id": batch_id,
        "priority_weight": 5,
    }
    status, doc = await api.create(sdk_body, f"/projectsvc/projects/{PROJECT}/jobs")
    assert status == 200, doc
    assert doc["data"]["work_flow_id"] == "my-tag"
    job = await api.job(doc["data"]["job_id"], version="v0")
    assert set(job) == JOB_KEYS  # the SDK namedtuples every key: nothing undocumented
    assert job["tag"] == "my-tag" and job["batch_id"] == batch_id
    assert isinstance(job["priority_weight"], int) and isinstance(job["result"], str)
    status, listed = await api.request("GET", f"/v0/projects/{PROJECT}/batch/{batch_id}")
    assert [j["reference_id"] for j in listed["data"]["jobs"]] == ["sdk-1"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"work_flow_id": "w", "data": {"image_url": "http://x/1.png"}}, "FS_0002"),
        ({"reference_id": "", "work_flow_id": "w", "data": {"image_url": "u"}}, "FS_0002"),
        ({"reference_id": "r", "work_flow_id": "w", "data": "nope"}, "FS_0003"),
        ({"reference_id": "r", "work_flow_id": "w", "data": {"other": 1}}, "FS_0003"),
        ({"reference_id": "r", "work_flow_id": "w", "data": {"sensor_data": {}}}, "FS_0004"),
        (
            {"reference_id": "r", "work_flow_id": "w", "data": {"sensor_data": {"frames": [{}]}}},
            "FS_0004",
        ),
        (
            {"reference_id": "r", "work_flow_id": "w", "data": {"video_data": {"frames": [1]}}},
            "FS_0004",
        ),
        ({**point_cloud_body("r"), "batch_id": "no-such-batch"}, "GE_0001"),
    ],
)
async def test_bad_create_bodies_get_documented_codes(
    api: PlaymentClient, body: dict[str, Any], code: str
) -> None:
    status, doc = await api.create(body)
    assert status == 400
    assert doc["success"] is False and doc["error"]["code"] == code
    assert (await api.introspect("GET", "/stats"))["playment"]["creates"] == 0


async def test_invalid_json_is_a_400_with_envelope(api: PlaymentClient) -> None:
    status, doc = await api.request("POST", f"/v1/projects/{PROJECT}/jobs", data=b"{nope")
    assert status == 400 and doc["success"] is False and doc["error"]["code"] == "GE_0001"


async def test_image_and_video_results_link_private_masks(api: PlaymentClient) -> None:
    image = {"reference_id": "img-1", "work_flow_id": "w", "data": {"image_url": "http://i/1.png"}}
    video = {
        "reference_id": "vid-1",
        "work_flow_id": "w",
        "data": {"video_data": {"frames": [{"frame_id": "a", "src": "http://v/a.png"}]}},
    }
    for body in (image, video):
        status, doc = await api.create(body)
        assert status == 200, doc
        done = await api.wait_completed(doc["data"]["job_id"])
        result = json.loads(await api.download(done["result"]))
        ad = result["annotation_data"]
        assert result["legend"] and ad["annotations"]
        if body is image:
            assert ad["image_url"] == "http://i/1.png"  # the input, echoed
            masks = [ad["mask_url"]]
        else:
            assert [f["src"] for f in ad["frames"]] == ["http://v/a.png"]
            masks = [f["mask_url"] for f in ad["frames"]]
        for i, url in enumerate(masks):
            expected = truth.image_mask_bytes(api.emu.scenario.seed, body["reference_id"], i)
            assert await api.download(url) == expected


async def test_missing_and_wrong_keys_get_401_bodies(make_client: MakeClient) -> None:
    api = await make_client({"playment": {"valid_api_keys": [API_KEY]}})
    status, doc = await api.request("GET", f"/v1/projects/{PROJECT}/jobs/x", key=None)
    assert status == 401
    assert doc["success"] is False and doc["error"]["code"] == "auth-failure"
    status, doc = await api.request("GET", f"/v1/projects/{PROJECT}/jobs/x", key="wrong")
    assert status == 401
    assert doc["success"] is False and doc["error"]["code"] == "unauthorized"
    status, doc = await api.request("GET", f"/v1/projects/{PROJECT}/jobs/x")
    assert status == 404 and doc["error"]["code"] == "GE_0001"


async def test_unknown_job_and_unknown_path_use_the_envelope(api: PlaymentClient) -> None:
    job_id = await api.create_job("r-404")
    status, doc = await api.request("GET", f"/v1/projects/other-project/jobs/{job_id}")
    assert status == 404 and doc == {
        "success": False,
        "error": {"code": "GE_0001", "message": f"job {job_id} not found"},
    }
    status, doc = await api.request("GET", "/v2/whatever")
    assert status == 404 and doc["success"] is False


async def test_batch_listing_pages_by_100_in_creation_order(api: PlaymentClient) -> None:
    status, doc = await api.request(
        "POST", f"/v1/projects/{PROJECT}/batch", json={"name": "big", "description": "d"}
    )
    batch_id = doc["data"]["batch_id"]
    refs = [f"ref-{i:03d}" for i in range(250)]
    for ref in refs:
        body = {**point_cloud_body(ref), "batch_id": batch_id}
        assert (await api.create(body))[0] == 200
    pages: list[list[str]] = []
    token = ""
    for _ in range(10):
        status, doc = await api.request(
            "GET", f"/v1/projects/{PROJECT}/batch/{batch_id}", params={"page_token": token}
        )
        assert status == 200 and doc["success"] is True
        pages.append([j["reference_id"] for j in doc["data"]["jobs"]])
        assert all({"id", "reference_id", "status"} == set(j) for j in doc["data"]["jobs"])
        token = doc["data"]["next_page_token"]
        if token is None:
            break
    assert [len(p) for p in pages] == [100, 100, 50]
    assert [r for p in pages for r in p] == refs

    status, doc = await api.request(
        "POST", f"/v1/projects/{PROJECT}/batch", json={"name": "big", "description": ""}
    )
    assert status == 400 and doc["error"]["code"] == "GE_0001"
    status, doc = await api.request(
        "GET", f"/v1/projects/{PROJECT}/batch/{batch_id}", params={"page_token": "garbage!"}
    )
    assert status == 400 and doc["success"] is False


async def test_jobs_without_batch_go_to_the_default_batch(api: PlaymentClient) -> None:
    job = await api.job(await api.create_job("default-1"))
    status, doc = await api.request("GET", f"/v1/projects/{PROJECT}/batch/{job['batch_id']}")
    assert status == 200
    assert [j["id"] for j in doc["data"]["jobs"]] == [job["job_id"]]


async def test_attachments_refuses_unknown_urls(api: PlaymentClient) -> None:
    status, doc = await api.request(
        "GET", "/v1/attachments", params={"url": "https://elsewhere.example/x.json"}
    )
    assert status == 404 and doc["error"]["code"] == "FS_0007"
    job_id = await api.create_job("not-yet")
    unfinished = f"{api.emu.urls['storage']}/playment-private/{PROJECT}/{job_id}/result.json"
    assert (await api.resolve(unfinished))[0] == 404


async def test_redirect_status_is_configurable(make_client: MakeClient) -> None:
    api = await make_client({"playment": {"attachments_redirect_status": 307}})
    done = await api.wait_completed(await api.create_job("r307"))
    status, location = await api.resolve(done["result"])
    assert status == 307 and location and "X-Amz-Signature=" in location


async def test_pcd_variant_for_single_frame_jobs(make_client: MakeClient) -> None:
    api = await make_client({"playment": {"result_variant": "pcd"}})
    single = await api.wait_completed(await api.create_job("pcd-1", ("only",)))
    result = json.loads(await api.download(single["result"]))
    assert result["url"].endswith("_data.pcd")
    text = (await api.download(result["url"])).decode()
    body = text.partition("DATA ascii\n")[2]
    labels = np.array([int(line.rsplit(" ", 1)[1]) for line in body.splitlines()])
    expected = await api.introspect("GET", "/truth/playment/pcd-1/only")
    assert labels.tolist() == expected
    assert {e["label_key"] for e in result["legend"]} == set(expected)
    assert all({"id", "text", "color", "label_key", "value"} == set(e) for e in result["legend"])

    multi = await api.wait_completed(await api.create_job("pcd-2", ("a", "b")))
    assert "masks" in json.loads(await api.download(multi["result"]))["annotation_data"]


async def test_large_create_bodies_are_accepted(api: PlaymentClient) -> None:
    body = point_cloud_body("big-body", tuple(f"frame-{i:05d}" for i in range(3000)))
    for frame in body["data"]["sensor_data"]["frames"]:
        frame["padding"] = "x" * 400  # poses and sensor URLs make real bodies this large
    assert len(json.dumps(body)) > 1024 * 1024
    status, doc = await api.create(body)
    assert status == 200, doc


async def test_a_frame_with_two_lidars_gets_a_mask_per_sensor(api: PlaymentClient) -> None:
    body = point_cloud_body("two-lidars", ("f0", "f1"))
    sensor_data = body["data"]["sensor_data"]
    sensor_data["sensor_meta"] = [
        {"id": "top", "modality": "lidar"},
        {"id": "cam", "modality": "camera"},
        {"id": "rear", "modality": "lidar"},
    ]
    # f0 carries both lidars (and a camera); f1 only the top one
    sensor_data["frames"][0]["sensors"] = [
        {"sensor_id": s, "data_url": f"https://in.example/{s}.pcd"} for s in ("top", "cam", "rear")
    ]
    sensor_data["frames"][1]["sensors"] = [
        {"sensor_id": "top", "data_url": "https://in.example/top1.pcd"}
    ]
    status, doc = await api.create(body)
    assert status == 200, doc
    done = await api.wait_completed(doc["data"]["job_id"])
    ann = json.loads(await api.download(done["result"]))["annotation_data"]
    pairs = [(m["frame_id"], m["sensor_id"]) for m in ann["masks"]]
    assert pairs == [("f0", "top"), ("f0", "rear"), ("f1", "top")]
    assert {(s["sensor_id"], s["sensor_type"]) for s in ann["sensors"]} == {
        ("top", "LIDAR"),
        ("cam", "CAMERA"),
        ("rear", "LIDAR"),
    }
    served = []
    for mask, sensor in zip(ann["masks"], ("top", "rear", None), strict=True):
        labels = json.loads(await api.download(mask["label_url"]))
        query = f"?sensor_id={sensor}" if sensor else ""
        expected = await api.introspect(
            "GET", f"/truth/playment/two-lidars/{mask['frame_id']}{query}"
        )
        assert labels == expected
        served.append(labels)
    assert served[0] != served[1]  # each sensor has its own point cloud
    # a frame with one mask keeps the truth it always had
    single = api.emu.state.truth_labels("playment", "two-lidars", "f1")
    assert served[2] == single.tolist()
