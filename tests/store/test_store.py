"""The ``Store`` protocol, checked the same way on every backend (see conftest.BACKENDS)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from harvester.durations import DurationStats
from harvester.engine import DURATIONS_META
from harvester.errors import (
    IllegalTransition,
    JobsFileError,
    StaleWrite,
    StoreError,
    StoreUnavailable,
)
from harvester.jobs import ACTIVE, Event, Job, JobState, job_key
from harvester.store.base import AddResult, NewJob, Store

from .backends import Backend

pytestmark = pytest.mark.anyio

NOW = 1_700_000_000.0
PAYLOAD: Mapping[str, Any] = {
    "project_id": "p-1",
    "data": {
        "sensor": [{"name": "lidar", "frames": [1, 2, 3]}, {"name": "cam", "frames": []}],
        "label": "Straße, 日本語, 😀, \u00e9\u0301, \x00 nul",
        "weights": [0.5, 1.0, -2.25e-7],
        "big": 2**53 + 1,
        "flags": {"on": True, "off": False, "none": None},
    },
}


def new(
    reference_id: str | None = "scan-0001",
    *,
    provider: str = "playment",
    remote_id: str | None = None,
    payload: Mapping[str, Any] | None = PAYLOAD,
    source: str = "jobs.jsonl:1",
    key: str | None = None,
) -> NewJob:
    name = reference_id if reference_id is not None else remote_id
    assert name is not None
    return NewJob(
        provider=provider,
        key=key or job_key(name),
        reference_id=reference_id,
        remote_id=remote_id,
        payload=payload,
        source=source,
    )


def tracked(remote_id: str, *, provider: str = "cognite", source: str = "jobs.jsonl:1") -> NewJob:
    return new(None, provider=provider, remote_id=remote_id, payload=None, source=source)


async def add_one(store: Store, job: NewJob) -> Job:
    await store.add_jobs([job], now=NOW)
    got = await store.get(job.provider, job.key)
    assert got is not None
    return got


async def reopened(backend: Backend) -> Store:
    other = backend.make()
    await other.open()
    return other


# --- adding jobs ---------------------------------------------------------------------------


async def test_add_then_get(store: Store) -> None:
    result = await store.add_jobs([new("scan-0001"), tracked("123")], now=NOW)
    assert result == AddResult(added=("playment/scan-0001", "cognite/123"), duplicates=())

    job = await store.get("playment", "scan-0001")
    assert job == Job(
        provider="playment",
        key="scan-0001",
        reference_id="scan-0001",
        remote_id=None,
        state=JobState.NEW,
        created_at=NOW,
        updated_at=NOW,
    )
    track = await store.get("cognite", "123")
    assert track is not None
    assert (track.remote_id, track.reference_id, track.state) == ("123", None, JobState.NEW)
    assert await store.get("playment", "nope") is None
    assert await store.get("cognite", "scan-0001") is None


async def test_adding_nothing(store: Store) -> None:
    assert await store.add_jobs([], now=NOW) == AddResult(added=(), duplicates=())


async def test_the_same_job_again_is_a_duplicate(store: Store) -> None:
    await store.add_jobs([new("scan-0001"), tracked("123")], now=NOW)
    # Key order inside the payload is not a difference.
    reordered = dict(reversed(list(PAYLOAD.items())))
    again = [new("scan-0001", payload=reordered, source="more.jsonl:7"), tracked("123")]
    result = await store.add_jobs(again, now=NOW + 60)
    assert result == AddResult(added=(), duplicates=("playment/scan-0001", "cognite/123"))
    job = await store.get("playment", "scan-0001")
    assert job is not None and job.created_at == NOW


async def test_a_job_repeated_within_one_batch_counts_once(store: Store) -> None:
    await store.add_jobs([new("old")], now=NOW)
    batch = [new("a"), new("a", source="jobs.jsonl:2"), new("old"), new("old"), new("a")]
    result = await store.add_jobs(batch, now=NOW)
    assert result == AddResult(added=("playment/a",), duplicates=("playment/old",))


@pytest.mark.parametrize(
    ("first", "second", "words"),
    [
        pytest.param(new("r1"), new("r1", payload={"other": 1}), "payload", id="payload"),
        pytest.param(new("r1"), new("r1", payload=None), "payload", id="payload-vs-none"),
        pytest.param(
            new("r1", payload={"n": 1}), new("r1", payload={"n": 1.0}), "payload", id="1-vs-1.0"
        ),
        pytest.param(
            new("r1", payload={"n": 1}), new("r1", payload={"n": True}), "payload", id="1-vs-true"
        ),
        pytest.param(new("r1"), new("r1", remote_id="77"), "job id", id="remote-id"),
        pytest.param(
            new("r1"), new("other", key="r1"), "reference id", id="same-key-other-reference"
        ),
        pytest.param(new("r1"), new("r1", key="r1-b"), "reference id 'r1'", id="reference-taken"),
        pytest.param(
            tracked("123", provider="playment"),
            new("scan-9", remote_id="123"),
            "job id '123'",
            id="remote-id-taken",
        ),
    ],
)
async def test_a_conflict_rolls_back_the_whole_batch(
    store: Store, first: NewJob, second: NewJob, words: str
) -> None:
    await store.add_jobs([first], now=NOW)
    before = await store.jobs()
    batch = [
        new("fresh-1", source="batch.jsonl:1"),
        dataclasses.replace(second, source="batch.jsonl:2"),
        new("fresh-2", source="batch.jsonl:3"),
    ]
    with pytest.raises(JobsFileError) as caught:
        await store.add_jobs(batch, now=NOW + 1)
    message = str(caught.value)
    assert message.startswith("batch.jsonl:2: "), message
    assert f"{first.provider}/{first.key}" in message, "names the existing job"
    assert words in message
    assert await store.jobs() == before
    assert await store.get("playment", "fresh-1") is None
    assert await store.get("playment", "fresh-2") is None


async def test_a_conflict_within_one_batch_names_both_lines(store: Store) -> None:
    batch = [
        new("a", source="jobs.jsonl:1"),
        new("b", source="jobs.jsonl:2"),
        new("a", payload={"x": 2}, source="jobs.jsonl:3"),
    ]
    with pytest.raises(JobsFileError) as caught:
        await store.add_jobs(batch, now=NOW)
    assert str(caught.value).startswith("jobs.jsonl:3: playment/a conflicts with")
    assert "jobs.jsonl:1" in str(caught.value)
    assert await store.jobs() == []


async def test_a_payload_that_is_not_json_is_refused(store: Store) -> None:
    batch = [new("ok"), new("bad", payload={"frames": {1, 2}}, source="jobs.jsonl:2")]
    with pytest.raises(JobsFileError, match=r"^jobs.jsonl:2: payload"):
        await store.add_jobs(batch, now=NOW)
    assert await store.jobs() == []


async def test_an_unsafe_key_is_refused(store: Store) -> None:
    with pytest.raises(JobsFileError, match=r"^jobs.jsonl:4: '\.\./x'"):
        await store.add_jobs([new("../x", key="../x", source="jobs.jsonl:4")], now=NOW)
    assert await store.jobs() == []


async def test_payload_round_trip(store: Store) -> None:
    job = await add_one(store, new("scan-0001"))
    assert await store.load_payload(job) == PAYLOAD
    track = await add_one(store, tracked("123"))
    assert await store.load_payload(track) is None


async def test_payload_of_an_unknown_job(store: Store) -> None:
    job = await add_one(store, new("scan-0001"))
    with pytest.raises(StoreError):
        await store.load_payload(dataclasses.replace(job, key="missing"))


# --- transitions -----------------------------------------------------------------------------


async def test_transition_is_persisted(store: Store, backend: Backend) -> None:
    job = await add_one(store, new("scan-0001"))
    submitting = await store.transition(job, Event.SUBMIT, now=NOW + 1, attempts=1)
    running = await store.transition(submitting, Event.ACCEPTED, now=NOW + 2, remote_id="r-1")
    assert (running.state, running.version, running.attempts) == (JobState.RUNNING, 2, 1)
    await store.close()

    again = await reopened(backend)
    try:
        assert await again.get("playment", "scan-0001") == running
        assert await again.load_payload(running) == PAYLOAD
    finally:
        await again.close()


async def test_update_is_persisted(store: Store, backend: Backend) -> None:
    job = await add_one(store, tracked("123"))
    running = await store.transition(job, Event.TRACK, now=NOW + 1)
    polled = await store.update(
        running, now=NOW + 2, progress=37.5, remote_status="Processing", due_at=NOW + 32
    )
    assert (polled.state, polled.version) == (JobState.RUNNING, 2)
    other = await reopened(backend)
    try:
        assert await other.get("cognite", "123") == polled
    finally:
        await other.close()


async def test_a_stale_version_is_refused_and_nothing_is_written(store: Store) -> None:
    job = await add_one(store, new("scan-0001"))
    submitted = await store.transition(job, Event.SUBMIT, now=NOW + 1, attempts=1)
    with pytest.raises(StoreError, match="changed"):
        await store.transition(job, Event.GIVE_UP, now=NOW + 2, reason="stale")
    with pytest.raises(StoreError, match="changed"):
        await store.update(job, now=NOW + 2, progress=99.0)
    assert await store.get("playment", "scan-0001") == submitted


async def test_a_lost_write_is_told_apart_from_a_store_that_cannot_be_used(
    backend: Backend, anyio_backend: str
) -> None:
    """Both are StoreErrors; a stale write is StaleWrite (the store is fine), a closed store
    StoreUnavailable (nothing could be written)."""
    store = backend.make()
    await store.open()
    try:
        job = await add_one(store, new("scan-0001"))
        await store.transition(job, Event.SUBMIT, now=NOW + 1, attempts=1)
        with pytest.raises(StaleWrite, match="changed") as stale:
            await store.update(job, now=NOW + 2, progress=99.0)
        assert not isinstance(stale.value, StoreUnavailable)
    finally:
        await store.close()
    with pytest.raises(StoreUnavailable, match="closed") as closed:
        await store.get("playment", "scan-0001")
    assert not isinstance(closed.value, StaleWrite)


async def test_writing_a_job_that_is_not_stored(store: Store) -> None:
    job = await add_one(store, new("scan-0001"))
    ghost = dataclasses.replace(job, key="ghost")
    with pytest.raises(StoreError):
        await store.transition(ghost, Event.SUBMIT, now=NOW)
    assert await store.get("playment", "ghost") is None


async def test_an_illegal_transition_writes_nothing(store: Store) -> None:
    job = await add_one(store, new("scan-0001"))
    with pytest.raises(IllegalTransition):
        await store.transition(job, Event.COMPLETED, now=NOW + 1)
    with pytest.raises(ValueError, match="remote_id"):
        await store.transition(job, Event.TRACK, now=NOW + 1)
    assert await store.get("playment", "scan-0001") == job


async def test_a_remote_id_already_taken_is_refused(store: Store) -> None:
    await store.add_jobs([new("a"), new("b")], now=NOW)
    a, b = await store.jobs()
    a = await store.transition(
        await store.transition(a, Event.SUBMIT, now=NOW), Event.ACCEPTED, now=NOW, remote_id="r-1"
    )
    b = await store.transition(b, Event.SUBMIT, now=NOW)
    with pytest.raises(StoreError, match="r-1"):
        await store.transition(b, Event.ACCEPTED, now=NOW, remote_id="r-1")
    assert await store.get("playment", "b") == b


async def test_500_concurrent_transitions_are_all_persisted(store: Store, backend: Backend) -> None:
    await store.add_jobs(
        [new(f"scan-{i:04}", source=f"jobs.jsonl:{i}") for i in range(500)], now=NOW
    )
    jobs = await store.jobs()
    results: dict[str, Job] = {}

    async def submit(job: Job) -> None:
        results[job.key] = await store.transition(job, Event.SUBMIT, now=NOW + 1, attempts=1)

    async with anyio.create_task_group() as tg:
        for job in jobs:
            tg.start_soon(submit, job)
    assert len(results) == 500
    await store.close()

    again = await reopened(backend)
    try:
        stored = await again.jobs()
        assert {j.key: j for j in stored} == results
        assert {(j.state, j.version, j.attempts) for j in stored} == {(JobState.SUBMITTING, 1, 1)}
    finally:
        await again.close()


async def test_a_stale_write_does_not_fail_the_others_committed_with_it(store: Store) -> None:
    await store.add_jobs([new(f"scan-{i:03}") for i in range(100)], now=NOW)
    jobs = await store.jobs()
    won: list[Job] = []
    lost: list[StoreError] = []

    async def submit(job: Job) -> None:
        try:
            won.append(await store.transition(job, Event.SUBMIT, now=NOW + 1))
        except StoreError as exc:
            lost.append(exc)

    async with anyio.create_task_group() as tg:
        for job in jobs:
            # Two writers race from the same version: exactly one of each pair may win.
            tg.start_soon(submit, job)
            tg.start_soon(submit, job)
    assert (len(won), len(lost)) == (100, 100)
    assert sorted(won, key=lambda j: j.key) == await store.jobs()


# --- queries --------------------------------------------------------------------------------


async def setup_mixed(store: Store) -> dict[str, Job]:
    """Jobs of two providers in several states; created in name order, one second apart."""
    for i, (ref, provider) in enumerate(
        [("p1", "playment"), ("p2", "playment"), ("c1", "cognite"), ("p3", "playment")]
    ):
        await store.add_jobs([new(ref, provider=provider)], now=NOW + i)
    jobs = {j.key: j for j in await store.jobs()}
    p2 = await store.transition(jobs["p2"], Event.SUBMIT, now=NOW + 10)
    jobs["p2"] = await store.transition(p2, Event.ACCEPTED, now=NOW + 11, remote_id="r2")
    jobs["p3"] = await store.transition(jobs["p3"], Event.GIVE_UP, now=NOW + 12, reason="bad")
    return jobs


async def test_jobs_filters_and_order(store: Store) -> None:
    jobs = await setup_mixed(store)
    keys = [j.key for j in await store.jobs()]
    assert keys == ["p1", "p2", "c1", "p3"], "oldest first"
    assert [j.key for j in await store.jobs(provider="playment")] == ["p1", "p2", "p3"]
    assert [j.key for j in await store.jobs(states=[JobState.RUNNING])] == ["p2"]
    new_states = [JobState.NEW, JobState.ERROR]
    assert [j.key for j in await store.jobs(provider="playment", states=new_states)] == [
        "p1",
        "p3",
    ]
    assert await store.jobs(provider="modzy") == []
    assert await store.jobs(states=[]) == []
    assert (await store.jobs(states=[JobState.ERROR]))[0] == jobs["p3"]


async def test_active(store: Store) -> None:
    await setup_mixed(store)
    assert [j.key for j in await store.active()] == ["p1", "p2", "c1"]
    assert [j.key for j in await store.active("playment")] == ["p1", "p2"]
    assert [j.key for j in await store.active("bentley")] == []
    assert all(j.state in ACTIVE for j in await store.active())


async def test_counts(store: Store) -> None:
    await setup_mixed(store)
    assert await store.counts() == {
        ("playment", JobState.NEW): 1,
        ("playment", JobState.RUNNING): 1,
        ("playment", JobState.ERROR): 1,
        ("cognite", JobState.NEW): 1,
    }


async def test_meta(store: Store, backend: Backend) -> None:
    assert await store.get_meta("bentley.batch") is None
    await store.set_meta("bentley.batch", "b-1")
    await store.set_meta("bentley.batch", "b-2")
    await store.set_meta("unicode", "ünï 😀")
    assert await store.get_meta("bentley.batch") == "b-2"
    other = await reopened(backend)
    try:
        assert await other.get_meta("unicode") == "ünï 😀"
    finally:
        await other.close()


async def test_learned_durations_are_kept_in_meta(store: Store, backend: Backend) -> None:
    """The poll scheduler's tables (issue 18) survive a reopen, on either dialect."""
    stats = DurationStats()
    life = stats.life("playment")
    for d in (40.0, 55.0, 3600.0, 86400.0 * 2):
        life.finished(life.alive(0, d / 2), d)
    await store.set_meta(DURATIONS_META, stats.to_bytes().decode())
    other = await reopened(backend)
    try:
        value = await other.get_meta(DURATIONS_META)
    finally:
        await other.close()
    assert value is not None
    assert DurationStats.from_bytes(value.encode()).to_bytes() == stats.to_bytes()


