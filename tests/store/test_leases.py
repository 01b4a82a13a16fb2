"""``SharedStore``: several replicas on one job table, sharing work by leases.

Lease times are the database's own (``now()``), never a replica's clock, so expiry is tested
without sleeping by moving a lease's end into the database's past (``expire``): exactly what
the other replicas would see once that replica had stopped renewing for ``LEASE`` seconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import pytest

from harvester.errors import StoreError
from harvester.jobs import Event, JobState
from harvester.store.base import NewJob, SharedStore

from .backends import PostgresBackend

pytestmark = pytest.mark.anyio

NOW = 1_700_000_000.0
LEASE = 30.0

Replica = Callable[[str], Awaitable[SharedStore]]


def expire(backend: PostgresBackend, owner: str) -> None:
    """``owner`` stopped renewing ``LEASE`` seconds ago, by the database's clock."""
    backend.raw(
        "UPDATE replicas SET lease_until = extract(epoch FROM now()) - 1 WHERE id = ?", (owner,)
    )


def seconds_left(backend: PostgresBackend, owner: str) -> float:
    ((left,),) = backend.raw(
        "SELECT lease_until - extract(epoch FROM now()) FROM replicas WHERE id = ?", (owner,)
    )
    return float(left)


def lines(n: int, provider: str = "playment") -> list[NewJob]:
    return [NewJob(provider, f"j{i:04}", f"j{i:04}", None, {"i": i}, f"t:{i}") for i in range(n)]


@pytest.fixture
async def replica(shared_backend: PostgresBackend) -> AsyncIterator[Replica]:
    """``await replica("a")``: an open store joined as replica "a" at NOW."""
    opened: list[SharedStore] = []

    async def make(owner: str) -> SharedStore:
        store = shared_backend.make_shared()
        await store.open()
        opened.append(store)
        await store.join(owner, lease_s=LEASE)
        return store

    yield make
    for store in opened:
        await store.close()


async def test_concurrent_claimers_never_get_the_same_job(replica: Replica) -> None:
    a, b, c = await replica("a"), await replica("b"), await replica("c")
    await a.add_jobs(lines(600), now=NOW)
    got: dict[str, list[str]] = {"a": [], "b": [], "c": []}

    async def claim_all(name: str, store: SharedStore) -> None:
        while True:
            jobs = await store.claim("playment", limit=7)
            if not jobs:
                return
            got[name].extend(j.key for j in jobs)

    async with anyio.create_task_group() as tg:
        for name, store in (("a", a), ("b", b), ("c", c)):
            tg.start_soon(claim_all, name, store)
    claimed = got["a"] + got["b"] + got["c"]
    assert len(claimed) == len(set(claimed)) == 600, "each job exactly once"
    assert all(got.values()), f"every claimer got some: { {k: len(v) for k, v in got.items()} }"
    held = {name: (await s.renew()).held for name, s in (("a", a), ("b", b), ("c", c))}
    assert held["a"] == {("playment", k) for k in got["a"]}


async def test_claims_are_oldest_first_per_provider_and_active_only(
    replica: Replica, shared_backend: PostgresBackend
) -> None:
    a = await replica("a")
    await a.add_jobs(lines(5) + lines(2, provider="cognite"), now=NOW)
    shared_backend.raw(
        "UPDATE jobs SET state = 'error', reason = 'x' WHERE key = 'j0001'"
        " AND provider = 'playment'"
    )
    first = await a.claim("playment", limit=2)
    assert [j.key for j in first] == ["j0000", "j0002"]
    rest = await a.claim("playment", limit=10)
    assert [j.key for j in rest] == ["j0003", "j0004"]
    assert await a.claim("playment", limit=10) == []
    assert [j.provider for j in await a.claim("cognite", limit=10)] == ["cognite"] * 2


async def test_a_live_lease_is_respected_and_an_expired_one_taken_over(
    replica: Replica, shared_backend: PostgresBackend
) -> None:
    a, b = await replica("a"), await replica("b")
    await a.add_jobs(lines(10), now=NOW)
    mine = await a.claim("playment", limit=10)
    assert len(mine) == 10
    assert await b.claim("playment", limit=10) == []

    # a renews before the end: its jobs stay its own past the first deadline
    renewal = await a.renew()
    assert renewal.held == {("playment", j.key) for j in mine} and not renewal.lapsed
    assert await b.claim("playment", limit=10) == []

    # a stops renewing (it died, or hangs): after its lease b takes everything over
    expire(shared_backend, "a")
    taken = await b.claim("playment", limit=10)
    assert sorted(j.key for j in taken) == sorted(j.key for j in mine)
    assert taken == sorted(taken, key=lambda j: j.key)

    # a comes back: its renewal says the lease had lapsed, and it holds nothing now
    back = await a.renew()
    assert back.lapsed and back.held == frozenset()


async def test_a_stale_owner_cannot_write_a_job_taken_over(
    replica: Replica, shared_backend: PostgresBackend
) -> None:
    a, b = await replica("a"), await replica("b")
    await a.add_jobs(lines(1), now=NOW)
    (job,) = await a.claim("playment", limit=1)
    job = await a.transition(job, Event.SUBMIT, now=NOW, attempts=1)
    expire(shared_backend, "a")

    (taken,) = await b.claim("playment", limit=1)
    assert taken == job, "the new owner resumes from the stored state"

    with pytest.raises(StoreError, match="held by replica b"):
        await a.transition(job, Event.ACCEPTED, now=NOW + LEASE + 2, remote_id="r-1")
    with pytest.raises(StoreError, match="held by replica b"):
        await a.update(job, now=NOW + LEASE + 2, reason="late")
    assert await a.get("playment", job.key) == job, "nothing written"

    running = await b.transition(taken, Event.FOUND_REMOTE, now=NOW + LEASE + 3, remote_id="r-1")
    assert running.state == JobState.RUNNING


