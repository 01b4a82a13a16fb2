"""Bentley through the real engine on virtual time (``harvester.testing.bentley``): the
15/30/60/120 s polling ladder, the progress percentage, outputs harvested from their Azure
containers, and a lost create found again by name. The create bodies are Bentley's own
documented payloads, read from the seed by test code."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from harvester.emulator.bentley_model import TERMINAL
from harvester.emulator.scenario import BentleyScenario
from harvester.jobs import Job, JobState, job_key
from harvester.providers.bentley import BUCKET_PREFIX, job_name
from harvester.schedule import BENTLEY_LADDER
from harvester.store.base import NewJob
from harvester.testing.bentley import MemoryBentley
from harvester.testing.network import Fault, MemoryRequest
from tests.contracts.bentley_payloads import documented_payloads

from .conftest import Rig

pytestmark = pytest.mark.anyio

JITTER = 0.1  # PollPolicy's default
# Queued for 200 s, then Active for 800 s with the percentage moving every 80 s.
LONG = BentleyScenario(job_duration_s=1000.0, progress_step=10, parts_per_output=2, blob_bytes=4096)


async def _add(rig: Rig, *refs: str, payload: str = "jobs-create-example") -> list[NewJob]:
    """Jobs whose payload is one Bentley documents (default: its jobs-create example, one
    Objects2D output)."""
    body: dict[str, Any] = documented_payloads()[payload]
    jobs = [
        NewJob("bentley", job_key(ref), ref, None, body, f"test:{i + 1}")
        for i, ref in enumerate(refs)
    ]
    await rig.store.add_jobs(jobs, now=rig.clock.wall())
    return jobs


def _bentley(rig: Rig) -> MemoryBentley:
    assert rig.bentley is not None
    return rig.bentley


def _creates(r: MemoryRequest) -> bool:
    return r.method == "POST" and r.path == "/reality-analysis/jobs"


async def test_polls_climb_bentleys_ladder_and_restart_when_the_percentage_moves(
    rig: Rig,
) -> None:
    rig.setup_bentley(LONG)
    refs = [f"ladder-{i}" for i in range(3)]
    await _add(rig, *refs)
    await rig.run(rig.engine(), within_s=2000)
    bentley = _bentley(rig)
    create_at = {r.json()["name"]: r.at for r in rig.network.sent if _creates(r)}
    rungs_used: set[float] = set()
    resets = 0
    for ref in refs:
        assert (await rig.job(job_key(ref), "bentley")).state == JobState.HARVESTED
        remote = bentley.job_named(job_name(ref))
        assert remote is not None
        seen = [o for o in bentley.observed if o.job_id == remote.id]
        # Polls end at the first that sees Success (the harvest reads the job once more).
        done = next(i for i, o in enumerate(seen) if o.state == "Success")
        seen = seen[: done + 1]
        assert len(seen) >= 10
        # Walk the ladder as Bentley asks: the first poll one rung-0 after the create, each
        # later one a rung higher while nothing moved, back to rung 0 after a poll that saw
        # the state or the percentage change. Never earlier than the rung; at most the
        # jitter later (the clamp to poll_max_s = 120 s keeps the top rung exact).
        rung = 0
        before: tuple[str | None, int | None] = (None, None)
        previous_at = create_at[job_name(ref)]
        for obs in seen:
            wait = BENTLEY_LADDER[rung]
            gap = obs.at - previous_at
            assert wait - 1e-9 <= gap <= min(wait * (1 + JITTER), 120.0) + 1e-9, (
                ref,
                obs,
                f"gap {gap:.3f} s, rung {wait:g} s",
            )
            rungs_used.add(wait)
            now = (obs.state, obs.percentage)
            if now != before:
                resets += rung > 0
                rung = 0
            else:
                rung = min(rung + 1, len(BENTLEY_LADDER) - 1)
            before, previous_at = now, obs.at
    assert rungs_used == set(BENTLEY_LADDER)  # every rung was climbed to
    assert resets >= 3 * 5  # and the percentage restarted it, job after job


async def test_the_progress_percentage_is_read_and_kept(rig: Rig) -> None:
    rig.setup_bentley(LONG)
    (new,) = await _add(rig, "progress-1")
    changes: list[tuple[float, Job]] = []
    engine = rig.engine(on_change=lambda job: changes.append((rig.clock.monotonic(), job)))
    await rig.run(engine, within_s=2000)
    bentley = _bentley(rig)
    active = [o for o in bentley.observed if o.state == "Active"]
    # Each percentage Bentley reported while the job was Active reached the store, in order.
    told = _dedupe([o.percentage for o in active])
    kept = [
        None if job.progress is None else int(job.progress)
        for _, job in changes
        if job.remote_status == "Active" and job.key == new.key
    ]
    assert kept == told
    assert len(set(told)) >= 8  # 0, 10, ..., 90: it did move, step by step
    assert (await rig.job(new.key, "bentley")).progress == 100.0


def _dedupe(values: list[int]) -> list[int]:
    return [v for v, _ in itertools.groupby(values)]


async def test_a_finished_jobs_outputs_are_harvested_from_its_containers(rig: Rig) -> None:
    rig.setup_bentley(BentleyScenario(job_duration_s=60.0, parts_per_output=3, blob_bytes=5000))
    # Segmentation2D (two reality-data outputs) and EvalS3D (whose report is a bucket path)
    jobs = [
        *await _add(rig, "outputs-1", payload="get-job-example"),
        *await _add(rig, "outputs-2", payload="seed-EvalS3D"),
    ]
    await rig.run(rig.engine(), within_s=600)
    bentley = _bentley(rig)
    for new in jobs:
        job = await rig.job(new.key, "bentley")
        assert job.state == JobState.HARVESTED
        remote = bentley.model.get(job.remote_id or "")
        assert bentley.model.state(remote)[0] in TERMINAL
        folder = rig.config.output.dir / "bentley" / new.key
        real_outputs = {
            n: rd for n, rd in remote.outputs.items() if not rd.startswith(BUCKET_PREFIX)
        }
        assert real_outputs
        for name in real_outputs:
            blobs = bentley.model.blobs(remote, name)
            assert len(blobs) == 1 + 3  # labels.json and three parts
            for blob in blobs:
                path = folder / "outputs" / job_key(name) / blob.name
                assert path.read_bytes() == bentley.model.blob_bytes(remote, name, blob.name)
    storage = [r for r in rig.network.sent if r.url.startswith(bentley.containers.origin)]
    assert storage and all("authorization" not in r.headers for r in storage)
    assert bentley.created == {job_name(j.reference_id or ""): 1 for j in jobs}


async def test_a_lost_create_is_found_by_name_and_not_sent_again(rig: Rig) -> None:
    rig.setup_bentley(BentleyScenario(job_duration_s=30.0, parts_per_output=1, blob_bytes=1024))
    # A quote in the name must be doubled in the OData literal.
    (new,) = await _add(rig, "Ana's scan 7")
    rig.network.inject(_creates, Fault.LOSE_ANSWER)
    await rig.run(rig.engine(), within_s=600)
    bentley = _bentley(rig)
    name = job_name("Ana's scan 7")
    assert bentley.created == {name: 1}
    creates = [r for r in rig.network.sent if _creates(r)]
    assert len(creates) == 1
    finds = [
        r for r in rig.network.sent if r.method == "GET" and r.path == "/reality-analysis/jobs"
    ]
    assert finds and finds[0].at >= creates[0].at
    assert finds[0].query["$filter"] == "name eq 'Ana''s scan 7'"
    job = await rig.job(new.key, "bentley")
    remote = bentley.job_named(name)
    assert remote is not None and job.remote_id == remote.id
    assert job.state == JobState.HARVESTED
