"""The walking skeleton over real HTTP on 127.0.0.1: engine + store against the emulator."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import numpy as np
import pytest

import harvester.engine.poll as engine_module
from harvester.config import Config
from harvester.emulator import truth
from harvester.emulator.scenario import parse_fault
from harvester.emulator.server import Emulator
from harvester.engine import Engine
from harvester.fsutil import sha256_file
from harvester.jobs import Job, JobState
from harvester.store.base import NewJob
from harvester.store.sqlite import SqliteStore

from .helpers import (
    API_KEY,
    check_outputs,
    harvest_burst,
    make_config,
    new_jobs,
    payload,
    scenario,
    stored,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IT_PLAYMENT_KEY", API_KEY)


async def harvest(
    config: Config, jobs: list, *, limit_s: float = 60.0, gate_wait: list[float] | None = None
) -> dict:  # type: ignore[type-arg]
    """Add ``jobs`` and run the engine in burst mode; returns counts by state (and appends
    to ``gate_wait`` the seconds Playment's gate stayed closed, as the metric reports)."""
    counts, engine = await harvest_burst(config, jobs, limit_s=limit_s)
    if gate_wait is not None:
        value = engine.metrics.registry.get_sample_value(
            "harvester_retry_after_wait_seconds_total", {"provider": "playment"}
        )
        assert value is not None
        gate_wait.append(value)
    return counts


async def test_full_harvest_equals_ground_truth_and_rerun_sends_nothing(tmp_path: Path) -> None:
    async with Emulator(scenario()) as emu:
        config = make_config(tmp_path, emu)
        jobs = new_jobs(12, frames=3)
        counts = await harvest(config, jobs)
        assert counts == {JobState.HARVESTED: 12}
        check_outputs(config, emu, jobs, frames=3)
        stats = emu.state.stats()
        assert stats["playment"]["creates"] == 12
        assert stats["playment"]["duplicate_creates"] == 0
        assert stats["credential_hits"] == []
        seen = len(emu.state.requests())

        # A rerun with the same lines: nothing is created, nothing is even asked.
        counts = await harvest(config, jobs)
        assert counts == {JobState.HARVESTED: 12}
        assert len(emu.state.requests()) == seen
        assert emu.state.stats()["playment"]["creates"] == 12


async def test_429_storm_holds_every_request_until_retry_after(tmp_path: Path) -> None:
    async with Emulator(scenario(job_duration_s=0.5)) as emu:
        config = make_config(tmp_path, emu, max_concurrency=8)
        jobs = new_jobs(10, frames=1)
        # From 0.3 s on (jobs created, polling under way), every Playment API request for
        # 0.3 s gets a 429 with Retry-After: 1.
        emu.state.add_fault(
            parse_fault({"kind": "429", "retry_after_s": 1.0, "start_s": 0.3, "duration_s": 0.3})
        )
        gate_wait: list[float] = []
        counts = await harvest(config, jobs, gate_wait=gate_wait)
        assert counts == {JobState.HARVESTED: 10}
        check_outputs(config, emu, jobs, frames=1)

        api = [r for r in emu.state.requests() if r["provider"] == "playment"]
        limited = [r for r in api if r["status"] == 429]
        assert limited, "the storm never hit"
        first = limited[0]["t"]
        # Requests already on the wire when the first 429 was answered arrive within a few
        # ms on loopback; after that, nothing may arrive before the 1 s deadline.
        inside = [r for r in api if first + 0.05 < r["t"] < first + 0.95]
        assert inside == [], inside[:5]
        deadline = max(r["t"] for r in limited) + 1.0
        later = [r for r in api if r["t"] > first + 0.05 and r["status"] != 429]
        assert later and min(r["t"] for r in later) >= deadline - 0.02
        # The gate stayed shut at least the 1 s Retry-After; the metric counts that time.
        assert 1.0 <= gate_wait[0] < 30.0


async def test_expired_signed_urls_are_resolved_again(tmp_path: Path) -> None:
    # More pre-expired URLs than one download may re-resolve in a row: whichever job draws
    # too many spends a harvest attempt and is retried later, so nothing ends in error.
    async with Emulator(scenario(_storage={"expire_first_n": 12})) as emu:
        config = make_config(tmp_path, emu)
        jobs = new_jobs(4, frames=2)
        counts = await harvest(config, jobs)
        assert counts == {JobState.HARVESTED: 4}
        check_outputs(config, emu, jobs, frames=2)
        storage = emu.state.stats()["storage"]
        assert storage["expired_rejected"] == 12
        assert storage["credential_hits"] == 0 or storage["credential_hits"] == []


async def test_api_key_never_reaches_the_storage_host(tmp_path: Path) -> None:
    async with Emulator(scenario()) as emu:
        config = make_config(tmp_path, emu)
        counts = await harvest(config, new_jobs(3, frames=2))
        assert counts == {JobState.HARVESTED: 3}
        assert emu.state.stats()["credential_hits"] == []
        storage_requests = [r for r in emu.state.requests() if r["provider"] == "storage"]
        assert storage_requests and all(r["status"] in (200, 206) for r in storage_requests)


async def test_lost_create_answers_are_reconciled_not_resent(tmp_path: Path) -> None:
    async with Emulator(scenario()) as emu:
        # The first three create POSTs are processed, then their answers are lost.
        emu.state.add_fault(
            parse_fault({"kind": "reset", "when": "after", "match": "/jobs", "count": 3})
        )
        config = make_config(tmp_path, emu)
        jobs = new_jobs(6, frames=1)
        counts = await harvest(config, jobs)
        assert counts == {JobState.HARVESTED: 6}
        check_outputs(config, emu, jobs, frames=1)
        stats = emu.state.stats()["playment"]
        assert stats["faults"].get("reset") == 3
        assert stats["creates"] == 6
        assert stats["duplicate_creates"] == 0
        assert stats["max_jobs_per_reference"] == 1
        listings = [r for r in emu.state.requests() if "/batch/" in r["path"]]
        assert len(listings) >= 3


async def test_reference_id_taken_outside_our_batch_is_an_error_not_a_duplicate(
    tmp_path: Path,
) -> None:
    async with Emulator(scenario()) as emu:
        config = make_config(tmp_path, emu)
        jobs = new_jobs(2, frames=1)
        first = await harvest(config, jobs[:1])
        assert first == {JobState.HARVESTED: 1}
        # A second store (another tool, another batch) submits the same reference id.
        other = make_config(tmp_path / "other", emu)
        counts = await harvest(other, jobs)
        assert counts == {JobState.ERROR: 1, JobState.HARVESTED: 1}
        assert other.store.path is not None
        async with SqliteStore(other.store.path) as store:
            (failed,) = await store.jobs(states=[JobState.ERROR])
        assert failed.reason is not None and "already exists" in failed.reason
        assert emu.state.stats()["playment"]["max_jobs_per_reference"] == 1


async def test_bad_api_key_stops_with_a_fatal_error(tmp_path: Path) -> None:
    sc = scenario(valid_api_keys=["the-only-key"])
    async with Emulator(sc) as emu:
        config = make_config(tmp_path, emu)
        async with stored(config, new_jobs(2)) as store:
            engine = Engine(config, store, burst=True)
            with anyio.fail_after(20), pytest.raises(Exception, match="API key refused"):
                await engine.run()
            counts = await store.counts()
        # Nothing was created and nothing was lost: both jobs can run again later.
        assert emu.state.stats()["playment"]["creates"] == 0
        assert sum(counts.values()) == 2


async def test_5xx_resets_and_truncated_bodies_lose_nothing(tmp_path: Path) -> None:
    async with Emulator(scenario()) as emu:
        for fault in (
            {"kind": "5xx", "status": 502, "probability": 0.3, "match": "/jobs/"},
            {"kind": "reset", "probability": 0.2, "match": "/jobs/"},
            {"kind": "truncate", "provider": "storage", "probability": 0.3, "fraction": 0.4},
            {"kind": "reset", "provider": "storage", "probability": 0.1},
        ):
            emu.state.add_fault(parse_fault(fault))
        config = make_config(tmp_path, emu, max_retries=8)
        jobs = new_jobs(8, frames=2)
        counts = await harvest(config, jobs)
        assert counts == {JobState.HARVESTED: 8}
        check_outputs(config, emu, jobs, frames=2)
        stats = emu.state.stats()
        assert stats["playment"]["faults"].get("5xx", 0) > 0
        assert stats["storage"]["faults"].get("truncate", 0) > 0
        assert stats["playment"]["creates"] == 8
        assert stats["playment"]["duplicate_creates"] == 0
        # Resumed downloads asked for the rest of the body, not all of it again.
        assert any(r["status"] == 206 for r in emu.state.requests() if r["provider"] == "storage")


async def test_provider_down_at_start_is_waited_for_not_fatal(tmp_path: Path) -> None:
    async with Emulator(scenario()) as emu:
        # The batch set-up request fails three times before the provider comes back.
        emu.state.add_fault(
            parse_fault({"kind": "5xx", "status": 502, "match": "/batch", "count": 3})
        )
        config = make_config(tmp_path, emu, max_retries=0)
        jobs = new_jobs(2, frames=1)
        counts = await harvest(config, jobs)
        assert counts == {JobState.HARVESTED: 2}
        assert emu.state.stats()["playment"]["faults"].get("5xx") == 3


async def test_image_and_video_results_download_every_mask_by_frame(tmp_path: Path) -> None:
    image = {"data": {"image_url": "https://customer.example/in/photo.jpg"}, "work_flow_id": "wf"}
    frames = [
        {"frame_id": f"v-{i}", "src": f"https://customer.example/in/{i}.jpg"} for i in range(3)
    ]
    video = {"data": {"video_data": {"frames": frames}}, "work_flow_id": "wf"}
    jobs = [
        NewJob("playment", "img-1", "img-1", None, image, "t:1"),
        NewJob("playment", "vid-1", "vid-1", None, video, "t:2"),
    ]
    async with Emulator(scenario()) as emu:
        config = make_config(tmp_path, emu)
        counts = await harvest(config, jobs)
        assert counts == {JobState.HARVESTED: 2}
        seed = emu.scenario.seed
        out = config.output.dir / "playment"
        img = out / "img-1" / "outputs" / "0" / "0.png"
        assert img.read_bytes() == truth.image_mask_bytes(seed, "img-1", 0)
        for i in range(3):
            mask = out / "vid-1" / "outputs" / f"v-{i}" / f"{i}.png"
            assert mask.read_bytes() == truth.image_mask_bytes(seed, "vid-1", i)
        for key in ("img-1", "vid-1"):
            manifest = json.loads((out / key / "MANIFEST.json").read_text())
            assert {"classes.json", "attachments.json", "result.json"} <= set(manifest["files"])
            for rel, entry in manifest["files"].items():
                assert sha256_file(out / key / rel) == entry["sha256"]
        # the customer's own input URLs were never asked of the attachments API
        assert emu.state.stats()["credential_hits"] == []


async def test_image_and_video_attachments_download_several_at_once(tmp_path: Path) -> None:
    """A video's masks are fetched ``frame_concurrency`` at a time, as a job's frames are
    (the storage host counts requests in flight; each mask is held 0.2 s there), and land
    and are indexed exactly as when fetched one by one."""
    frames = [
        {"frame_id": f"v-{i}", "src": f"https://customer.example/in/{i}.jpg"} for i in range(6)
    ]
    video = {"data": {"video_data": {"frames": frames}}, "work_flow_id": "wf"}
    async with Emulator(scenario()) as emu:
        emu.state.add_fault(
            parse_fault(
                {"kind": "slow", "provider": "storage", "match": "/image_masks/", "delay_s": 0.2}
            )
        )
        config = make_config(tmp_path, emu, harvest={"frame_concurrency": 3})
        counts = await harvest(config, [NewJob("playment", "vid-p", "vid-p", None, video, "t")])
        assert counts == {JobState.HARVESTED: 1}
        assert emu.state.stats()["storage"]["max_in_flight"] == 3
        folder = config.output.dir / "playment" / "vid-p"
        for i in range(6):
            mask = folder / "outputs" / f"v-{i}" / f"{i}.png"
            assert mask.read_bytes() == truth.image_mask_bytes(emu.scenario.seed, "vid-p", i)
        index = json.loads((folder / "attachments.json").read_text())
        assert [e["file"] for e in index] == [f"outputs/v-{i}/{i}.png" for i in range(6)]
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        for rel, entry in manifest["files"].items():
            assert sha256_file(folder / rel) == entry["sha256"]


class _CountingStore(SqliteStore):
    """Counts point reads: polling a running job should not need one each time."""

    reads = 0

    async def get(self, provider: str, key: str) -> Job | None:
        type(self).reads += 1
        return await super().get(provider, key)


@pytest.mark.parametrize("cached", [True, False])
async def test_running_jobs_are_polled_from_memory_without_store_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached: bool
) -> None:
    if not cached:
        monkeypatch.setattr(engine_module, "CACHED_JOBS_MAX", 0)
    async with Emulator(scenario(job_duration_s=1.0)) as emu:
        config = make_config(tmp_path, emu, poll_min_s=0.05, poll_max_s=0.05)
        jobs = new_jobs(4, frames=1)
        assert config.store.path is not None
        monkeypatch.setattr(_CountingStore, "reads", 0)
        async with _CountingStore(config.store.path) as store:
            await store.add_jobs(jobs, now=0.0)
            with anyio.fail_after(30):
                await Engine(config, store, burst=True).run()
            assert await store.counts() == {("playment", JobState.HARVESTED): 4}
        polls = [r for r in emu.state.requests() if r["method"] == "GET" and "/jobs/" in r["path"]]
        check_outputs(config, emu, jobs, frames=1)
    assert len(polls) >= 4 * 10  # 1 s of running, polled every 50 ms
    if cached:
        # One read to start each job, a few around harvesting; none per poll.
        assert _CountingStore.reads <= 4 * 5, (_CountingStore.reads, len(polls))
    else:
        assert _CountingStore.reads >= len(polls) * 0.8, (_CountingStore.reads, len(polls))


