"""``SharedStore``: several replicas on one job table, sharing work by leases.

Time is passed in (``now``), so expiry is tested without sleeping: a lease taken at ``NOW``
with ``lease_s=LEASE`` is live until ``NOW + LEASE`` and claimable after.
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
        await store.join(owner, lease_s=LEASE, now=NOW)
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
            jobs = await store.claim("playment", limit=7, now=NOW + 1)
            if not jobs:
                return
            got[name].extend(j.key for j in jobs)

    async with anyio.create_task_group() as tg:
        for name, store in (("a", a), ("b", b), ("c", c)):
            tg.start_soon(claim_all, name, store)
    claimed = got["a"] + got["b"] + got["c"]
    assert len(claimed) == len(set(claimed)) == 600, "each job exactly once"
    assert all(got.values()), f"every claimer got some: { {k: len(v) for k, v in got.items()} }"
    held = {name: (await s.renew(now=NOW + 2)).held for name, s in (("a", a), ("b", b), ("c", c))}
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
    first = await a.claim("playment", limit=2, now=NOW)
    assert [j.key for j in first] == ["j0000", "j0002"]
    rest = await a.claim("playment", limit=10, now=NOW)
    assert [j.key for j in rest] == ["j0003", "j0004"]
    assert await a.claim("playment", limit=10, now=NOW) == []
    assert [j.provider for j in await a.claim("cognite", limit=10, now=NOW)] == ["cognite"] * 2


async def test_a_live_lease_is_respected_and_an_expired_one_taken_over(replica: Replica) -> None:
    a, b = await replica("a"), await replica("b")
    await a.add_jobs(lines(10), now=NOW)
    mine = await a.claim("playment", limit=10, now=NOW)
    assert len(mine) == 10
    assert await b.claim("playment", limit=10, now=NOW + LEASE - 1) == []

    # a renews before the end: its jobs stay its own past the first deadline
    renewal = await a.renew(now=NOW + LEASE - 1)
    assert renewal.held == {("playment", j.key) for j in mine} and not renewal.lapsed
    assert await b.claim("playment", limit=10, now=NOW + LEASE + 1) == []

    # a stops renewing (it died, or hangs): after its lease b takes everything over
    later = NOW + 2 * LEASE
    taken = await b.claim("playment", limit=10, now=later)
    assert sorted(j.key for j in taken) == sorted(j.key for j in mine)
    assert taken == sorted(taken, key=lambda j: j.key)

    # a comes back: its renewal says the lease had lapsed, and it holds nothing now
    back = await a.renew(now=later + 1)
    assert back.lapsed and back.held == frozenset()


async def test_a_stale_owner_cannot_write_a_job_taken_over(replica: Replica) -> None:
    a, b = await replica("a"), await replica("b")
    await a.add_jobs(lines(1), now=NOW)
    (job,) = await a.claim("playment", limit=1, now=NOW)
    job = await a.transition(job, Event.SUBMIT, now=NOW, attempts=1)

    (taken,) = await b.claim("playment", limit=1, now=NOW + LEASE + 1)
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
    first, second = await a.claim("playment", limit=2, now=NOW)
    await a.transition(first, Event.GIVE_UP, now=NOW, reason="done with it")
    assert (await a.renew(now=NOW + 1)).held == {("playment", second.key)}
    assert await b.claim("playment", limit=5, now=NOW + 1) == [], "terminal: nobody claims it"


async def test_release_hands_jobs_over_at_once(replica: Replica) -> None:
    a, b = await replica("a"), await replica("b")
    await a.add_jobs(lines(4), now=NOW)
    jobs = await a.claim("playment", limit=4, now=NOW)
    assert await a.release("playment", [jobs[0].key, jobs[1].key]) == 2
    got = await b.claim("playment", limit=4, now=NOW + 1)
    assert [j.key for j in got] == [jobs[0].key, jobs[1].key]
    assert await a.release("playment", [jobs[0].key]) == 0, "b's job is not a's to release"
    assert (await b.renew(now=NOW + 2)).held == {("playment", j.key) for j in got}


async def test_leaving_releases_everything_and_stops_counting(replica: Replica) -> None:
    a, b, c = await replica("a"), await replica("b"), await replica("c")
    await a.add_jobs(lines(3), now=NOW)
    assert (await b.renew(now=NOW + 1)).live_replicas == 3
    await a.claim("playment", limit=3, now=NOW)
    await a.leave()
    assert len(await b.claim("playment", limit=3, now=NOW + 1)) == 3
    assert (await b.renew(now=NOW + 2)).live_replicas == 2
    # c stops renewing: once its lease runs out it is not counted any more
    assert (await b.renew(now=NOW + LEASE + 5)).live_replicas == 1
    await c.renew(now=NOW + LEASE + 6)
    assert (await b.renew(now=NOW + LEASE + 7)).live_replicas == 2


async def test_claiming_before_joining_is_refused(shared_backend: PostgresBackend) -> None:
    store = shared_backend.make_shared()
    await store.open()
    try:
        with pytest.raises(StoreError, match="not joined"):
            await store.claim("playment", limit=1, now=NOW)
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
