"""output.dir in object storage, against real servers on loopback (moto's S3, Azurite): the
same checks as for a local output.dir."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from harvester.api import job_document
from harvester.client import Harvester
from harvester.config import Config
from harvester.emulator.server import Emulator
from harvester.errors import ControlError
from harvester.jobs import JobState
from harvester.objstore import output_place
from harvester.store.base import NewJob
from harvester.store.sqlite import SqliteStore
from harvester.verify import verify_outputs
from tests.integration.helpers import API_KEY, harvest_burst, make_config, new_jobs, scenario

from .servers import Backend

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IT_PLAYMENT_KEY", API_KEY)


def config_for(tmp_path: Path, emu: Emulator, backend: Backend) -> Config:
    output: dict[str, Any] = {
        "dir": backend.url,
        "staging_dir": str(tmp_path / "staging"),
        **backend.output,
    }
    return make_config(tmp_path, emu, output=output)


async def harvest(config: Config, jobs: list[NewJob]) -> dict[JobState, int]:
    counts, _ = await harvest_burst(config, jobs)
    return counts


async def check(config: Config) -> list[str]:
    assert config.store.path is not None
    async with SqliteStore(config.store.path) as store:
        jobs = await store.jobs()
    report = await anyio.to_thread.run_sync(verify_outputs, output_place(config.output), jobs)
    return report.problems


def check_objects(backend: Backend, emu: Emulator, jobs: list[NewJob], frames: int) -> None:
    """Read back by the server's own client: every array equals the ground truth, every
    manifest entry is true, MANIFEST.json is there and lists every object."""
    objects = backend.objects()
    for job in jobs:
        folder = f"playment/{job.key}"
        mine = {k[len(folder) + 1 :]: v for k, v in objects.items() if k.startswith(folder + "/")}
        manifest = json.loads(mine.pop("MANIFEST.json"))
        assert manifest["reference_id"] == job.reference_id
        assert set(manifest["files"]) == set(mine)
        for rel, entry in manifest["files"].items():
            assert len(mine[rel]) == entry["bytes"], rel
            assert hashlib.sha256(mine[rel]).hexdigest() == entry["sha256"], rel
        for i in range(frames):
            frame = f"f-{i:03d}"
            assert job.reference_id is not None
            truth = emu.state.truth_labels("playment", job.reference_id, frame)
            arr = np.load(io.BytesIO(mine[f"labels/{frame}.npy"]), allow_pickle=False)
            assert np.array_equal(arr, truth), (job.key, frame)
            assert arr.dtype == np.dtype(manifest["files"][f"labels/{frame}.npy"]["dtype"])


async def test_harvest_to_object_store_equals_ground_truth_rerun_sends_nothing_check_catches(
    tmp_path: Path, backend: Backend
) -> None:
    async with Emulator(scenario()) as emu:
        config = config_for(tmp_path, emu, backend)
        jobs = new_jobs(4, frames=3)
        assert await harvest(config, jobs) == {JobState.HARVESTED: 4}
        check_objects(backend, emu, jobs, frames=3)
        # Published folders leave nothing staged behind.
        assert not any(p.is_file() for p in (tmp_path / "staging").rglob("*"))
        seen = len(emu.state.requests())

        assert await harvest(config, jobs) == {JobState.HARVESTED: 4}
        assert len(emu.state.requests()) == seen  # the rerun sends nothing
        assert await check(config) == []
        assert config.store.path is not None
        async with SqliteStore(config.store.path) as store:
            job = await store.get("playment", jobs[0].key)
        assert job is not None
        # GET /jobs/{provider}/{key} and the Python API give the output as its URL
        url = f"{backend.url}/playment/{jobs[0].key}"
        assert job_document(job, config)["output"] == url
        async with Harvester(config) as h:
            assert await h.output("playment", jobs[0].key) == url
            with pytest.raises(ControlError, match="not a local folder"):
                await h.files("playment", jobs[0].key)

        # --check reads the objects back: one changed byte, same size, is caught...
        rel = f"playment/{jobs[0].key}/labels/f-001.npy"
        data = bytearray(backend.objects()[rel])
        data[-1] ^= 1
        backend.put(rel, bytes(data))
        # ... and so is an object nobody listed.
        backend.put(f"playment/{jobs[1].key}/labels/extra.npy", b"x")
        problems = await check(config)
        assert len(problems) == 2, problems
        assert "labels/f-001.npy: sha256" in problems[0]
        assert problems[1].endswith("does not list: labels/extra.npy")


async def test_check_reads_objects_back_from_every_backend_and_catches_a_changed_one(
    tmp_path: Path, any_backend: Backend
) -> None:
    """``status --check`` against objects that another client put in the bucket: the folders
    of a harvest to local disk, copied as they are. The only test of gs:// reads, since
    harvester cannot publish to the GCS emulator (see ``gcs_server``)."""
    backend = any_backend
    async with Emulator(scenario()) as emu:
        local = make_config(tmp_path, emu, output={"dir": str(tmp_path / "local")})
        jobs = new_jobs(3, frames=2)
        assert await harvest(local, jobs) == {JobState.HARVESTED: 3}
    files = [p for p in (tmp_path / "local").rglob("*") if p.is_file()]
    assert len(files) > 3 * 3  # each job: its manifest, its arrays and more
    for path in files:
        backend.put(path.relative_to(tmp_path / "local").as_posix(), path.read_bytes())

    config = config_for(tmp_path, emu, backend)  # the same store, output.dir the bucket
    assert await check(config) == []

    rel = f"playment/{jobs[2].key}/labels/f-000.npy"
    data = bytearray(backend.objects()[rel])
    data[len(data) // 2] ^= 0x40
    backend.put(rel, bytes(data))
    backend.put(f"playment/{jobs[0].key}/stray.bin", b"x")
    problems = await check(config)
    assert len(problems) == 2, problems
    assert any("labels/f-000.npy: sha256" in p for p in problems), problems
    assert any(p.endswith("does not list: stray.bin") for p in problems), problems
