"""Playment as Playment documents it: the seeds' own examples, read by this code, checked
against what the emulator serves and what harvester sends.

The emulator alone only proves harvester agrees with itself; here both sides are held to the
provider's pages (``../shared/seeds``: "Get job results" and the video "Create a job").
"""

from __future__ import annotations

import copy
import json
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import numpy as np
import pytest
from multidict import CIMultiDict

from harvester.config import PlaymentConfig, SecretRef
from harvester.decode import MaskDecoder
from harvester.emulator import Emulator
from harvester.emulator.scenario import parse_scenario
from harvester.jobs import Job, JobState
from harvester.providers.base import RemoteState, Status
from harvester.providers.playment import PlaymentProvider
from harvester.wire import Response
from tests.integration.test_cli import env, write_config

from .playment_seed import PLACEHOLDER, example, examples, section, seed, shape_problems

pytestmark = pytest.mark.anyio

API_KEY = "contract-key"
PROJECT = "proj-docs"
WAIT_S = 10.0

RESULTS = seed("Get job results")
CREATE_VIDEO = seed("Create a job")
JOB_ANSWER = example(section(RESULTS, "JOB RESULT"))
POINT_CLOUD_RESULT = example(section(RESULTS, "Point Cloud Segmentation"))
MASK_SAMPLE = section(RESULTS, "Sample Mask File")
CREATE_ANSWER, VIDEO_BODY = examples(CREATE_VIDEO)


def documented_body_keys(text: str) -> set[str]:
    """The names in the "Request Body" table of a create page (``batch\\_id`` -> batch_id)."""
    table = text.split("#### Request Body", 1)[1].split("\n\n", 2)[1]
    return {m.replace("\\_", "_") for m in re.findall(r"^\| ([a-z\\_]+)(?:<mark|\s)", table, re.M)}


def filled(body: Any, **values: str) -> Any:
    """The docs' body with its placeholders (``<UUID>``) filled as a user would."""
    out = copy.deepcopy(body)
    for key, value in values.items():
        assert out.get(key) == PLACEHOLDER, key
        out[key] = value
    return out