async def test_update_meta_is_one_read_modify_write_that_loses_no_concurrent_update(
    store: Store, backend: Backend
) -> None:
    """Two store objects (two processes) incrementing one value at once: every increment
    counts. What learned durations are merged with (``engine.learned``), on either dialect."""
    other = await reopened(backend)
    seen: list[str | None] = []

    def bump(value: str | None) -> str:
        seen.append(value)
        return str(int(value or "0") + 1)

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(16):
                    tg.start_soon(store.update_meta if i % 2 else other.update_meta, "n", bump)
        assert await store.get_meta("n") == await other.get_meta("n") == "16"
        # the first saw nothing stored (not a placeholder), every other a distinct count
        assert sorted(seen, key=lambda v: -1 if v is None else int(v)) == [None] + [
            str(i) for i in range(1, 16)
        ]

        def broken(value: str | None) -> str:
            raise ValueError("no")

        with pytest.raises(ValueError, match="no"):
            await other.update_meta("n", broken)
        with pytest.raises(ValueError, match="no"):
            await other.update_meta("fresh", broken)
        assert await store.get_meta("n") == "16", "a failed update stores nothing"
        assert await store.get_meta("fresh") is None
        assert await store.update_meta("fresh", bump) == "1"
    finally:
        await other.close()


# --- integrity ------------------------------------------------------------------------------


