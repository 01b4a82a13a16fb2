"""The job row remembers that its provider status is not a documented one (schema 2), on
every backend, and a store written before that column existed is upgraded in place."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from harvester.jobs import Event, JobState
from harvester.store.base import NewJob, Store
from harvester.store.sqlite import _MIGRATIONS, SqliteStore

from .backends import Backend

pytestmark = pytest.mark.anyio

NOW = 1_700_000_000.0


def new(ref: str, provider: str = "playment") -> NewJob:
    return NewJob(provider, ref, ref, None, {"data": {"x": 1}}, f"jobs.jsonl:{ref}")


async def test_unknown_statuses_are_stored_and_counted(store: Store, backend: Backend) -> None:
    await store.add_jobs([new("a"), new("b"), new("c"), new("d", "cognite")], now=NOW)
    jobs = {}
    for key, provider in (
        ("a", "playment"),
        ("b", "playment"),
        ("c", "playment"),
        ("d", "cognite"),
    ):
        job = await store.get(provider, key)
        assert job is not None and job.status_unknown is False
        job = await store.transition(job, Event.SUBMIT, now=NOW + 1, attempts=1)
        jobs[key] = await store.transition(job, Event.ACCEPTED, now=NOW + 2, remote_id=f"r-{key}")
    assert await store.unknown_statuses() == {}
    for key, raw in (("a", "in_review"), ("b", "in_review"), ("c", "created"), ("d", "Paused")):
        jobs[key] = await store.update(
            jobs[key], now=NOW + 3, remote_status=raw, status_unknown=key != "c"
        )
    assert await store.unknown_statuses() == {
        ("playment", "in_review"): 2,
        ("cognite", "Paused"): 1,
    }
    # another process (or a restart) sees the flag
    again = backend.make()
    async with again:
        job = await again.get("playment", "a")
        assert job is not None and job.status_unknown is True
        assert (await again.get("playment", "c")).status_unknown is False  # type: ignore[union-attr]
    # a terminal job is no longer waiting on anything: not counted
    done = await store.transition(jobs["a"], Event.PROVIDER_FAILED, now=NOW + 4, reason="x")
    assert done.state == JobState.FAILED
    assert await store.unknown_statuses() == {
        ("playment", "in_review"): 1,
        ("cognite", "Paused"): 1,
    }


async def test_a_store_of_schema_1_is_upgraded_with_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for statement in _MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA application_id = 1213355603")  # "HRVS"
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO jobs (provider, key, reference_id, remote_id, state, remote_status,"
        " created_at, updated_at) VALUES ('playment', 'old-1', 'old-1', 'r-1', 'running',"
        " 'in_review', 1.0, 2.0)"
    )
    conn.commit()
    conn.close()
    async with SqliteStore(path) as store:
        job = await store.get("playment", "old-1")
        assert job is not None
        assert (job.remote_status, job.status_unknown) == ("in_review", False)
        await store.update(job, now=3.0, status_unknown=True)
        assert await store.unknown_statuses() == {("playment", "in_review"): 1}
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(_MIGRATIONS)
    conn.close()
