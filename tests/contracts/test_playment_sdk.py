"""Playment's official Python SDK (``playment`` on PyPI), unmodified, against our emulator.

The SDK has no base-URL setting: its URL table (``playment.client_handler.urls``) is built
from constants at import. The script below rebinds that table to the emulator's address with
the SDK's own paths (``/projectsvc/...``, ``/v0/...``, ``/v1/project/...``); every request,
body and answer parsing is the SDK's code.

The SDK is installed apart from the venv (``make install`` puts it in ``.venv/sdk/playment``)
because its wheel also installs top-level ``tests`` and ``examples`` packages, which would
shadow this repository's own ``tests`` package.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from harvester.emulator import Emulator
from harvester.emulator.scenario import parse_scenario

pytestmark = pytest.mark.anyio

SDK = Path(sys.prefix) / "sdk" / "playment"
PROJECT = "proj-sdk"

SCRIPT = r"""
import json, sys, time
import playment
import playment.client_handler as handler

base, project = sys.argv[1], sys.argv[2]
handler.urls = handler.urls._replace(
    job_creation=base + "/projectsvc/projects/{}/jobs",
    batch_creation=base + "/v1/project/{}/batch",
    batch_summary=base + "/v0/projects/{}/batch/{}",
    job_result=base + "/v0/projects/{}/jobs/{}",
)
client = playment.Client("sdk-key")
out = {"sdk": playment.__file__}

# The SDK's own sensor-fusion example: a lidar and a camera per frame.
data = playment.SensorData()
data.add_sensor(playment.Sensor(_id="lidar", name="lidar", primary_view=True, modality="lidar"))
cam = playment.Sensor(_id="camera_1", name="camera_1", primary_view=False, modality="camera")
cam.add_intrinsics(playment.Intrinsics(1024.5, 592.0, 1050.2, 1051.0, 0, 0, 0, 0, 0, 0, 0, 1))
data.add_sensor(cam)
for i in range(2):
    lidar = playment.SensorFrameObject(data_url=f"https://example.com/pcd_{i}", sensor_id="lidar")
    pose = playment.SensorPose(playment.Heading(1, 0, 0, 0), playment.Position(0, 0, 0))
    lidar.add_sensor_pose(pose)
    image = playment.SensorFrameObject(f"https://example.com/img_{i}", sensor_id="camera_1")
    data.add_frame(playment.Frame(frame_id=str(i), sensors=[lidar, image]))

batch = client.create_batch(name="sdk-batch", label="b", description="d", project_id=project)
out["batch_id"] = batch.id
job = client.create_job(reference_id="sdk-54", tag="sensor_fusion", data=data,
                        project_id=project, batch_id=batch.id)
out["job_id"] = job.id
image_job = client.create_job(reference_id="sdk-55", tag="image", project_id=project,
                              data=playment.ImageData(image_url="https://example.com/a/b.jpg"))
out["image_job_id"] = image_job.id
try:
    client.create_job(reference_id="sdk-54", tag="sensor_fusion", data=data, project_id=project)
    out["duplicate"] = None
except playment.PlaymentException as exc:
    out["duplicate"] = exc.code

seen = []
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    result = client.get_job_result(project_id=project, job_id=job.id)
    if not seen or seen[-1] != result.status:
        seen.append(result.status)
    if result.status == "completed":
        break
    time.sleep(0.05)
out["statuses"] = seen
out["result"] = result._asdict()
summary = client.get_batch_summary(batch_id=batch.id, project_id=project)
out["batch_jobs"] = [j._asdict() for j in summary.jobs]
print(json.dumps(out))
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    scenario = parse_scenario({"seed": 5, "playment": {"job_duration_s": 0.3}})
    async with Emulator(scenario) as e:
        yield e


async def test_official_sdk_creates_and_reads_jobs_unmodified(emu: Emulator) -> None:
    if not (SDK / "playment" / "client_handler.py").is_file():
        raise AssertionError(
            f"Playment's SDK is not installed in {SDK}: run `make install` (or"
            f" pip install --target {SDK} 'playment>=1.0.5' 'requests>=2.31')"
        )
    # Only the SDK's folder on the path: nothing of harvester's can help it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(SDK)}
    with anyio.fail_after(60):
        done = await anyio.run_process(
            [
                sys.executable,
                "-I",
                "-c",
                f"import sys; sys.path.insert(0, {str(SDK)!r})\n" + SCRIPT,
                emu.urls["playment"],
                PROJECT,
            ],
            env=env,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    out = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert out["sdk"].startswith(str(SDK))
    assert out["duplicate"] == "FS_0001"
    assert out["statuses"][-1] == "completed"
    result = out["result"]
    assert result["job_id"] == out["job_id"] and result["reference_id"] == "sdk-54"
    assert result["batch_id"] == out["batch_id"] and result["tag"] == "sensor_fusion"
    assert result["result"].startswith(emu.urls["storage"])
    assert [j["reference_id"] for j in out["batch_jobs"]] == ["sdk-54"]
    stats = emu.state.stats()["playment"]
    assert stats["creates"] == 2 and stats["duplicate_creates"] == 1
    # It spoke its own (older) paths, not the documented ones harvester uses.
    paths = {r["path"] for r in emu.state.requests() if r["provider"] == "playment"}
    assert any("/projectsvc/projects/" in p for p in paths), paths
    assert any("/v0/projects/" in p for p in paths), paths
