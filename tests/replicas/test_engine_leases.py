"""The engine's lease mode in this process, against the emulator and a real PostgreSQL: a burst
run (``harvester harvest`` on a shared store) ends when the table has no active job, two
engines split the work, and an engine whose jobs are taken from it drops them instead of
crashing or writing them, then finishes what it is given back."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from integration.helpers import API_KEY, check_outputs, make_config, new_jobs, scenario
from store.pgserver import PgServer
from structlog.testing import capture_logs

import harvester.replica as replica_module
from harvester.config import Config
from harvester.durations import DurationStats, bin_of
from harvester.emulator.server import Emulator
from harvester.engine import DURATIONS_META, Engine
from harvester.engine.learned import LearnedDurations
from harvester.jobs import Job, JobState
from harvester.store.base import NewJob
from harvester.store.copy import copy_store
from harvester.store.postgres import PostgresStore
from harvester.store.sqlite import SqliteStore

pytestmark = pytest.mark.anyio

LEASE_S = 3.0  # the smallest the config allows: renewals every second


async def _running(job_duration_s: float) -> AsyncIterator[Emulator]:
    emu = Emulator(scenario(job_duration_s=job_duration_s, points_per_frame=300))
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async for emu in _running(0.3):
        yield emu


@pytest.fixture
def url(postgres_server: PgServer) -> str:
    return postgres_server.url(postgres_server.create_database("engine"))


def shared_config(tmp_path: Path, emu: Emulator, url: str) -> Config:
    config = make_config(tmp_path, emu)
    store = dataclasses.replace(config.store, url=url, path=None, lease_s=LEASE_S)
    return dataclasses.replace(config, store=store)


def opened(url: str, server: PgServer) -> PostgresStore:
    return PostgresStore(url, password=server.password)


async def run_burst(
    config: Config, stores: dict[str, PostgresStore], done: dict[str, set[str]]
) -> dict[str, Engine]:
    """A burst engine per store, run together to the end; ``done[name]``: the keys each
    engine harvested."""
    engines = {
        name: Engine(
            config,
            store,
            burst=True,
            on_change=lambda j, name=name: (
                done.setdefault(name, set()).add(j.key) if j.state == JobState.HARVESTED else None
            ),
        )
        for name, store in stores.items()
    }
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for engine in engines.values():
                tg.start_soon(engine.run)
    return engines


def assert_created_once(emulator: Emulator, n: int) -> None:
    """The emulator saw ``n`` creates, none of them a duplicate."""
    stats = emulator.state.stats()["playment"]
    assert (stats["creates"], stats["duplicate_creates"]) == (n, 0)


def created_once_and_output(config: Config, emulator: Emulator, jobs: list[NewJob]) -> None:
    """Each job created once at the emulator and its output equal to the emulator's truth."""
    assert_created_once(emulator, len(jobs))
    check_outputs(config, emulator, jobs, frames=1)


