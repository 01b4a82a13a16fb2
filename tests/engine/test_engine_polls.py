"""The engine's poll scheduling on virtual time (issue 18): the rate budget is spent, never
overspent; what was learned survives a restart; a finished job is not asked for twice."""

from __future__ import annotations

import itertools

import pytest

from harvester.durations import DurationStats
from harvester.engine import DURATIONS_META
from harvester.jobs import JobState
from harvester.testing.network import MemoryRequest

from .conftest import Rig

pytestmark = pytest.mark.anyio


def _is_poll(r: MemoryRequest) -> bool:
    return r.method == "GET" and "/jobs/" in r.path


async def test_a_tight_budget_is_spent_on_polls_and_never_exceeded(rig: Rig) -> None:
    # 40 jobs running 120 s at a 1 s floor would like 40 polls/s; the budget is 8/s. Before
    # issue 18 each job's interval grew towards poll_max_s (30 s) and left most of the budget
    # idle; now every token goes to a poll.
    rate = 8.0
    rig.setup(
        job_duration_s=120.0,
        rate_per_s=rate,
        burst=1,
        max_concurrency=4,
        poll_min_s=1,
        poll_max_s=30,
    )
    await rig.add(40, frames=1)
    await rig.run(rig.engine(), within_s=600)
    assert {(await rig.job(f"scan-{i:03d}")).state for i in range(40)} == {JobState.HARVESTED}
    api = rig.api_requests()
    polls = [r.at for r in api if _is_poll(r)]
    creates_done = max(r.at for r in api if r.method == "POST")
    window = [t for t in polls if creates_done + 5 <= t <= creates_done + 100]
    # the budget is used: at least 90% of it goes to polls while every job runs
    assert len(window) >= 0.9 * rate * 95
    # and never exceeded: no second holds more than the rate's tokens (burst 1)
    times = sorted(r.at for r in api)
    for i, t in enumerate(times):
        within = sum(1 for u in itertools.islice(times, i, None) if u < t + 1.0)
        assert within <= rate + 1, (t, within)
    # no job is polled sooner than poll_min_s after its last poll
    for key in {r.path for r in api if _is_poll(r)}:
        mine = [r.at for r in api if r.path == key]
        assert all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(mine))


async def test_the_poll_that_saw_a_job_finish_is_the_last_one(rig: Rig) -> None:
    # Its answer carries the job's document: the harvest works from it, no second GET.
    rig.setup(job_duration_s=30.0, poll_min_s=1)
    jobs = await rig.add(3, frames=1)
    await rig.run(rig.engine(), within_s=120)
    for new in jobs:
        assert (await rig.job(new.key)).state == JobState.HARVESTED
    rig.check_labels(jobs, frames=1)
    assert rig.playment is not None
    for new in jobs:
        remote = rig.playment.job_by_reference("engine-project", new.reference_id or "")
        assert remote is not None
        mine = [r for r in rig.api_requests("GET") if r.path.endswith(f"/jobs/{remote.job_id}")]
        end = remote.created_at + 30.0
        assert len([r for r in mine if r.at >= end]) == 1, [r.at - end for r in mine]


async def test_learned_durations_are_kept_in_the_store_and_loaded_at_start(rig: Rig) -> None:
    rig.setup(job_duration_s=40.0, poll_min_s=1)
    await rig.add(12, frames=1)
    await rig.run(rig.engine(), within_s=200)
    value = await rig.store.get_meta(DURATIONS_META)
    assert value is not None
    life = DurationStats.from_bytes(value.encode()).life("playment")
    assert life.finished_count == 12
    # every job finished 40 s after its create: all in the bin of 38-45 s (4 bins an octave)
    assert life.survival(38.0) > 0.95 and life.survival(45.3) < 0.05
    # a new engine on the same store starts from them
    engine = rig.engine()
    await rig.run(engine, within_s=60)
    assert engine.durations.life("playment").finished_count == 12


async def test_unreadable_stored_durations_are_reported_and_not_fatal(rig: Rig) -> None:
    rig.setup(job_duration_s=5.0, poll_min_s=1)
    await rig.store.set_meta(DURATIONS_META, '{"format": "something else"}')
    (new,) = await rig.add(1, frames=1)
    engine = rig.engine()
    await rig.run(engine, within_s=60)
    assert (await rig.job(new.key)).state == JobState.HARVESTED
    value = await rig.store.get_meta(DURATIONS_META)
    assert value is not None and DurationStats.from_bytes(value.encode()).life("playment")


@pytest.mark.parametrize(
    ("rate", "window_s", "per_s"),
    [
        (0, 4.0, 40 / 4.0),  # no limit: spread evenly over one floor (poll_min_s 4 s)
        (5, 40 / 5.0, 5.0),  # 5 a second: the limiter spaces them (burst 1)
    ],
)
async def test_after_a_restart_the_first_polls_come_through_the_scheduler_spaced(
    rig: Rig, rate: float, window_s: float, per_s: float
) -> None:
    # Before, jobs loaded running at a restart took their first poll from a spread over
    # poll_max_s (60 s here) and only then joined the scheduler. Now they join it at once:
    # every one is polled within one floor (no limit) or n / rate (a limit), and the polls
    # never come all at once.
    n = 40
    rig.setup(
        job_duration_s=10_000.0,
        rate_per_s=rate,
        burst=1,
        max_concurrency=4,
        poll_min_s=4,
        poll_max_s=60,
    )
    await rig.add(n, frames=1)
    await rig.run(rig.engine(), within_s=600, stop_when=lambda: len(rig.api_requests("POST")) >= n)
    assert {(await rig.job(f"scan-{i:03d}")).state for i in range(n)} == {JobState.RUNNING}
    restart = rig.clock.monotonic()
    engine = rig.engine()
    await rig.run(engine, within_s=120, stop_when=lambda: rig.clock.monotonic() >= restart + 30)
    polls = [r for r in rig.api_requests() if _is_poll(r) and r.at >= restart]
    first: dict[str, float] = {}
    for r in polls:
        first.setdefault(r.path, r.at)
    assert len(first) == n
    assert max(first.values()) - restart <= window_s + 0.5, sorted(first.values())
    # spaced: no second holds more than its share of them
    times = sorted(first.values())
    for i, t in enumerate(times):
        within = sum(1 for u in times[i:] if u < t + 1.0)
        assert within <= per_s + 1, (t - restart, within)


async def test_durations_are_learned_per_job_type_and_per_provider(rig: Rig) -> None:
    # The adapter names each job's type from its poll answer (Playment: the workflow): the
    # type's table learns its jobs, and so does the provider's, which stands in for types
    # that have too few of them.
    rig.setup(job_duration_s=40.0, poll_min_s=1)
    await rig.add(12, frames=1)
    engine = rig.engine()
    await rig.run(engine, within_s=200)
    value = await rig.store.get_meta(DURATIONS_META)
    assert value is not None
    saved = DurationStats.from_bytes(value.encode())
    assert set(saved.classes) == {"playment", "playment/wf"}
    typed, provider = saved.life("playment/wf"), saved.life("playment")
    assert typed.parent is provider
    assert typed.finished_count == provider.finished_count == 12
    assert typed.reached == provider.reached  # each job counted once in each
    assert sum(engine.durations.life("playment").inside) == 0  # none left in flight
