"""Modzy through the real engine on virtual time (``harvester.testing.modzy``): submit, poll,
results that are not published yet when the job ends (waited for without spending an
attempt), per-input failures kept beside the results, and a give-up once
``harvest.results_wait_s`` has passed."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest

from harvester.emulator.scenario import ModzyScenario
from harvester.jobs import JobState, job_key
from harvester.store.base import NewJob
from harvester.testing.modzy import MemoryModzy
from harvester.testing.network import MemoryRequest

from .conftest import Rig

pytestmark = pytest.mark.anyio

POLL_MIN_S = 5.0  # the rig's; Modzy's results are asked for again after min(10 s, poll_min_s)


def _payload(n: int) -> dict[str, Any]:
    # The create body Modzy's SDK sends for text inputs (tests/contracts/test_modzy_sdk.py
    # proves harvester's equals it byte for byte).
    sources = {f"review-{i}": {"input.txt": f"review number {i}"} for i in range(n)}
    return {
        "model": {"identifier": "ed542963de", "version": "1.0.1"},
        "explain": False,
        "input": {"type": "text", "sources": sources},
    }


async def _add(rig: Rig, ref: str, inputs: int) -> NewJob:
    new = NewJob("modzy", job_key(ref), ref, None, _payload(inputs), "test:1")
    await rig.store.add_jobs([new], now=rig.clock.wall())
    return new


def _modzy(rig: Rig) -> MemoryModzy:
    assert rig.modzy is not None
    return rig.modzy


def _requests(rig: Rig, method: str, prefix: str) -> list[MemoryRequest]:
    return [r for r in rig.network.sent if r.method == method and r.path.startswith(prefix)]


async def test_submit_poll_and_harvest_once_the_results_are_published(rig: Rig) -> None:
    # The job ends at 40 s; its results answer 404 until 70 s after the create.
    scenario = ModzyScenario(job_duration_s=40.0, results_404_s=70.0, item_failure_rate=0.4)
    rig.setup_modzy(scenario)
    new = await _add(rig, "reviews-1", inputs=6)
    await rig.run(rig.engine(), within_s=600)
    modzy = _modzy(rig)
    job = await rig.job(new.key, "modzy")
    assert job.state == JobState.HARVESTED, job.reason
    remote = modzy.job(job.remote_id or "")
    assert modzy.created == {remote.key: 1}
    (create,) = _requests(rig, "POST", "/api/jobs")
    reads = [r.at - create.at for r in _requests(rig, "GET", "/api/jobs/")]
    assert POLL_MIN_S <= reads[0] <= POLL_MIN_S * 1.1
    # The first poll at or after 40 s saw COMPLETED and the results were asked for at once,
    # then every 5 s (each attempt reading the job again): refused (404) until 70 s,
    # harvested on the first ask after.
    results = [r.at - create.at for r in _requests(rig, "GET", "/api/results/")]
    assert results[0] == next(t for t in reads if t >= 40.0)
    assert all(b - a == pytest.approx(POLL_MIN_S) for a, b in itertools.pairwise(results))
    assert results[-2] < 70.0 <= results[-1] < 70.0 + POLL_MIN_S
    assert modzy.results_not_yet == len(results) - 1 >= 2
    # What was harvested is what Modzy served: results and, beside them, the failed inputs.
    folder = rig.config.output.dir / "modzy" / new.key
    served = modzy.model.render_results(remote)
    assert orjson.loads((folder / "results.json").read_bytes()) == served
    assert served["results"] and served["failures"]  # some inputs failed, some did not
    assert orjson.loads((folder / "failures.json").read_bytes()) == served["failures"]


async def test_results_never_published_end_the_job_after_results_wait_s(rig: Rig) -> None:
    scenario = ModzyScenario(job_duration_s=20.0, results_404_s=1e9)
    rig.setup_modzy(scenario, harvest={"results_wait_s": 60})
    new = await _add(rig, "reviews-2", inputs=2)
    await rig.run(rig.engine(), within_s=600)
    job = await rig.job(new.key, "modzy")
    assert job.state == JobState.ERROR
    assert "results_wait_s" in (job.reason or "")
    results = [r.at for r in _requests(rig, "GET", "/api/results/")]
    # Asked every 5 s from the first ask until 60 s had passed, and no more.
    assert results[-1] - results[0] == pytest.approx(60.0)
    assert len(results) == 60 / POLL_MIN_S + 1