async def test_check_on_a_healthy_store(store: Store) -> None:
    assert await store.check() == []
    await setup_mixed(store)
    assert await store.check() == []


@pytest.mark.parametrize(
    ("statement", "problem"),
    [
        (
            "UPDATE jobs SET state = 'exploded' WHERE key = 'p1'",
            "playment/p1: state 'exploded' is not a job state",
        ),
        (
            "UPDATE jobs SET remote_id = NULL WHERE key = 'p2'",
            "playment/p2: running without a remote id",
        ),
        (
            "UPDATE jobs SET reason = NULL WHERE key = 'p3'",
            "playment/p3: error without a reason",
        ),
        (
            "UPDATE jobs SET state = 'harvested', remote_id = 'r1' WHERE key = 'c1'",
            "cognite/c1: harvested without an output directory",
        ),
        (
            "UPDATE jobs SET version = -1 WHERE key = 'p1'",
            "playment/p1: negative version -1",
        ),
        (
            "UPDATE jobs SET attempts = -2 WHERE key = 'p1'",
            "playment/p1: negative attempt count -2",
        ),
        (
            "UPDATE jobs SET key = '../../etc' WHERE key = 'p1'",
            "playment/../../etc: key is not a safe",
        ),
    ],
)
async def test_check_finds_a_corrupted_row(
    store: Store, backend: Backend, statement: str, problem: str
) -> None:
    await setup_mixed(store)
    backend.raw(statement)
    problems = await store.check()
    assert len(problems) == 1, problems
    assert problems[0].startswith(problem), problems


