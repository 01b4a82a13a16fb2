"""Store.page (keyset paging) and the control columns of schema 3, on both stores."""

from __future__ import annotations

import time

import pytest

from harvester.control import retry_job
from harvester.errors import ControlError
from harvester.jobs import Event, JobState
from harvester.store.base import NewJob, Store

pytestmark = pytest.mark.anyio

N = 20_000


def new(i: int) -> NewJob:
    provider = "modzy" if i % 3 else "bentley"
    return NewJob(provider, f"j-{i:06d}", f"j-{i:06d}", None, {"x": i}, "t")


async def test_paging_walks_every_job_once_in_pages(store: Store) -> None:
    await store.add_jobs([new(i) for i in range(N)], now=1.0)
    seen: list[str] = []
    after, pages, slowest = 0, 0, 0.0
    while True:
        t0 = time.perf_counter()
        page = await store.page(provider="modzy", after=after, limit=1000)
        slowest = max(slowest, time.perf_counter() - t0)
        pages += 1
        assert len(page.jobs) <= 1000
        seen += [j.key for j in page.jobs]
        if page.next_after is None:
            break
        after = page.next_after
    expected = [f"j-{i:06d}" for i in range(N) if i % 3]
    assert seen == expected
    assert pages == -(-len(expected) // 1000)
    print(f"{N} jobs, {pages} pages, slowest page {slowest * 1000:.1f} ms")
    job = await store.get("bentley", "j-000000")
    assert job is not None
    job = await store.transition(job, Event.SUBMIT, now=5.0, attempts=1)
    only = await store.page(states=[JobState.SUBMITTING], since=4.0)
    assert [j.key for j in only.jobs] == ["j-000000"] and only.next_after is None
    assert (await store.page(states=[])).jobs == []


async def test_control_columns_survive_the_store(store: Store) -> None:
    await store.add_jobs([new(1)], now=1.0)
    job = await store.get("modzy", "j-000001")
    assert job is not None
    job = await store.transition(job, Event.SUBMIT, now=2.0, attempts=1)
    job = await store.transition(job, Event.ACCEPTED, now=3.0, remote_id="r-1")
    assert job.started_at == 3.0
    job = await store.transition(job, Event.CANCEL, now=4.0, reason="cancelled by user")
    stored = await store.get("modzy", "j-000001")
    assert stored == job and stored.cancelled_by == "user"
    with pytest.raises(ControlError, match="--resubmit"):
        await retry_job(store, job, resubmit=False, now=5.0)
    assert await store.get("modzy", "j-000001") == job
    again = await retry_job(store, job, resubmit=True, now=5.0)
    stored = await store.get("modzy", "j-000001")
    assert stored == again
    assert stored.past_remote_ids == ("r-1",) and stored.remote_id is None
    assert stored.state == JobState.NEW and stored.cancelled_by is None