def point_cloud_payload() -> dict[str, Any]:
    """A point-cloud create body: the ``sensor_data`` the documented result echoes back."""
    sensor_data = copy.deepcopy(POINT_CLOUD_RESULT["sensor_data"])
    return {"data": {"sensor_data": sensor_data}, "work_flow_id": "wf-docs"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    scenario = parse_scenario(
        {"seed": 11, "playment": {"job_duration_s": 0.3, "points_per_frame": [300, 900]}}
    )
    async with Emulator(scenario) as e:
        yield e


class Api:
    """Plain HTTP, no harvester code: what any client of Playment's API would send."""

    def __init__(self, emu: Emulator, session: aiohttp.ClientSession) -> None:
        self.base = emu.urls["playment"]
        self.session = session

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {"x-api-key": API_KEY}
        async with self.session.request(method, self.base + path, headers=headers, **kw) as r:
            return r.status, await r.json(content_type=None)

    async def completed(self, job_id: str) -> dict[str, Any]:
        with anyio.fail_after(WAIT_S):
            while True:
                status, doc = await self.call("GET", f"/v1/projects/{PROJECT}/jobs/{job_id}")
                assert status == 200, doc
                if doc["data"]["status"] == "completed":
                    return dict(doc)
                await anyio.sleep(0.05)

    async def attachment(self, url: str) -> bytes:
        async with self.session.get(
            f"{self.base}/v1/attachments",
            params={"url": url},
            headers={"x-api-key": API_KEY},
            allow_redirects=False,
        ) as r:
            location = r.headers["Location"]
        async with self.session.get(location) as r:
            assert r.status == 200
            return await r.read()


@pytest.fixture
async def api(emu: Emulator) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(emu, session)


def test_the_seed_examples_are_found() -> None:
    # The extraction itself: if a seed changes shape, these tests must notice, not pass.
    assert JOB_ANSWER["success"] is True and "status" in JOB_ANSWER["data"]
    assert "masks" in POINT_CLOUD_RESULT["annotation_data"]
    assert "video_data" in VIDEO_BODY["data"] and "job_id" in CREATE_ANSWER["data"]
    assert documented_body_keys(CREATE_VIDEO) == {
        "batch_id",
        "data",
        "work_flow_id",
        "reference_id",
    }


async def test_create_and_job_answers_have_the_documented_shape(api: Api) -> None:
    body = filled(VIDEO_BODY, work_flow_id="wf-docs", batch_id="")
    status, created = await api.call("POST", f"/v1/projects/{PROJECT}/jobs", json=body)
    assert status == 200, created
    assert shape_problems(CREATE_ANSWER, created) == []
    job_id = created["data"]["job_id"]
    status, running = await api.call("GET", f"/v1/projects/{PROJECT}/jobs/{job_id}")
    assert status == 200
    assert shape_problems(JOB_ANSWER, running) == []
    done = await api.completed(job_id)
    assert shape_problems(JOB_ANSWER, done) == []
    assert done["data"]["reference_id"] == VIDEO_BODY["reference_id"]


async def test_point_cloud_result_has_the_documented_shape(api: Api) -> None:
    body = {"reference_id": "pc-docs", **point_cloud_payload()}
    status, created = await api.call("POST", f"/v1/projects/{PROJECT}/jobs", json=body)
    assert status == 200, created
    done = await api.completed(created["data"]["job_id"])
    result = json.loads(await api.attachment(done["data"]["result"]))
    assert shape_problems(POINT_CLOUD_RESULT, result) == []
    # As in the docs' example: the frame's mask names the lidar of sensor_meta.
    lidar = [
        m["id"] for m in body["data"]["sensor_data"]["sensor_meta"] if m["modality"] == "lidar"
    ]
    assert [m["sensor_id"] for m in result["annotation_data"]["masks"]] == lidar
    mask = await api.attachment(result["annotation_data"]["masks"][0]["label_url"])
    served = json.loads(mask)
    assert served and all(isinstance(v, int) and v >= 0 for v in served)


def test_mask_decoder_reads_the_documented_sample_file() -> None:
    text = MASK_SAMPLE.split("```c\n", 1)[1].split("```", 1)[0].encode()
    decoder = MaskDecoder()
    got = np.concatenate([decoder.feed(text[i : i + 7]) for i in range(0, len(text), 7)])
    got = np.concatenate([got, decoder.finish()])
    assert got.tolist() == json.loads(text)


CFG = PlaymentConfig(
    name="playment",
    base_url="https://api.example",
    api_key=SecretRef("k", env="X"),
    project_id="p1",
    batch_id="b-ours",
)
JOB = Job("playment", "001", "001", "j-1", JobState.RUNNING, 0.0, 0.0)


def _response(body: Any) -> Response:
    return Response(200, CIMultiDict(), json.dumps(body).encode(), "https://api.example/x")


def test_create_body_harvester_sends_is_the_documented_one() -> None:
    provider = PlaymentProvider(CFG)
    payload = filled(VIDEO_BODY, work_flow_id="wf-docs", batch_id="")
    provider.validate_payload(payload)
    spec = provider.build_create(JOB, payload)
    assert spec.method == "POST" and spec.url == "https://api.example/v1/projects/p1/jobs"
    assert set(spec.json) == documented_body_keys(CREATE_VIDEO)
    assert spec.json["data"] == VIDEO_BODY["data"]
    assert spec.json["reference_id"] == "001" and spec.json["work_flow_id"] == "wf-docs"
    assert spec.json["batch_id"] == "b-ours"  # empty in the body: harvester's own batch


def test_only_documented_statuses_are_known() -> None:
    """The documented statuses are the ones Playment's own pages show ("Get job results")."""
    documented = {JOB_ANSWER["data"]["status"]}
    assert documented == {"completed"}

    p = PlaymentProvider(CFG)

    def poll(status: str, result: str = "") -> Status:
        body = {"data": {"status": status, "result": result, "job_id": "j-1"}, "success": True}
        out = p.parse_poll(_response(body), JOB)
        assert isinstance(out, Status)
        return out

    for raw in documented:
        assert poll(raw).known and poll(raw, "https://s/r.json").known
    for raw in ("created", "in_progress", "Completed", "queued", ""):
        odd = poll(raw)
        assert (odd.state, odd.raw, odd.known) == (RemoteState.RUNNING, raw, False)


def _config(folder: Path, emu: Emulator) -> Path:
    return write_config(folder, emu.urls, PROJECT)


async def _cli(*args: str) -> tuple[int, str, str]:
    with anyio.fail_after(90):
        done = await anyio.run_process(
            [sys.executable, "-m", "harvester.cli", *args], env=env(), check=False
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_documented_payloads_are_submitted_tracked_and_harvested(
    tmp_path: Path, emu: Emulator
) -> None:
    config = _config(tmp_path, emu)
    video = filled(VIDEO_BODY, work_flow_id="wf-docs", batch_id="")
    lines = [
        # the docs' video body, whole: its reference_id names the job
        {"provider": "playment", "payload": video},
        {"provider": "playment", "reference_id": "pc-docs", "payload": point_cloud_payload()},
        {
            "provider": "playment",
            "reference_id": "img-docs",
            "payload": {"data": {"image_url": "https://c.example/a.jpg"}, "tag": "wf-docs"},
        },
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, _out, err = await _cli("submit", "-c", str(config), str(jobs))
    assert code == 0, err
    code, out, err = await _cli("harvest", "-c", str(config), "--no-progress", "--json", str(jobs))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["providers"]["playment"] == {"harvested": 3}, summary
    root = tmp_path / "out" / "playment"
    video_files = json.loads((root / "001" / "MANIFEST.json").read_text())["files"]
    frames = {f["frame_id"] for f in VIDEO_BODY["data"]["video_data"]["frames"]}
    assert {rel.split("/")[1] for rel in video_files if rel.startswith("outputs/")} == frames
    pc_files = json.loads((root / "pc-docs" / "MANIFEST.json").read_text())["files"]
    frame = POINT_CLOUD_RESULT["sensor_data"]["frames"][0]["frame_id"]
    labels = np.load(root / "pc-docs" / "labels" / f"{frame}.npy")
    assert np.array_equal(labels, emu.state.truth_labels("playment", "pc-docs", frame))
    assert pc_files[f"labels/{frame}.npy"]["sensor_id"] == "18158562"
    assert emu.state.stats()["playment"]["creates"] == 3


async def test_a_documented_body_with_a_mistake_is_one_clear_error(
    tmp_path: Path, emu: Emulator
) -> None:
    config = _config(tmp_path, emu)
    video = filled(VIDEO_BODY, work_flow_id="wf-docs", batch_id="")
    del video["data"]["video_data"]["frames"][1]["src"]
    good = {"provider": "playment", "reference_id": "fine", "payload": point_cloud_payload()}
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        json.dumps(good) + "\n" + json.dumps({"provider": "playment", "payload": video})
    )
    code, _out, err = await _cli("submit", "-c", str(config), str(jobs))
    assert code == 2
    assert err.splitlines()[0] == (
        f"harvester: {jobs}:2: payload.data.video_data.frames[1].src must be a URL string"
    )
    code, out, err = await _cli("status", "-c", str(config), "--json")
    assert json.loads(out)["total"] == 0, err
    assert emu.state.stats()["playment"]["creates"] == 0


def test_a_jobs_class_is_its_workflow_as_the_documented_answer_gives_it() -> None:
    # the poll scheduler learns durations per workflow (issue 18)
    p = PlaymentProvider(CFG)
    status = p.parse_poll(_response(JOB_ANSWER), JOB)
    assert isinstance(status, Status)
    assert p.job_class(status) == JOB_ANSWER["data"]["work_flow_id"]
    assert p.job_class(Status(RemoteState.RUNNING, "x", document={})) is None