async def test_check_finds_a_row_inserted_behind_the_stores_back(
    store: Store, backend: Backend
) -> None:
    await setup_mixed(store)
    backend.raw(
        "INSERT INTO jobs (provider, key, reference_id, remote_id, state, reason, attempts,"
        " created_at, updated_at, version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ("playment", ".sneaky", None, None, "failed", None, 0, NOW, NOW, 0),
    )
    problems = await store.check()
    assert any(p.startswith("playment/.sneaky: failed without a reason") for p in problems)
    assert any(p.startswith("playment/.sneaky: key is not a safe") for p in problems)
    assert any(p.startswith("playment/.sneaky: neither a reference id") for p in problems)


async def test_reading_an_unknown_state_is_a_store_error(store: Store, backend: Backend) -> None:
    await setup_mixed(store)
    backend.raw("UPDATE jobs SET state = 'exploded' WHERE key = 'p1'")
    with pytest.raises(StoreError, match="exploded"):
        await store.get("playment", "p1")
    with pytest.raises(StoreError, match="exploded"):
        await store.counts()
    assert await store.get("playment", "p2") is not None


# --- two processes on one table ----------------------------------------------------------------


async def test_one_instance_adds_while_another_reads(store: Store, backend: Backend) -> None:
    reader = await reopened(backend)
    seen: list[int] = []
    try:

        async def add_batches() -> None:
            for b in range(20):
                batch = [new(f"b{b:02}-{i:02}", source=f"submit.jsonl:{i}") for i in range(25)]
                await store.add_jobs(batch, now=NOW + b)
                await anyio.lowlevel.checkpoint()

        async def read_until_all_seen() -> None:
            with anyio.fail_after(30):
                while not seen or seen[-1] < 500:
                    seen.append(len(await reader.jobs()))
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(add_batches)
            tg.start_soon(read_until_all_seen)

        assert seen == sorted(seen), "a reader never sees jobs disappear"
        assert all(n % 25 == 0 for n in seen), "a reader never sees half a batch"

        # The reader moves a job on; the writer's copy is now stale and must be refused.
        first = (await reader.jobs())[0]
        moved = await reader.transition(first, Event.SUBMIT, now=NOW + 100)
        with pytest.raises(StoreError, match="changed"):
            await store.transition(first, Event.GIVE_UP, now=NOW + 101, reason="x")
        assert await store.get(first.provider, first.key) == moved
    finally:
        await reader.close()


