"""The Python API as a user calls it: ``Harvester`` (async) over a config built in code, and
``SyncHarvester`` from a script and from inside a running event loop (as in Jupyter), all
against the emulator over real HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import numpy as np
import pytest

from harvester import Harvester, JobSpec, SyncHarvester
from harvester.emulator.server import Emulator
from harvester.errors import ControlError, JobsFileError
from harvester.jobs import JobState
from tests.chaos.harness import EmulatorThread, child_env, write_config
from tests.chaos.harness import scenario as chaos_scenario
from tests.integration.helpers import payload
from tests.integration.test_all_providers import PAYLOADS, SECRETS, config, scenario

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


async def test_async_client_submits_waits_reads_arrays_cancels_and_retries(
    tmp_path: Path,
) -> None:
    async with Emulator(scenario(modzy={"job_duration_s": 120.0})) as emu:
        cfg = config(tmp_path, emu)  # a Config built in code, no file
        async with Harvester(cfg) as h:
            jobs = await h.submit(
                [
                    {"provider": "playment", "reference_id": "nb-1", "payload": payload(2)},
                    JobSpec("playment", reference_id="nb-2", payload=payload(1)),
                    JobSpec("modzy", reference_id="nb-slow", payload=PAYLOADS["modzy"]),
                ]
            )
            assert [j.state for j in jobs] == [JobState.NEW] * 3
            with pytest.raises(JobsFileError, match="python:1"):
                await h.submit([{"provider": "nobody", "reference_id": "x", "payload": {}}])
            seen = [j.state async for j in h.changes(jobs[:1])]
            assert seen[0] == JobState.NEW and seen[-1] == JobState.HARVESTED
            done = await h.wait(jobs[:2], limit_s=30)
            assert [j.state for j in done] == [JobState.HARVESTED] * 2
            files = await h.files("playment", "nb-1")
            arrays = await h.arrays("playment", "nb-1")
            folder = Path(await h.output("playment", "nb-1"))
            assert {folder / r for r in files} == set(files.values())
            npy = sorted(r for r in files if r.endswith(".npy"))
            assert len(npy) == 2 and sorted(arrays) == npy
            for rel in npy:
                assert np.array_equal(arrays[rel], np.load(files[rel]))
                truth = emu.state.truth_labels("playment", "nb-1", Path(rel).stem)
                assert np.array_equal(arrays[rel], truth)

            with anyio.fail_after(30):
                async for j in h.changes([("modzy", "nb-slow")]):
                    if j.state == JobState.RUNNING:
                        break
            with pytest.raises(TimeoutError, match=r"after 0\.2 s"):
                await h.wait([("modzy", "nb-slow")], limit_s=0.2)  # it runs for 120 s
            cancelled = await h.cancel("modzy", "nb-slow")
            assert cancelled.state == JobState.CANCELLED and cancelled.cancelled_by == "user"
            with pytest.raises(ControlError, match="already ended cancelled"):
                await h.cancel("modzy", "nb-slow")
            with pytest.raises(ControlError, match="--resubmit"):
                await h.retry("modzy", "nb-slow")
            again = await h.retry("modzy", "nb-slow", resubmit=True)
            assert again.state == JobState.NEW and again.remote_attempt == 2
            states = {j.key: j.state async for j in h.jobs(provider="playment")}
            assert states == {"nb-1": JobState.HARVESTED, "nb-2": JobState.HARVESTED}
            with pytest.raises(ControlError, match="no such job"):
                await h.get("playment", "nope")
        # The store and the engine lock are let go: the CLI's next engine may start.
        async with Harvester(cfg) as h2:
            assert (await h2.get("modzy", "nb-slow")).remote_attempt == 2


def test_sync_client_from_a_script_and_inside_a_running_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in child_env().items():
        monkeypatch.setenv(name, value)
    with EmulatorThread(chaos_scenario()) as emu:
        path = write_config(tmp_path, emu.urls, "sync-nb", providers=("playment",))
        with SyncHarvester(path) as h:
            (job,) = h.submit([JobSpec("playment", reference_id="s-1", payload=payload(1))])
            (done,) = h.wait([job], limit_s=30)
            assert done.state == JobState.HARVESTED
            assert len(h.arrays("playment", "s-1")) == 1

        async def notebook_cell() -> list[JobState]:
            # Jupyter runs cells on its loop; the sync client must not need that loop.
            asyncio.get_running_loop()
            with SyncHarvester(path) as nb:
                (j,) = nb.submit(
                    [{"provider": "playment", "reference_id": "s-2", "payload": payload(1)}]
                )
                nb.wait([j], limit_s=30)
                return [x.state for x in nb.jobs(states=["harvested"])]

        assert asyncio.run(notebook_cell()) == [JobState.HARVESTED] * 2
