"""output.dir in object storage through the CLI, as a user runs it: a crash mid-upload, a
rerun, ``status --check``, and bad input refused before anything is sent."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from harvester.emulator.server import Emulator
from tests.integration.helpers import (
    API_KEY,
    REPO,
    config_toml,
    jobs_file,
    new_jobs,
    playment_lane,
    scenario,
)

from .servers import Backend

pytestmark = pytest.mark.anyio


def write_config(tmp_path: Path, emu: Emulator, output: dict[str, Any]) -> Path:
    playment = playment_lane(emu.urls["playment"], backoff_base_s=0.05, backoff_max_s=0.5)
    path = tmp_path / "config.toml"
    path.write_text(
        config_toml(
            output=output,
            log={"level": "warning", "format": "json"},
            providers={"playment": playment},
        )
    )
    return path


async def cli(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """``python -m harvester.cli ARGS``; (exit code, stderr + stdout). Run without blocking
    the event loop: the emulator serving it lives in this process."""
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HARVESTER_")},
        "PYTHONPATH": str(REPO),
        "IT_PLAYMENT_KEY": API_KEY,
        **env,
    }
    with anyio.fail_after(90):
        done = await anyio.run_process(
            [sys.executable, "-m", "harvester.cli", *args], env=full, cwd=cwd, check=False
        )
    return done.returncode, done.stderr.decode() + done.stdout.decode()


def output_of(backend: Backend, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "dir": backend.url,
        "staging_dir": str(tmp_path / "staging"),
        **backend.output,
        **extra,
    }


async def test_a_crash_mid_upload_leaves_no_final_object_and_a_rerun_completes(
    tmp_path: Path, backend: Backend
) -> None:
    # One frame of 16 M points: a 16 MB .npy, sent as a multipart upload of four parts (5 MiB),
    # at most PART_CONCURRENCY (2) in flight. Killed as the 4th part is handed over: obstore
    # took it only once an earlier part was in, so the store holds parts of an upload never
    # committed (on S3 the upload itself is created before any part is read).
    points = 16_000_000
    async with Emulator(scenario(points_per_frame=[points, points])) as emu:
        config = write_config(tmp_path, emu, output_of(backend, tmp_path, part_bytes=5 << 20))
        jobs = new_jobs(1, frames=1)
        jobs_path = jobs_file(tmp_path / "jobs.jsonl", jobs)
        args = ("harvest", "-c", str(config), str(jobs_path), "--no-progress")

        code, log = await cli(
            *args, env={**backend.env, "HARVESTER_FAILPOINTS": "upload.part=kill@4"}, cwd=tmp_path
        )
        assert code == -9 and "failpoint upload.part hit 4: SIGKILL" in log, log
        folder = f"playment/{jobs[0].key}"
        written = {k for k in backend.objects() if k.startswith(folder)}
        # The upload was never committed: no object under the array's final name, no manifest.
        assert f"{folder}/labels/f-000.npy" not in written
        assert f"{folder}/MANIFEST.json" not in written
        # What the kill does leave: the store's record of the unfinished upload.
        array_key = f"{backend.prefix}/{folder}/labels/f-000.npy"
        assert backend.unfinished(folder) == [array_key]

        code, log = await cli(*args, env=backend.env, cwd=tmp_path)
        assert code == 0, log
        objects = backend.objects()
        assert f"{folder}/MANIFEST.json" in objects
        manifest = json.loads(objects[f"{folder}/MANIFEST.json"])
        entry = manifest["files"]["labels/f-000.npy"]
        assert entry["shape"] == [points]
        assert len(objects[f"{folder}/labels/f-000.npy"]) == entry["bytes"] > 5 << 20
        # ... and nothing of the killed attempt is left open: on S3 the rerun aborted its
        # multipart upload, on Azure committing the block list discarded the other blocks.
        assert backend.unfinished(folder) == []

        code, log = await cli("status", "-c", str(config), "--check", env=backend.env, cwd=tmp_path)
        assert code == 0 and "check: no problems found" in log, log


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"dir": "ftp://bucket/x"}, "unknown scheme ftp://"),
        ({"bucket": "no-such-bucket"}, "does not exist"),
        ({"secret": "IT_UNSET_SECRET"}, "IT_UNSET_SECRET"),
    ],
)
async def test_bad_output_is_one_error_before_anything_is_sent(
    tmp_path: Path, any_backend: Backend, change: dict[str, str], expected: str
) -> None:
    backend = any_backend
    async with Emulator(scenario()) as emu:
        output = output_of(backend, tmp_path)
        if "dir" in change:
            output["dir"] = change["dir"]
        if "bucket" in change:
            output["dir"] = f"{backend.name}://{change['bucket']}/x"
        if "secret" in change:
            key = {
                "s3": "secret_access_key_env",
                "az": "account_key_env",
                "gs": "service_account_key_env",
            }[backend.name]
            output[key] = change["secret"]
        config = write_config(tmp_path, emu, output)
        jobs_path = jobs_file(tmp_path / "jobs.jsonl", new_jobs(2, frames=1))
        code, log = await cli(
            "harvest",
            "-c",
            str(config),
            str(jobs_path),
            "--no-progress",
            env=backend.env,
            cwd=tmp_path,
        )
        assert code == 2, log
        assert expected in log, log
        errors = [line for line in log.splitlines() if line.strip()]
        assert len(errors) == 1, log
        assert emu.state.requests() == []
        assert not (tmp_path / "state.db").exists()  # no job was even added
        for secret in backend.env.values():
            assert secret not in log
