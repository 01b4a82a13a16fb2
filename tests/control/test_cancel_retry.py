"""Cancel, retry and deadlines end to end: the engine against the emulator over real HTTP,
the way the daemon's ``DELETE /jobs/...`` and ``harvester retry`` drive them."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import anyio
import pytest

from harvester.config import Config
from harvester.control import retry_job
from harvester.emulator.server import Emulator
from harvester.engine import Engine
from harvester.errors import ControlError
from harvester.jobs import Job, JobState
from harvester.metrics import Metrics
from harvester.store.sqlite import SqliteStore
from tests.integration.test_all_providers import SECRETS, config, jobs_for, scenario

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


def counts(metrics: Metrics, name: str) -> dict[tuple[str, ...], float]:
    """The non-zero samples of counter ``name``, by their label values."""
    return {
        tuple(s.labels.values()): s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == name + "_total" and s.value
    }


async def modzy_status(emu: Emulator, remote_id: str) -> str:
    async with aiohttp.ClientSession() as s:
        url = f"{emu.urls['modzy']}/api/jobs/{remote_id}"
        headers = {"Authorization": f"ApiKey {SECRETS['IT_MK']}"}
        async with s.get(url, headers=headers) as resp:
            body = await resp.json()
    return str(body["status"])


async def wait_state(store: SqliteStore, job: Job, states: set[JobState]) -> Job:
    with anyio.fail_after(30):
        while True:
            got = await store.get(job.provider, job.key)
            assert got is not None
            if got.state in states:
                return got
            await anyio.sleep(0.02)


async def daemon(cfg: Config, store: SqliteStore, names: list[str]) -> tuple[Engine, anyio.Event]:
    return Engine(cfg, store, providers=names, burst=False), anyio.Event()


async def test_cancel_running_jobs_at_the_provider_or_locally(tmp_path: Path) -> None:
    slow = {"job_duration_s": 60.0}
    async with Emulator(scenario(modzy=slow, playment=slow, bentley=slow)) as emu:
        cfg = config(tmp_path, emu)
        assert cfg.store.path is not None
        async with SqliteStore(cfg.store.path) as store:
            jobs = jobs_for("modzy", 2) + jobs_for("playment", 1) + jobs_for("bentley", 1)
            await store.add_jobs(jobs, now=0.0)
            engine = Engine(cfg, store, providers=["bentley", "modzy", "playment"], burst=False)
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: engine.run(stop=stop))
                with anyio.fail_after(30):
                    await engine.ready.wait()
                running = [
                    await wait_state(store, await store.get(j.provider, j.key), {JobState.RUNNING})  # type: ignore[arg-type]
                    for j in jobs
                ]
                for job in running:
                    req = await engine.cancel(job.provider, job.key, wait_s=20)
                    assert req.error is None, req.error
                    assert req.job is not None and req.job.state == JobState.CANCELLED
                    assert req.job.cancelled_by == "user"
                # A second cancel is refused with one line, and changes nothing.
                before = await store.get("modzy", "modzy-0")
                with pytest.raises(ControlError, match="already ended cancelled"):
                    await engine.cancel("modzy", "modzy-0", wait_s=5)
                assert await store.get("modzy", "modzy-0") == before
                with pytest.raises(ControlError, match="no such job"):
                    await engine.cancel("modzy", "nope", wait_s=5)
                stop.set()
            by_key = {j.key: j for j in await store.jobs()}
            for key in ("modzy-0", "modzy-1"):
                rid = by_key[key].remote_id
                assert rid is not None
                assert await modzy_status(emu, rid) == "CANCELED"
                assert "at modzy" in (by_key[key].reason or "")
            assert "has no cancel" in (by_key["playment-0"].reason or "")
            assert "at bentley" in (by_key["bentley-0"].reason or "")
            # never polled again after the cancel: the engine forgot them
            assert not any(lane.queue for lane in engine.lanes.values())
            # counted by where the cancel acted; the second cancel as refused
            assert counts(engine.metrics, "harvester_job_cancels") == {
                ("bentley", "provider", "cancelled"): 1,
                ("modzy", "provider", "cancelled"): 2,
                ("modzy", "local", "refused"): 1,
                ("playment", "local", "cancelled"): 1,
            }


async def test_job_timeout_cancels_at_the_provider_and_ends_in_error(tmp_path: Path) -> None:
    async with Emulator(scenario(modzy={"job_duration_s": 60.0})) as emu:
        cfg = config(tmp_path, emu, modzy={"job_timeout_s": 0.5})
        assert cfg.store.path is not None
        async with SqliteStore(cfg.store.path) as store:
            await store.add_jobs(jobs_for("modzy", 1), now=0.0)
            engine = Engine(cfg, store, providers=["modzy"])
            with anyio.fail_after(30):
                await engine.run()
            (job,) = await store.jobs()
            assert job.state == JobState.ERROR
            assert counts(engine.metrics, "harvester_job_timeouts") == {("modzy",): 1}
            assert job.reason is not None and job.reason.startswith("timed out after")
            assert "cancelled at modzy" in job.reason
            assert job.remote_id is not None
            assert await modzy_status(emu, job.remote_id) == "CANCELED"


async def test_retry_harvests_an_error_job_again_and_resubmits_only_on_request(
    tmp_path: Path,
) -> None:
    async with Emulator(scenario(modzy={"job_duration_s": 60.0})) as emu:
        cfg = config(tmp_path, emu, modzy={"job_timeout_s": 0.3})
        assert cfg.store.path is not None
        async with SqliteStore(cfg.store.path) as store:
            await store.add_jobs(jobs_for("modzy", 1), now=0.0)
            with anyio.fail_after(30):
                await Engine(cfg, store, providers=["modzy"]).run()
            (job,) = await store.jobs()
            assert job.state == JobState.ERROR and job.remote_id
            first = job.remote_id
            # error with a remote id: polled again, never re-created
            metrics = Metrics()
            again = await retry_job(store, job, resubmit=False, now=1.0, metrics=metrics)
            assert again.state == JobState.RUNNING and again.remote_id == first
        cfg2 = config(tmp_path, emu)  # no deadline now
        async with SqliteStore(cfg2.store.path) as store:  # type: ignore[arg-type]
            with anyio.fail_after(30):
                await Engine(cfg2, store, providers=["modzy"]).run()
            (job,) = await store.jobs()
            assert job.state == JobState.CANCELLED  # the provider's verdict on the old job
            assert job.cancelled_by == "provider"
            assert emu.state.stats()["modzy"]["creates"] == 1
            with pytest.raises(ControlError, match="--resubmit"):
                await retry_job(store, job, resubmit=False, now=2.0, metrics=metrics)
            assert await store.get("modzy", job.key) == job
            fresh = await retry_job(store, job, resubmit=True, now=2.0, metrics=metrics)
            # a refused retry counts nothing
            assert counts(metrics, "harvester_job_retries") == {
                ("modzy", "harvest-again"): 1,
                ("modzy", "resubmit"): 1,
            }
            assert fresh.state == JobState.NEW and fresh.past_remote_ids == (first,)
            assert fresh.remote_attempt == 2 and fresh.remote_reference == "modzy-0~2"
