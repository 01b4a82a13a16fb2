"""A status the provider does not document: harvester keeps polling (it cannot know the job
ended), and tells the user once per job in the log, in a metric and in ``harvester status``.

Playment documents one status, ``completed``; the emulator is set to answer two others first.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from harvester import cli
from harvester.emulator.server import Emulator
from harvester.engine import Engine
from harvester.jobs import JobState

from .helpers import (
    API_KEY,
    make_config,
    new_jobs,
    scenario,
    stored,
)

pytestmark = pytest.mark.anyio

EVENT = "status not documented by the provider; still polling as running"


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IT_PLAYMENT_KEY", API_KEY)


def polls(emu: Emulator) -> dict[str, int]:
    """GETs of each Playment job id so far."""
    out: dict[str, int] = {}
    for r in emu.state.requests():
        if r["provider"] == "playment" and r["method"] == "GET" and "/jobs/" in r["path"]:
            job_id = r["path"].rsplit("/", 1)[1]
            out[job_id] = out.get(job_id, 0) + 1
    return out


def unknown_samples(engine: Engine) -> dict[tuple[str, str], float]:
    return {
        (s.labels["provider"], s.labels["status"]): s.value
        for metric in engine.metrics.registry.collect()
        for s in metric.samples
        if s.name == "harvester_unknown_status_jobs_total"
    }


async def test_logged_and_counted_once_per_job_across_many_polls(tmp_path: Path) -> None:
    statuses = ["queued", "in_review", "completed"]
    async with Emulator(scenario(statuses=statuses, job_duration_s=1.0)) as emu:
        config = make_config(tmp_path, emu, poll_min_s=0.02, poll_max_s=0.05)
        jobs = new_jobs(3, frames=1)
        async with stored(config, jobs) as store:
            engine = Engine(config, store, burst=True)
            with capture_logs() as logs, anyio.fail_after(60):
                await engine.run()
            assert await store.counts() == {("playment", JobState.HARVESTED): 3}
        per_job = polls(emu)
        assert len(per_job) == 3 and min(per_job.values()) >= 6, per_job
        told = [e for e in logs if e["event"] == EVENT]
        # once per job, though each was polled many times in two undocumented statuses
        assert sorted(e["job"] for e in told) == sorted(j.key for j in jobs)
        assert {(e["provider"], e["remote_status"]) for e in told} == {("playment", "queued")}
        # a warning for the first job in that status, the others at info: no warning flood
        assert sorted(e["log_level"] for e in told) == ["info", "info", "warning"]
        assert all(e["remote_id"] in per_job for e in told)
        assert unknown_samples(engine) == {("playment", "queued"): 3.0}


async def test_status_names_the_jobs_in_unknown_statuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with Emulator(scenario(statuses=["queued", "completed"], job_duration_s=600)) as emu:
        config = make_config(tmp_path, emu, poll_min_s=0.02, poll_max_s=0.05)
        async with stored(config, new_jobs(2, frames=1)) as store:
            engine = Engine(config, store, burst=True)
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: engine.run(stop=stop))
                with anyio.fail_after(30):
                    while len(polls(emu)) < 2 or min(polls(emu).values()) < 3:  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                stop.set()
    config_file = tmp_path / "config.toml"
    config_file.write_text(
        f'[store]\nurl = "sqlite://{config.store.path}"\n[output]\ndir = "out"\n'
        f'[providers.playment]\nbase_url = "{emu.urls["playment"]}"\n'
        'api_key_env = "IT_PLAYMENT_KEY"\nproject_id = "it-project"\n'
    )
    status = ["status", "-c", str(config_file)]
    capsys.readouterr()  # the engine's log lines
    assert await anyio.to_thread.run_sync(cli.main, [*status, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["unknown_statuses"] == [{"provider": "playment", "status": "queued", "jobs": 2}]
    assert await anyio.to_thread.run_sync(cli.main, status) == 0
    text = capsys.readouterr().out
    assert (
        '2 jobs in a status harvester does not know (polled as running): playment "queued" x2'
        in text
    )
