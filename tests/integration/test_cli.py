"""The CLI as a user runs it: subprocesses, exit codes, messages, against `harvester emulator`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import (
    API_KEY,
    config_toml,
    emulator_process,
    new_jobs,
    playment_lane,
)

REPO = Path(__file__).resolve().parents[2]


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harvester.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
        check=False,
    )


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    scenario = "seed = 3\n[playment]\njob_duration_s = 0.3\npoints_per_frame = [1000, 2000]\n"
    with emulator_process(tmp_path_factory.mktemp("emu"), scenario) as urls:
        assert set(urls) >= {"playment", "cognite", "bentley", "modzy", "token", "storage"}
        yield urls


def write_config(folder: Path, urls: dict[str, str], project: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "h.toml"
    playment = playment_lane(urls["playment"], api_key_env="CLI_TEST_KEY", project_id=project)
    config.write_text(config_toml(log={"level": "warning"}, providers={"playment": playment}))
    return config


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["CLI_TEST_KEY"] = API_KEY
    e["PYTHONPATH"] = str(REPO)
    return e


def jobs_lines(n: int, prefix: str) -> str:
    return "".join(
        json.dumps({"provider": "playment", "reference_id": j.reference_id, "payload": j.payload})
        + "\n"
        for j in new_jobs(n, frames=2, prefix=prefix)
    )


def test_harvest_then_status(tmp_path: Path, emulator: dict[str, str]) -> None:
    config = write_config(tmp_path, emulator, "cli-ok")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(jobs_lines(5, "ok"))
    done = run("harvest", "-c", str(config), str(jobs), "--json", env=env())
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["providers"] == {"playment": {"harvested": 5}}
    assert summary["failed"] == [] and summary["interrupted"] is False
    assert API_KEY not in done.stdout + done.stderr
    assert len(list((tmp_path / "out" / "playment").glob("*/MANIFEST.json"))) == 5

    status = run("status", "-c", str(config), "--json", "--check", env=env())
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["providers"]["playment"] == {"harvested": 5} and doc["check"] == []

    table = run("status", "-c", str(config), env=env())
    assert "harvested" in table.stdout and "playment" in table.stdout


def test_bad_jobs_file_changes_nothing(tmp_path: Path, emulator: dict[str, str]) -> None:
    config = write_config(tmp_path, emulator, "cli-bad")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(jobs_lines(3, "bad") + '{"provider": "playment", "reference_id": "x"\n')
    done = run("harvest", "-c", str(config), str(jobs), env=env())
    assert done.returncode == 2
    assert f"{jobs}:4: not valid JSON" in done.stderr
    assert "nothing from" in done.stderr
    assert not (tmp_path / "out").exists()
    status = run("status", "-c", str(config), "--json", env=env())
    assert json.loads(status.stdout)["total"] == 0

    submitted = run("submit", "-c", str(config), str(jobs), env=env())
    assert submitted.returncode == 2


def test_bad_config_is_exit_2_and_names_the_key(tmp_path: Path, emulator: dict[str, str]) -> None:
    config = write_config(tmp_path, emulator, "cli-cfg")
    config.write_text(config.read_text() + "rate_per_sec = 3\n")
    done = run("status", "-c", str(config), env=env())
    assert done.returncode == 2
    assert "unknown key providers.playment.rate_per_sec" in done.stderr
    missing = write_config(tmp_path / "m", emulator, "cli-cfg")
    e = env()
    del e["CLI_TEST_KEY"]
    done = run("harvest", "-c", str(missing), env=e)
    assert done.returncode == 2 and "CLI_TEST_KEY is not set" in done.stderr


def test_timeout_exits_3_and_a_rerun_finishes(tmp_path: Path, emulator: dict[str, str]) -> None:
    config = write_config(tmp_path, emulator, "cli-timeout")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(jobs_lines(4, "slow"))
    submitted = run("submit", "-c", str(config), str(jobs), env=env())
    assert submitted.returncode == 0 and "added 4 jobs" in submitted.stdout
    cut = run("harvest", "-c", str(config), "--timeout", "0.01", "--json", env=env())
    assert cut.returncode == 3, cut.stderr
    assert json.loads(cut.stdout)["interrupted"] is True
    done = run("harvest", "-c", str(config), "--json", env=env())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["providers"] == {"playment": {"harvested": 4}}


def test_failed_jobs_exit_1(tmp_path: Path, emulator: dict[str, str]) -> None:
    config = write_config(tmp_path, emulator, "cli-fail")
    jobs = tmp_path / "jobs.jsonl"
    ok = jobs_lines(1, "fine")
    # The emulator refuses a batch the project does not have (GE_0001): the job ends in
    # error, not a crash.
    dup = {
        "data": {"sensor_data": {"frames": [{"frame_id": "a"}]}},
        "work_flow_id": "wf",
        "batch_id": "no-such-batch",
    }
    jobs.write_text(
        ok + json.dumps({"provider": "playment", "reference_id": "dup", "payload": dup}) + "\n"
    )
    done = run("harvest", "-c", str(config), str(jobs), "--json", env=env())
    assert done.returncode == 1, done.stderr
    summary = json.loads(done.stdout)
    assert summary["providers"]["playment"] == {"harvested": 1, "error": 1}
    (failed,) = summary["failed"]
    assert failed["key"] == "dup" and "GE_0001" in failed["reason"]