async def test_a_joined_store_writes_only_jobs_it_holds(replica: Replica) -> None:
    a = await replica("a")
    await a.add_jobs(lines(1), now=NOW)
    job = await a.get("playment", "j0000")
    assert job is not None
    with pytest.raises(StoreError, match="held by no replica"):
        await a.transition(job, Event.SUBMIT, now=NOW)


async def test_finishing_a_job_gives_its_lease_up(replica: Replica) -> None:
    a, b = await replica("a"), await replica("b")
    await a.add_jobs(lines(2), now=NOW)
    first, second = await a.claim("playment", limit=2)
    await a.transition(first, Event.GIVE_UP, now=NOW, reason="done with it")
    assert (await a.renew()).held == {("playment", second.key)}
    assert await b.claim("playment", limit=5) == [], "terminal: nobody claims it"


async def test_release_hands_jobs_over_at_once(replica: Replica) -> None:
    a, b = await replica("a"), await replica("b")
    await a.add_jobs(lines(4), now=NOW)
    jobs = await a.claim("playment", limit=4)
    assert await a.release("playment", [jobs[0].key, jobs[1].key]) == 2
    got = await b.claim("playment", limit=4)
    assert [j.key for j in got] == [jobs[0].key, jobs[1].key]
    assert await a.release("playment", [jobs[0].key]) == 0, "b's job is not a's to release"
    assert (await b.renew()).held == {("playment", j.key) for j in got}


async def test_leaving_releases_everything_and_stops_counting(
    replica: Replica, shared_backend: PostgresBackend
) -> None:
    a, b, c = await replica("a"), await replica("b"), await replica("c")
    await a.add_jobs(lines(3), now=NOW)
    assert (await b.renew()).live_replicas == 3
    await a.claim("playment", limit=3)
    await a.leave()
    assert len(await b.claim("playment", limit=3)) == 3
    assert (await b.renew()).live_replicas == 2
    # c stops renewing: once its lease runs out it is not counted any more
    expire(shared_backend, "c")
    assert (await b.renew()).live_replicas == 1
    await c.renew()
    assert (await b.renew()).live_replicas == 2


async def test_lease_times_are_the_databases_whatever_the_callers_clock(
    replica: Replica, shared_backend: PostgresBackend
) -> None:
    # No lease method takes a time: joining and renewing start the lease at the database's
    # now(), and claims compare with it, so a replica's clock cannot move anybody's lease.
    a = await replica("a")
    assert LEASE - 5 < seconds_left(shared_backend, "a") <= LEASE
    expire(shared_backend, "a")
    renewal = await a.renew()
    assert renewal.lapsed, "the lease had run out by the database's clock"
    assert LEASE - 5 < seconds_left(shared_backend, "a") <= LEASE
    assert not (await a.renew()).lapsed
    ((heartbeats_are_db_time,),) = shared_backend.raw(
        "SELECT bool_and(abs(heartbeat_at - extract(epoch FROM now())) < 5) FROM replicas"
    )
    assert heartbeats_are_db_time


async def test_claiming_before_joining_is_refused(shared_backend: PostgresBackend) -> None:
    store = shared_backend.make_shared()
    await store.open()
    try:
        with pytest.raises(StoreError, match="not joined"):
            await store.claim("playment", limit=1)
    finally:
        await store.close()


async def test_add_meta_agrees_on_the_first_value(replica: Replica) -> None:
    stores = [await replica(name) for name in "abcd"]
    answers: list[str] = []

    async def race(store: SharedStore, value: str) -> None:
        answers.append(await store.add_meta("playment.batch.p", value))

    async with anyio.create_task_group() as tg:
        for i, store in enumerate(stores):
            tg.start_soon(race, store, f"batch-{i}")
    assert len(set(answers)) == 1
    assert await stores[0].get_meta("playment.batch.p") == answers[0]
    assert await stores[1].add_meta("playment.batch.p", "another") == answers[0]


async def test_replicas_lists_every_row_with_the_jobs_it_holds(
    replica: Replica, shared_backend: PostgresBackend
) -> None:
    a, b = await replica("a"), await replica("b")
    await a.add_jobs(lines(5), now=NOW)
    await a.claim("playment", limit=3)
    await b.claim("playment", limit=10)
    # a last renewed 7 s ago, by the database's clock; then b renews now.
    shared_backend.raw(
        "UPDATE replicas SET heartbeat_at = extract(epoch FROM now()) - 7 WHERE id = 'a'"
    )
    await b.renew()
    rows = {r.id: r for r in await a.replicas()}
    assert set(rows) == {"a", "b"}
    assert (rows["a"].held, rows["b"].held) == (3, 2)
    assert 7 <= rows["a"].heartbeat_ago_s < 7 + LEASE / 2
    assert 0 <= rows["b"].heartbeat_ago_s < LEASE / 2
    assert LEASE / 2 < rows["b"].lease_left_s <= LEASE
    assert rows["a"].host  # the host name the replica runs on
    expire(shared_backend, "a")
    assert next(r for r in await b.replicas() if r.id == "a").lease_left_s < 0
    await b.leave()
    assert [r.id for r in await a.replicas()] == ["a"]