async def test_a_burst_run_on_a_shared_store_ends_when_nothing_is_active(
    tmp_path: Path,
    emulator: Emulator,
    url: str,
    postgres_server: PgServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IT_PLAYMENT_KEY", API_KEY)
    config = shared_config(tmp_path, emulator, url)
    jobs = new_jobs(12, frames=1)
    async with opened(url, postgres_server) as store:
        await store.add_jobs(jobs, now=1.0)
        engine = Engine(config, store, burst=True)
        assert engine.replica is not None
        with anyio.fail_after(30):
            await engine.run()
        assert await store.counts() == {("playment", JobState.HARVESTED): 12}
        assert set(engine.remaining) == set()
        async with store._connection() as conn:
            assert await conn.fetchval("SELECT count(*) FROM jobs WHERE owner IS NOT NULL") == 0
            assert await conn.fetchval("SELECT count(*) FROM replicas") == 0, "left cleanly"
    check_outputs(config, emulator, jobs, frames=1)
    assert emulator.state.stats()["playment"]["creates"] == 12


async def test_two_engines_share_the_work_and_each_job_is_done_once(
    tmp_path: Path,
    emulator: Emulator,
    url: str,
    postgres_server: PgServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IT_PLAYMENT_KEY", API_KEY)
    config = shared_config(tmp_path, emulator, url)
    jobs = new_jobs(60, frames=1)
    done: dict[str, set[str]] = {}
    async with opened(url, postgres_server) as a, opened(url, postgres_server) as b:
        await a.add_jobs(jobs, now=1.0)
        engines = await run_burst(config, {"a": a, "b": b}, done)
        assert await a.counts() == {("playment", JobState.HARVESTED): 60}
        value = await a.get_meta(DURATIONS_META)
    assert done.keys() == {"a", "b"}, "both engines did some of the work"
    assert not (done["a"] & done["b"]) and len(done["a"] | done["b"]) == 60
    created_once_and_output(config, emulator, jobs)
    # What each learned of the jobs' durations adds up in the store. Before, each engine
    # saved its whole table at the end of its run and the last one overwrote the other's.
    assert value is not None
    stored = DurationStats.from_bytes(value.encode())
    assert stored.life("playment").finished_count == 60
    assert stored.life("playment/wf-it").finished_count == 60
    # each learned its own share, and took in the other's if it saved after it
    learned = {name: e.durations.life("playment").finished_count for name, e in engines.items()}
    assert all(learned[name] in (len(done[name]), 60) for name in engines), (learned, done)
    assert max(learned.values()) == 60


@pytest.fixture
async def slow_emulator() -> AsyncIterator[Emulator]:
    """Remote jobs that take a while: the engine holds them, polling."""
    async for emu in _running(4.0):
        yield emu


async def test_jobs_taken_from_an_engine_are_dropped_not_written_then_finished(
    tmp_path: Path,
    slow_emulator: Emulator,
    url: str,
    postgres_server: PgServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IT_PLAYMENT_KEY", API_KEY)
    # This is about theft: the thief joining must not also make the engine hand jobs back.
    monkeypatch.setattr(replica_module, "REBALANCE_SLACK", 10**9)
    emulator = slow_emulator
    config = shared_config(tmp_path, emulator, url)
    jobs = new_jobs(20, frames=1)
    stop = anyio.Event()
    async with opened(url, postgres_server) as store, opened(url, postgres_server) as thief:
        await store.add_jobs(jobs, now=1.0)
        engine = Engine(config, store, burst=False)
        assert engine.replica is not None
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: engine.run(stop=stop))
                with anyio.fail_after(20):
                    while len(engine.replica.held.get("playment", {})) < 20:  # noqa: ASYNC110
                        await anyio.sleep(0.1)
                # Another replica takes half of them, as if this one's lease had expired.
                await thief.join("thief", lease_s=60.0)
                stolen = sorted(engine.replica.held["playment"])[:10]
                async with thief._connection() as conn:
                    await conn.execute(
                        "UPDATE jobs SET owner = 'thief' WHERE key = ANY($1::text[])", stolen
                    )
                with anyio.fail_after(20):
                    while set(stolen) & set(engine.replica.held["playment"]):  # noqa: ASYNC110
                        await anyio.sleep(0.1)
                before = {j.key: j for j in await store.jobs() if j.key in stolen}
                # The thief dies without finishing anything: its jobs come back.
                await thief.leave()
                with anyio.fail_after(40):
                    while await store.counts() != {  # noqa: ASYNC110
                        ("playment", JobState.HARVESTED): 20
                    }:
                        await anyio.sleep(0.2)
                stop.set()
        assert engine.fatal is None
    dropped = {e["job"] for e in logs if e["event"] == "job dropped"}
    assert dropped == set(stolen), dropped
    assert all(j.state in (JobState.RUNNING, JobState.SUBMITTING) for j in before.values())
    created_once_and_output(config, emulator, jobs)


async def test_a_replica_that_stops_hands_its_jobs_to_the_others_at_once(
    tmp_path: Path,
    slow_emulator: Emulator,
    url: str,
    postgres_server: PgServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IT_PLAYMENT_KEY", API_KEY)
    config = shared_config(tmp_path, slow_emulator, url)
    jobs = new_jobs(10, frames=1)
    async with opened(url, postgres_server) as a, opened(url, postgres_server) as b:
        await a.add_jobs(jobs, now=1.0)
        first = Engine(config, a, burst=False, drain_grace_s=0.5)
        assert first.replica is not None
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: first.run(stop=stop))
            with anyio.fail_after(20):
                while len(first.replica.held.get("playment", {})) < 10:  # noqa: ASYNC110
                    await anyio.sleep(0.1)
            stop.set()  # SIGTERM: drain, then hand back what is unfinished
        async with a._connection() as conn:
            assert await conn.fetchval("SELECT count(*) FROM jobs WHERE owner IS NOT NULL") == 0
            assert await conn.fetchval("SELECT count(*) FROM replicas") == 0
        # Well within one lease: the second replica need not wait for an expiry.
        second = Engine(config, b, burst=True)
        with anyio.fail_after(LEASE_S + 15):
            await second.run()
        assert await b.counts() == {("playment", JobState.HARVESTED): 10}
    assert_created_once(slow_emulator, 10)


@pytest.fixture
async def long_emulator() -> AsyncIterator[Emulator]:
    """Remote jobs that run long enough for a second replica to join meanwhile."""
    async for emu in _running(8.0):
        yield emu


async def test_a_replica_that_joins_later_gets_a_fair_share_of_running_jobs(
    tmp_path: Path,
    long_emulator: Emulator,
    url: str,
    postgres_server: PgServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IT_PLAYMENT_KEY", API_KEY)
    config = shared_config(tmp_path, long_emulator, url)
    jobs = new_jobs(40, frames=1)
    harvested_by: dict[str, set[str]] = {"first": set(), "late": set()}

    def engine(store: PostgresStore, name: str) -> Engine:
        def note(job: Job) -> None:
            if job.state == JobState.HARVESTED:
                harvested_by[name].add(job.key)

        return Engine(config, store, burst=True, on_change=note)

    async with opened(url, postgres_server) as a, opened(url, postgres_server) as b:
        await a.add_jobs(jobs, now=1.0)
        first, late = engine(a, "first"), engine(b, "late")
        assert first.replica is not None and late.replica is not None
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first.run)
                while len(first.replica.held.get("playment", {})) < 40:  # noqa: ASYNC110
                    await anyio.sleep(0.1)
                # Every job is running and held by the first replica when the second joins.
                tg.start_soon(late.run)
                while len(late.replica.held.get("playment", {})) < 15:  # noqa: ASYNC110
                    await anyio.sleep(0.1)
                assert len(first.replica.held["playment"]) <= 25
                sample = first.metrics.registry.get_sample_value
                assert sample("harvester_replicas_live") == 2
                assert 0 < (sample("harvester_replica_lease_seconds_left") or 0) <= LEASE_S
                assert sample("harvester_replica_fair_share_jobs", {"provider": "playment"}) == 20
        handed_back = sample("harvester_replica_handed_back_jobs_total", {"provider": "playment"})
        assert handed_back is not None and handed_back >= 15
        assert (sample("harvester_replica_renewals_total", {"result": "ok"}) or 0) >= 2
        assert await a.counts() == {("playment", JobState.HARVESTED): 40}
    assert not (harvested_by["first"] & harvested_by["late"])
    assert len(harvested_by["late"]) >= 15, harvested_by
    created_once_and_output(config, long_emulator, jobs)


async def test_jobs_copied_from_sqlite_mid_run_finish_on_postgres_without_duplicates(
    tmp_path: Path,
    slow_emulator: Emulator,
    url: str,
    postgres_server: PgServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IT_PLAYMENT_KEY", API_KEY)
    single = make_config(tmp_path, slow_emulator)  # sqlite: one process
    shared = shared_config(tmp_path, slow_emulator, url)
    jobs = new_jobs(10, frames=1)
    assert single.store.path is not None
    async with SqliteStore(single.store.path) as old:
        await old.add_jobs(jobs, now=1.0)
        stop = anyio.Event()
        engine = Engine(single, old, burst=False, drain_grace_s=0.5)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: engine.run(stop=stop))
            with anyio.fail_after(20):
                # Created at the provider, not finished: the copy must carry remote ids.
                while await old.counts() != {("playment", JobState.RUNNING): 10}:  # noqa: ASYNC110
                    await anyio.sleep(0.1)
            stop.set()
        async with opened(url, postgres_server) as new:
            result = await copy_store(old, new, target_name=url)
            assert result.by_state == {("playment", JobState.RUNNING): 10}
            with anyio.fail_after(30):
                await Engine(shared, new, burst=True).run()
            assert await new.counts() == {("playment", JobState.HARVESTED): 10}
    created_once_and_output(shared, slow_emulator, jobs)


async def test_replicas_saving_their_durations_at_once_lose_none_and_learn_each_others(
    url: str, postgres_server: PgServer
) -> None:
    def learn(stats: DurationStats, *ds: float) -> None:
        life = stats.life("modzy")
        for d in ds:
            life.finished(life.alive(0, d / 2), d)

    async with opened(url, postgres_server) as a, opened(url, postgres_server) as b:
        mine = {
            "a": LearnedDurations(a, DurationStats()),
            "b": LearnedDurations(b, DurationStats()),
        }
        for rnd in range(5):  # five rounds of both saving at the same moment
            learn(mine["a"].stats, *[30.0 + rnd] * 3)
            learn(mine["b"].stats, *[300.0 + rnd] * 2)
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for one in mine.values():
                        tg.start_soon(one.save)
        value = await a.get_meta(DURATIONS_META)
        assert value is not None
        stored = DurationStats.from_bytes(value.encode()).life("modzy")
        assert stored.finished_count == 5 * (3 + 2)
        assert sum(stored.events[bin_of(30.0) : bin_of(34.0) + 1]) == 5 * 3
        assert sum(stored.events[bin_of(300.0) : bin_of(304.0) + 1]) == 5 * 2
        # with nothing new, a save still takes in what the other saved meanwhile
        for one in mine.values():
            await one.save(refresh=True)
            assert one.stats.life("modzy").events == stored.events
        assert await a.get_meta(DURATIONS_META) == value, "nothing new: nothing written"
        # a replica started now begins from all of it, and adds nothing by loading
        fresh = LearnedDurations(b, DurationStats())
        await fresh.load()
        await fresh.save()
        assert fresh.stats.life("modzy").finished_count == 25
        assert await a.get_meta(DURATIONS_META) == value
