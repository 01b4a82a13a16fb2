"""A job store written by schema 2 (before cancel/retry) opens under schema 4 (3: cancel/retry,
4: cancel requests across replicas) with every job intact: the new columns empty (but a
running job's start), the jobs pageable, cancellable and retryable; on sqlite and on
PostgreSQL. On sqlite, schema 5 adds updated_at to the state index (``Store.recent``), and
a schema-4 file gains it in place."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from harvester.control import retry_job
from harvester.emulator.server import Emulator
from harvester.engine import Engine
from harvester.jobs import Event, JobState
from harvester.store import postgres, queries
from harvester.store.base import Store
from harvester.store.sqlite import _APPLICATION_ID, _MIGRATIONS, SCHEMA_VERSION, SqliteStore
from tests.integration.test_all_providers import SECRETS, config, scenario

from .backends import PostgresBackend

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


#: a schema-2 row: (key, remote_id, state, reason, attempts)
ROWS = [
    ("run-1", "r-1", "running", None, 1),
    ("err-1", "r-2", "error", "harvest failed: disk full", 3),
    ("new-1", None, "new", None, 0),
    ("done-1", "r-3", "harvested", None, 1),
]


#: a row as schema 2 wrote it (status_unknown: its default), in either SQL dialect's "?" form
INSERT = (
    "INSERT INTO jobs (provider, key, reference_id, remote_id, payload, state,"
    " reason, attempts, created_at, updated_at)"
    " VALUES ('modzy', ?, ?, ?, ?, ?, ?, ?, 1.0, 2.0)"
)


def insert_params(
    rows: list[tuple[str, str | None, str, str | None, int]],
) -> list[tuple[Any, ...]]:
    return [
        (key, key, remote_id, orjson.dumps({"k": key}), state, reason, attempts)
        for key, remote_id, state, reason, attempts in rows
    ]


def schema_2_store(
    path: Path, rows: list[tuple[str, str | None, str, str | None, int]] = ROWS, version: int = 2
) -> None:
    """The file schema 2 (or ``version``) of harvester wrote (its migrations are append-only)."""
    conn = sqlite3.connect(path)
    try:
        conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
        for step in _MIGRATIONS[:version]:
            for statement in step:
                conn.execute(statement)
        for params in insert_params(rows):
            conn.execute(INSERT, params)
        conn.execute(f"PRAGMA user_version = {version}")
        conn.commit()
    finally:
        conn.close()


async def check_upgraded(store: Store) -> None:
    """The rows of ``ROWS``, as a schema-3 store reads them, still cancellable and retryable."""
    page = await store.page(provider="modzy", after=0, limit=10)
    got = {j.key: j for j in page.jobs}
    assert sorted(got) == sorted(r[0] for r in ROWS) and page.next_after is None
    for key, remote_id, state, reason, attempts in ROWS:
        job = got[key]
        assert (job.remote_id, job.state.value, job.reason, job.attempts) == (
            remote_id,
            state,
            reason,
            attempts,
        )
        assert job.cancelled_by is None and job.past_remote_ids == ()
        assert job.cancel_requested_at is None
        # a running job's deadline counts from its last change (updated_at, 2.0)
        assert job.started_at == (2.0 if state == "running" else None)
        assert job.remote_attempt == 1
        assert await store.load_payload(job) == {"k": key}
    # The new columns work on the old rows.
    again = await retry_job(store, got["err-1"], resubmit=False, now=3.0)
    assert again.state == JobState.RUNNING and again.remote_id == "r-2"
    cancelled = await store.transition(
        got["run-1"], Event.CANCEL, now=3.0, reason="cancelled by user"
    )
    assert (await store.get("modzy", "run-1")) == cancelled
    assert cancelled.cancelled_by == "user"
    resubmitted = await retry_job(store, cancelled, resubmit=True, now=4.0)
    assert resubmitted.past_remote_ids == ("r-1",) and resubmitted.remote_attempt == 2


async def test_a_schema_2_sqlite_store_upgrades_to_5(tmp_path: Path) -> None:
    assert SCHEMA_VERSION == 5  # this test is about exactly these steps
    path = tmp_path / "state.db"
    schema_2_store(path)
    async with SqliteStore(path) as store:
        await check_upgraded(store)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 5
        columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
        assert "cancel_requested_at" in columns
        assert sqlite_recent_plan(conn)
    finally:
        conn.close()


def sqlite_recent_plan(conn: sqlite3.Connection) -> bool:
    """The index ``jobs_state`` is (state, updated_at), and ``Store.recent`` can read it one
    state at a time: forced onto it (``INDEXED BY``), SQLite searches it by state. (Whether
    it prefers it unforced is its planner's choice from the file's statistics: on a tiny
    table it may sort instead.)"""
    assert [r[2] for r in conn.execute("PRAGMA index_info(jobs_state)")] == ["state", "updated_at"]
    p = SqliteStore._sql.params()
    sql = queries.recent_jobs(SqliteStore._sql, p, [JobState.ERROR, JobState.FAILED], 10)
    assert sql is not None and sql.count("FROM jobs WHERE") == 2
    forced = sql.replace("FROM jobs WHERE", "FROM jobs INDEXED BY jobs_state WHERE")
    plan = [str(row[-1]) for row in conn.execute(f"EXPLAIN QUERY PLAN {forced}", p.values)]
    searches = [step for step in plan if step.startswith("SEARCH jobs")]
    assert searches == ["SEARCH jobs USING INDEX jobs_state (state=?)"] * 2, plan
    return True


async def test_a_schema_4_sqlite_store_gains_updated_at_in_its_state_index(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    schema_2_store(path, version=4)
    conn = sqlite3.connect(path)
    try:
        assert [r[2] for r in conn.execute("PRAGMA index_info(jobs_state)")] == ["state"]
    finally:
        conn.close()
    async with SqliteStore(path) as store:
        (recent,) = await store.recent([JobState.ERROR], limit=5)
        assert recent.key == "err-1" and recent.reason == "harvest failed: disk full"
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 5
        assert sqlite_recent_plan(conn)
    finally:
        conn.close()


async def test_a_job_running_before_the_upgrade_still_times_out(tmp_path: Path) -> None:
    """Schema 2 kept no start time: without one, job_timeout_s would never end such a job."""
    async with Emulator(scenario()) as emu:
        cfg = config(tmp_path, emu, modzy={"job_timeout_s": 60})
        assert cfg.store.path is not None
        schema_2_store(cfg.store.path, [("run-1", "r-1", "running", None, 1)])
        async with SqliteStore(cfg.store.path) as store:
            with anyio.fail_after(30):
                await Engine(cfg, store, providers=["modzy"]).run()
            (job,) = await store.jobs()
    assert job.state == JobState.ERROR, job
    assert job.reason is not None and job.reason.startswith("timed out after")


def postgres_store_at(pg: PostgresBackend, version: int) -> None:
    """What schema ``version`` of harvester wrote, with ``ROWS``: its migrations
    (append-only) and their record."""
    pg.raw(
        "CREATE TABLE harvester_schema (version integer PRIMARY KEY,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for applied, step in enumerate(postgres._MIGRATIONS[:version], start=1):
        for statement in step:
            pg.raw(statement)
        pg.raw("INSERT INTO harvester_schema (version) VALUES (?)", (applied,))
    for params in insert_params(ROWS):
        pg.raw(INSERT, params)


async def test_a_schema_2_postgres_store_upgrades_to_4(shared_backend: PostgresBackend) -> None:
    assert postgres.SCHEMA_VERSION == 4
    pg = shared_backend
    postgres_store_at(pg, 2)
    store = pg.make()
    await store.open()
    try:
        await check_upgraded(store)
    finally:
        await store.close()
    applied = pg.raw("SELECT version FROM harvester_schema ORDER BY version")
    assert applied == [(1,), (2,), (3,), (4,)]