@pytest.mark.anyio
async def test_readding_a_submitted_line_after_it_got_a_remote_id_is_a_duplicate(
    store: Store,
) -> None:
    line = NewJob("playment", "scan-1", "scan-1", None, {"data": {"a": 1}}, "j.jsonl:1")
    await store.add_jobs([line], now=1.0)
    job = await store.get("playment", "scan-1")
    assert job is not None
    job = await store.transition(job, Event.SUBMIT, now=2.0)
    await store.transition(job, Event.ACCEPTED, now=3.0, remote_id="remote-9")
    again = await store.add_jobs([line], now=4.0)
    assert again.added == () and again.duplicates == ("playment/scan-1",)
    other = NewJob("playment", "scan-1", "scan-1", "remote-10", None, "j.jsonl:2")
    with pytest.raises(JobsFileError, match=r"j\.jsonl:2"):
        await store.add_jobs([other], now=5.0)


@pytest.mark.anyio
async def test_added_since_reports_only_new_active_jobs(store: Store) -> None:
    first = [NewJob("playment", f"k{i}", f"k{i}", None, {"data": {"i": i}}, "t") for i in range(3)]
    await store.add_jobs(first, now=1.0)
    jobs, cursor = await store.added_since(0)
    assert [j.key for j in jobs] == ["k0", "k1", "k2"]
    again, same = await store.added_since(cursor)
    assert again == [] and same == cursor
    done = await store.get("playment", "k1")
    assert done is not None
    await store.transition(done, Event.GIVE_UP, now=2.0, reason="x")
    more = [NewJob("playment", "k3", "k3", None, {"data": {}}, "t")]
    await store.add_jobs(more, now=3.0)
    jobs, later = await store.added_since(cursor)
    assert [j.key for j in jobs] == ["k3"] and later > cursor
    everything, _ = await store.added_since(0)
    assert [j.key for j in everything] == ["k0", "k2", "k3"]