async def test_a_mask_per_sensor_lands_in_one_array_per_frame_and_sensor(tmp_path: Path) -> None:
    """The seed's result object carries a sensor_id per mask: a frame scanned by two lidars
    has two masks. Each becomes its own array; a frame with one mask keeps labels/<frame>.npy."""
    data = payload(2)
    sensor_data = data["data"]["sensor_data"]
    sensor_data["sensor_meta"] = [
        {"id": "top", "modality": "lidar"},
        {"id": "rear", "modality": "lidar"},
    ]
    sensor_data["frames"][0]["sensors"] = [{"sensor_id": "top"}, {"sensor_id": "rear"}]
    sensor_data["frames"][1]["sensors"] = [{"sensor_id": "top"}]
    jobs = [NewJob("playment", "multi-1", "multi-1", None, data, "t:1")]
    async with Emulator(scenario()) as emu:
        config = make_config(tmp_path, emu)
        counts = await harvest(config, jobs)
        assert counts == {JobState.HARVESTED: 1}
        folder = config.output.dir / "playment" / "multi-1"
        files = json.loads((folder / "MANIFEST.json").read_text())["files"]
        expected = {
            "labels/f-000@top.npy": ("f-000", "top", "top"),
            "labels/f-000@rear.npy": ("f-000", "rear", "rear"),
            "labels/f-001.npy": ("f-001", "top", None),
        }
        assert {k for k in files if k.startswith("labels/")} == set(expected)
        for rel, (frame, sensor, truth_sensor) in expected.items():
            want = emu.state.truth_labels("playment", "multi-1", frame, truth_sensor)
            assert np.array_equal(np.load(folder / rel), want), rel
            assert (files[rel]["frame"], files[rel]["sensor_id"]) == (frame, sensor)
            assert sha256_file(folder / rel) == files[rel]["sha256"]
