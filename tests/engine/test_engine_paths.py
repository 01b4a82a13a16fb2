"""One job's path through the real engine, on virtual time: submit, reconcile, 429, polling,
drain. Each test runs minutes of virtual time in a fraction of a real second."""

from __future__ import annotations

import itertools
import time

import pytest

from harvester.jobs import JobState
from harvester.testing.network import Fault, MemoryAnswer, MemoryRequest

from .conftest import Rig

pytestmark = pytest.mark.anyio


def _creates(r: MemoryRequest) -> bool:
    return r.method == "POST" and r.path.endswith("/jobs")


async def test_submit_poll_harvest_on_virtual_time(rig: Rig) -> None:
    rig.setup(job_duration_s=30.0)
    jobs = await rig.add(3, frames=2)
    started = time.monotonic()
    took = await rig.run(rig.engine(), within_s=120)
    real = time.monotonic() - started
    for new in jobs:
        assert (await rig.job(new.key)).state == JobState.HARVESTED
    rig.check_labels(jobs, frames=2)
    assert rig.playment is not None
    assert rig.playment.created == {j.reference_id: 1 for j in jobs}
    # Done once the jobs finished (30 s) and the next poll saw it: polls are at most
    # poll_max_s (8 s, +10% jitter) apart.
    assert 30.0 <= took <= 30.0 + 8.8 + 1.0
    assert real < took / 10, f"{real:.2f} s of real time for {took:.1f} s of virtual time"


async def test_a_create_whose_answer_was_lost_is_found_not_sent_again(rig: Rig) -> None:
    rig.setup()
    (new,) = await rig.add(1)
    # Playment makes the job; the answer never reaches harvester.
    rig.network.inject(_creates, Fault.LOSE_ANSWER)
    await rig.run(rig.engine(), within_s=120)
    assert (await rig.job(new.key)).state == JobState.HARVESTED
    assert rig.playment is not None
    assert rig.playment.created == {new.reference_id: 1}
    assert len(rig.api_requests("POST", "/jobs")) == 1  # never resent
    remote = rig.playment.job_by_reference("engine-project", new.reference_id or "")
    assert remote is not None
    assert (await rig.job(new.key)).remote_id == remote.job_id
    # Found by listing the batch harvester made for exactly this (``harvester.engine.reconcile``).
    create = rig.api_requests("POST", "/jobs")[0]
    finds = [r for r in rig.api_requests("GET") if "/batch/" in r.path]
    assert finds and finds[0].at >= create.at


async def test_a_create_that_never_arrived_is_sent_again_once_proven_absent(rig: Rig) -> None:
    rig.setup()
    (new,) = await rig.add(1)
    rig.network.inject(_creates, Fault.RESET)
    await rig.run(rig.engine(), within_s=120)
    assert (await rig.job(new.key)).state == JobState.HARVESTED
    assert rig.playment is not None
    assert rig.playment.created == {new.reference_id: 1}
    creates = rig.api_requests("POST", "/jobs")
    finds = [r for r in rig.api_requests("GET") if "/batch/" in r.path]
    # Sent, lost, looked up (absent), and only then sent again.
    assert len(creates) == 2
    assert creates[0].at <= finds[0].at <= creates[1].at


async def test_a_429_holds_every_request_of_the_lane_until_its_retry_after(rig: Rig) -> None:
    rig.setup(job_duration_s=60.0, max_concurrency=4)
    await rig.add(6, frames=1)

    def polls(r: MemoryRequest) -> bool:
        return r.method == "GET" and "/jobs/" in r.path

    retry_after = 25.0
    # The first poll is refused; every request of the lane then waits for the gate.
    rig.network.inject(polls, MemoryAnswer(429, b"slow down", {"Retry-After": "25"}))
    await rig.run(rig.engine(), within_s=300)
    api = rig.api_requests()
    refused_at = next(r.at for r in api if polls(r))
    after = [r.at for r in api if r.at > refused_at]
    assert after, "nothing was sent after the 429"
    # Nothing in between; the first request comes at the deadline itself, not later.
    assert min(after) == pytest.approx(refused_at + retry_after)
    # Requests sent in the same instant as the refused poll were already on their way.
    assert all(not (refused_at < t < refused_at + retry_after) for t in after)
    states = {(await rig.job(f"scan-{i:03d}")).state for i in range(6)}
    assert states == {JobState.HARVESTED}


async def test_with_budget_to_spare_a_job_is_polled_every_poll_min_s(rig: Rig) -> None:
    # Three statuses over 100 s; the rate is unlimited: nothing to save polls for, so the
    # job is polled at its floor the whole time (issue 18: no growing backoff to wait out).
    rig.setup(job_duration_s=100.0, poll_min_s=1, poll_max_s=20)
    (new,) = await rig.add(1, frames=1)
    took = await rig.run(rig.engine(), within_s=400)
    assert (await rig.job(new.key)).state == JobState.HARVESTED
    create = rig.api_requests("POST", "/jobs")[0]
    polls = [r.at - create.at for r in rig.api_requests("GET") if "/jobs/" in r.path]
    gaps = [b - a for a, b in itertools.pairwise(polls)]
    assert min(gaps) >= 1.0 - 1e-9  # never sooner than poll_min_s
    assert max(gaps) <= 1.0 + 1e-6  # and no later either
    assert 100.0 <= polls[-1] <= 101.0 + 1e-6  # seen finished within a floor of its end
    assert took <= 101.0 + 1.0


async def test_drain_lets_steps_in_flight_finish_and_loses_nothing(rig: Rig) -> None:
    rig.setup(job_duration_s=20.0, max_concurrency=2)
    jobs = await rig.add(4, frames=1)
    rig.network.latency_s = 2.0  # every request is in flight for 2 virtual seconds
    stopped_at: list[float] = []

    def creating() -> bool:
        if rig.api_requests("POST", "/jobs"):
            stopped_at.append(rig.clock.monotonic())
            return True
        return False

    await rig.run(rig.engine(drain_grace_s=30.0), within_s=120, stop_when=creating)
    assert rig.playment is not None
    made = set(rig.playment.created)
    # The creates on their way when the stop came finished and were recorded; none started
    # after it.
    late = [r for r in rig.api_requests() if r.at > stopped_at[0]]
    assert late == []
    for new in jobs:
        job = await rig.job(new.key)
        if new.reference_id in made:
            assert job.state == JobState.RUNNING and job.remote_id is not None
        else:
            assert job.state == JobState.NEW
    assert made  # the stop came while creates were in flight

    # The next run takes every job from where it was: nothing is created twice.
    rig.network.latency_s = 0.0
    await rig.run(rig.engine(), within_s=200)
    for new in jobs:
        assert (await rig.job(new.key)).state == JobState.HARVESTED
    assert rig.playment.created == {j.reference_id: 1 for j in jobs}