async def test_recent_lists_the_newest_changes_first_and_no_more_than_asked(store: Store) -> None:
    await store.add_jobs([new(f"r-{i}") for i in range(6)], now=NOW)
    # r-0 .. r-4 end in error one after the other; r-5 stays new.
    for i in range(5):
        job = await store.get("playment", f"r-{i}")
        assert job is not None
        await store.transition(job, Event.GIVE_UP, now=NOW + 10 + i, reason=f"reason {i}")
    recent = await store.recent([JobState.ERROR, JobState.FAILED], limit=3)
    assert [(j.key, j.reason) for j in recent] == [
        ("r-4", "reason 4"),
        ("r-3", "reason 3"),
        ("r-2", "reason 2"),
    ]
    assert [j.key for j in await store.recent([JobState.NEW], limit=10)] == ["r-5"]
    assert await store.recent([JobState.FAILED], limit=10) == []
    assert await store.recent([], limit=10) == []
    assert await store.recent([JobState.ERROR], limit=0) == []


async def test_recent_merges_states_newest_first_and_ties_by_the_later_added(
    store: Store,
) -> None:
    """One read per state, merged: the order is the one a single sort of all would give."""
    await store.add_jobs([new(f"m-{i}") for i in range(5)], now=NOW)
    ends = [(0, 30.0, "error"), (1, 20.0, "failed"), (2, 30.0, "failed"), (3, 40.0, "error")]
    for i, at, how in ends:
        job = await store.get("playment", f"m-{i}")
        assert job is not None
        if how == "failed":
            job = await store.transition(job, Event.SUBMIT, now=NOW)
            job = await store.transition(job, Event.ACCEPTED, now=NOW, remote_id=f"r-{i}")
            await store.transition(job, Event.PROVIDER_FAILED, now=NOW + at, reason="no")
        else:
            await store.transition(job, Event.GIVE_UP, now=NOW + at, reason="no")
    both = [JobState.FAILED, JobState.ERROR]
    # m-3 newest; m-0 and m-2 changed at once: the one added later first
    assert [j.key for j in await store.recent(both, limit=10)] == ["m-3", "m-2", "m-0", "m-1"]
    assert [j.key for j in await store.recent(both, limit=2)] == ["m-3", "m-2"]
    assert [j.key for j in await store.recent([JobState.FAILED, JobState.FAILED], limit=5)] == [
        "m-2",
        "m-1",
    ]
