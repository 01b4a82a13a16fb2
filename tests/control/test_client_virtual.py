"""The Python API on virtual time against Playment in memory (``harvester.testing``): the
client's ``clock`` and ``exchanges`` reach the engine, so a pipeline's tests can run the whole
public API (submit -> wait -> arrays) with no socket and no real sleep."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import numpy as np
import pytest

from harvester import Harvester, JobSpec
from harvester.clock import FakeClock
from harvester.config import parse_config
from harvester.jobs import Job, JobState
from harvester.testing.network import MemoryNetwork
from harvester.testing.playment import MemoryPlayment
from harvester.testing.virtual import run_until, threads_inline
from tests.integration.helpers import payload

pytestmark = pytest.mark.anyio

PROJECT = "client-project"
JOB_S = 300.0  #: each job's remote duration: five virtual minutes


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_the_public_api_harvests_on_a_virtual_clock_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLIENT_VIRTUAL_KEY", "client-virtual-key")
    clock = FakeClock(start=1000.0)
    network = MemoryNetwork(clock)
    playment = MemoryPlayment(clock, job_duration_s=JOB_S).mount(network)
    cfg = parse_config(
        {
            "store": {"url": "sqlite://state.db"},
            "output": {"dir": "out"},
            "log": {"level": "warning", "format": "json"},
            "providers": {
                "playment": {
                    "base_url": playment.api,
                    "api_key_env": "CLIENT_VIRTUAL_KEY",
                    "project_id": PROJECT,
                    "poll_min_s": 5,
                    "poll_max_s": 30,
                }
            },
        },
        source=tmp_path / "config.toml",
    )
    started = time.monotonic()
    with threads_inline():
        async with Harvester(cfg, clock=clock, exchanges=network) as h:
            assert h.engine.clock is clock
            jobs = await h.submit(
                [JobSpec("playment", reference_id=f"vt-{i}", payload=payload(2)) for i in range(4)]
            )
            done: list[Job] = []

            async def wait() -> None:
                done.extend(await h.wait(jobs, limit_s=3 * JOB_S))

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                took = await run_until(clock, lambda: bool(done), within_s=3 * JOB_S)
            assert [j.state for j in done] == [JobState.HARVESTED] * 4
            for job in done:
                remote = playment.job_by_reference(PROJECT, job.reference_id or "")
                assert remote is not None
                arrays = await h.arrays("playment", job.key)
                assert sorted(arrays) == ["labels/f-000.npy", "labels/f-001.npy"]
                for i in range(2):
                    truth = playment.results.labels(remote, i)
                    assert np.array_equal(arrays[f"labels/f-{i:03d}.npy"], truth)
    # on the virtual clock: the jobs' five minutes passed, plus at most a few poll intervals
    assert JOB_S <= took <= JOB_S + 60, took
    # every request went through the memory network: creates, polls and result downloads
    creates = [r for r in network.sent if r.method == "POST" and r.path.endswith("/jobs")]
    assert len(creates) == 4
    assert any(r.url.startswith(playment.storage) for r in network.sent)
    # and none of it took real time (generous for a loaded CI machine)
    assert time.monotonic() - started < 30
