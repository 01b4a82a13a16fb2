"""Bentley v2 end to end against the emulator: Bentley's documented payloads for every job
type through ``harvester submit`` and ``harvest``; a lost create answer found by name in the
job listing; a listing that refuses the lookup; a payload stored before v2."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from harvester.cli import main as cli_main
from harvester.config import load_config
from harvester.emulator.scenario import parse_fault
from harvester.emulator.server import Emulator
from harvester.engine import Engine
from harvester.jobs import JobState
from harvester.jobsfile import parse_jobs_text
from harvester.store.base import NewJob
from harvester.store.sqlite import SqliteStore
from tests.contracts.bentley_payloads import documented_payloads
from tests.integration.test_all_providers import SECRETS, config, run, scenario

pytestmark = pytest.mark.anyio
CREATE = "/bentley/reality-analysis/jobs"
DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo-jobs.jsonl"


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


def _cli(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(list(args))
    return code, err.getvalue()


def _creates(emu: Emulator) -> list[dict[str, Any]]:
    return [
        r
        for r in emu.state.requests()
        if r["provider"] == "bentley" and r["method"] == "POST" and r["path"] == CREATE
    ]


async def test_documented_payloads_of_every_type_are_submitted_and_harvested(
    tmp_path: Path,
) -> None:
    payloads = documented_payloads()
    async with Emulator(scenario(bentley={"parts_per_output": 1, "blob_bytes": 100})) as emu:
        u = emu.urls
        (tmp_path / "config.toml").write_text(
            f"""
[store]
url = "sqlite://state.db"
[output]
dir = "out"
[providers.bentley]
base_url = "{u["bentley"]}"
token_url = "{u["token"]}"
client_id = "ben"
client_secret_env = "IT_BS"
poll_min_s = 0.1
poll_max_s = 0.3
"""
        )
        lines = [
            json.dumps({"provider": "bentley", "reference_id": f"doc {label}", "payload": p})
            for label, p in payloads.items()
        ]
        (tmp_path / "jobs.jsonl").write_text("\n".join(lines) + "\n")
        cfg = str(tmp_path / "config.toml")
        code, err = await anyio.to_thread.run_sync(
            _cli, "submit", "-c", cfg, str(tmp_path / "jobs.jsonl")
        )
        assert code == 0, err
        # `harvest` wants the main thread for its signal handlers: the same engine, in-process.
        config_ = load_config(Path(cfg))
        async with SqliteStore(tmp_path / "state.db") as store:
            with anyio.fail_after(90):
                await Engine(config_, store, providers=["bentley"]).run()
        assert len(_creates(emu)) == len(payloads)
    async with SqliteStore(tmp_path / "state.db") as store:
        jobs = await store.jobs()
    assert sorted(j.reference_id or "" for j in jobs) == sorted(f"doc {k}" for k in payloads)
    for j in jobs:
        assert j.state == JobState.HARVESTED, (j.key, j.reason)
        folder = tmp_path / "out" / "bentley" / j.key
        doc = json.loads((folder / "job.json").read_text())["job"]
        assert doc["name"] == j.reference_id  # valid v2 names are used unchanged
        outputs = doc["specifications"]["outputs"]
        for name, value in outputs.items():
            downloaded = (folder / "outputs" / name).is_dir()
            # Reports and metrics are bucket paths, named in job.json, not reality data.
            assert downloaded == (not value.startswith("bkt:")), (j.key, name)


def _lose_first_create(emu: Emulator) -> None:
    emu.state.add_fault(
        parse_fault(
            {
                "kind": "reset",
                "provider": "bentley",
                "when": "after",
                "count": 1,
                "match": "/reality-analysis/jobs",
            }
        )
    )


PAYLOAD = documented_payloads()["seed-Segmentation3D"]


async def test_a_lost_create_answer_is_found_by_name_not_sent_again(tmp_path: Path) -> None:
    async with Emulator(scenario()) as emu:
        _lose_first_create(emu)
        jobs = [NewJob("bentley", f"lost-{i}", f"lost {i}/x", None, PAYLOAD, "t") for i in range(3)]
        done = await run(config(tmp_path, emu), jobs)
        assert [j.state for j in done] == [JobState.HARVESTED] * 3, [j.reason for j in done]
        assert len(_creates(emu)) == 3  # the lost one was found, not resent
        finds = [r for r in emu.state.requests() if r["method"] == "GET" and r["path"] == CREATE]
        assert finds and all(r["status"] == 200 for r in finds)


@pytest.mark.parametrize(
    ("policy", "state", "creates"),
    [("fail", JobState.ERROR, 1), ("resubmit", JobState.HARVESTED, 2)],
)
async def test_a_refused_lookup_follows_on_lost_create(
    tmp_path: Path, policy: str, state: JobState, creates: int
) -> None:
    async with Emulator(scenario(bentley={"job_listing": False})) as emu:
        _lose_first_create(emu)
        cfg = config(tmp_path, emu, bentley={"on_lost_create": policy})
        (done,) = await run(cfg, [NewJob("bentley", "k", "k", None, PAYLOAD, "t")])
        assert done.state == state and len(_creates(emu)) == creates
        if policy == "fail":
            assert done.reason is not None
            assert "Bentley refused to list jobs by name (HTTP 404" in done.reason
            assert "on_lost_create" in done.reason


async def test_a_payload_stored_before_v2_is_refused_with_its_reason_not_sent(
    tmp_path: Path,
) -> None:
    old = {
        "type": "Segmentation3D",
        "iTwinId": "itwin-1",
        "specifications": {
            "inputs": [{"name": "pointClouds", "realityDataId": "rd-1"}],
            "outputs": ["segmentation3D"],
            "options": {},
        },
    }
    async with Emulator(scenario()) as emu:
        # Straight into the store, as a store written before v2 holds it.
        (done,) = await run(
            config(tmp_path, emu), [NewJob("bentley", "old", "old", None, old, "t")]
        )
        assert done.state == JobState.ERROR and done.reason is not None
        assert "payload.specifications.inputs must be an object" in done.reason
        assert "v1 API" in done.reason
        assert _creates(emu) == []


async def test_the_demo_jobs_bentley_lines_are_accepted_and_harvested(tmp_path: Path) -> None:
    lines = [ln for ln in DEMO.read_bytes().splitlines() if b'"provider":"bentley"' in ln]
    assert len(lines) == 10
    async with Emulator(scenario(bentley={"parts_per_output": 1})) as emu:
        cfg = config(tmp_path, emu)
        jobs = parse_jobs_text(b"\n".join(lines), source=str(DEMO), config=cfg)
        done = await run(cfg, jobs)
        assert [j.state for j in done] == [JobState.HARVESTED] * 10, [j.reason for j in done]
        assert len(_creates(emu)) == 10
