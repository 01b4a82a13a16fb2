"""What only the PostgreSQL store has: its schema table, its URL and password handling, the
transaction-id cursor of ``added_since``, and group commit over the network."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import asyncpg
import pytest

from harvester.config import parse_config
from harvester.errors import ConfigError, StoreError
from harvester.jobs import Event
from harvester.store import make_store
from harvester.store.base import NewJob
from harvester.store.postgres import SCHEMA_VERSION, PostgresStore, display_url

from .backends import PostgresBackend
from .pgserver import PgServer

pytestmark = pytest.mark.anyio

NOW = 1_700_000_000.0


def line(key: str, source: str = "t:1") -> NewJob:
    return NewJob("playment", key, key, None, {"k": key}, source)


@pytest.fixture
def pg(postgres_server: PgServer, postgres_database: str) -> PostgresBackend:
    return PostgresBackend(postgres_server, postgres_database)


@pytest.fixture
async def store(pg: PostgresBackend) -> AsyncIterator[PostgresStore]:
    opened = PostgresStore(pg.url, password=pg.server.password)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def test_the_schema_is_created_and_recorded_once(pg: PostgresBackend) -> None:
    for _ in range(2):
        async with PostgresStore(pg.url, password=pg.server.password):
            pass
    versions = pg.raw("SELECT version FROM harvester_schema ORDER BY version")
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]


async def test_replicas_opening_together_migrate_once(pg: PostgresBackend) -> None:
    stores = [PostgresStore(pg.url, password=pg.server.password) for _ in range(5)]
    async with anyio.create_task_group() as tg:
        for s in stores:
            tg.start_soon(s.open)
    for s in stores:
        await s.close()
    assert pg.raw("SELECT count(*) FROM harvester_schema") == [(SCHEMA_VERSION,)]


async def test_a_newer_schema_is_refused(pg: PostgresBackend, store: PostgresStore) -> None:
    pg.raw("INSERT INTO harvester_schema (version) VALUES (?)", (SCHEMA_VERSION + 7,))
    newer = PostgresStore(pg.url, password=pg.server.password)
    with pytest.raises(StoreError, match="newer than this harvester understands"):
        await newer.open()


async def test_another_programs_tables_are_left_alone(pg: PostgresBackend) -> None:
    pg.raw("CREATE TABLE jobs (id serial PRIMARY KEY, name text)")
    with pytest.raises(StoreError, match="not a harvester job store"):
        await PostgresStore(pg.url, password=pg.server.password).open()
    assert pg.raw("SELECT to_regclass('harvester_schema')") == [(None,)]


async def test_a_wrong_password_names_the_url_but_never_a_password(pg: PostgresBackend) -> None:
    wrong = "not-the-password-" + "x" * 8
    with pytest.raises(StoreError) as caught:
        await PostgresStore(pg.url, password=wrong).open()
    message = str(caught.value)
    assert "password authentication failed" in message
    assert pg.url.split("?")[0] in message
    assert wrong not in message and pg.server.password not in message
    assert wrong not in repr(PostgresStore(pg.url, password=wrong))


async def test_an_unreachable_server_is_a_store_error(postgres_server: PgServer) -> None:
    from .pgserver import free_port

    url = f"postgresql://harvester@127.0.0.1:{free_port()}/nowhere"
    with pytest.raises(StoreError, match=r"127\.0\.0\.1:\d+/nowhere: cannot open"):
        await PostgresStore(url, password="secret").open()


def test_display_url_drops_the_password() -> None:
    assert display_url("postgresql://h:s3cret@db:5432/x") == "postgresql://h@db:5432/x"
    assert display_url("postgresql://h@db/x") == "postgresql://h@db/x"
    assert "s3cret" not in display_url("postgresql://:s3cret@[::1]:5/x?a=b")


def test_config_selects_postgres_and_keeps_the_password_out_of_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "h.toml"
    monkeypatch.setenv("DB_PW", "from-the-environment")
    cfg = parse_config(
        {
            "store": {
                "url": "postgresql://harvester@db:5432/harvester",
                "password_env": "DB_PW",
                "lease_s": 12,
            }
        },
        source=source,
    )
    assert cfg.store.path is None and cfg.store.lease_s == 12.0
    assert "from-the-environment" not in repr(cfg.store)
    store = make_store(cfg.store)
    assert isinstance(store, PostgresStore)
    assert "from-the-environment" not in repr(store)

    with pytest.raises(ConfigError, match="must not contain a password"):
        parse_config({"store": {"url": "postgresql://h:pw@db/x"}}, source=source)
    with pytest.raises(ConfigError, match="lease_s must be >= 3"):
        parse_config({"store": {"url": "postgresql://h@db/x", "lease_s": 1}}, source=source)
    with pytest.raises(ConfigError, match="password is for postgresql"):
        parse_config({"store": {"url": "sqlite://x.db", "password_env": "DB_PW"}}, source=source)

    # The address may come from the environment too (a Kubernetes Secret), never a password.
    monkeypatch.setenv("DB_URL", "postgresql://harvester@db.svc:5432/h")
    cfg = parse_config({"store": {"url_env": "DB_URL", "password_env": "DB_PW"}}, source=source)
    assert cfg.store.url == "postgresql://harvester@db.svc:5432/h"
    with pytest.raises(ConfigError, match="excludes url"):
        parse_config({"store": {"url_env": "DB_URL", "url": "sqlite://x.db"}}, source=source)
    with pytest.raises(ConfigError, match="NOT_SET is not set"):
        parse_config({"store": {"url_env": "NOT_SET"}}, source=source)
    monkeypatch.setenv("DB_URL", "postgresql://harvester:hunter2@db.svc/h")
    with pytest.raises(ConfigError, match="must not contain a password") as caught:
        parse_config({"store": {"url_env": "DB_URL"}}, source=source)
    assert "hunter2" not in str(caught.value)


async def test_added_since_never_misses_a_row_committed_out_of_order(
    pg: PostgresBackend, store: PostgresStore
) -> None:
    # An insert that started first (older transaction, lower seq) commits last. A cursor on
    # seq would move past it while it was invisible and never report it.
    await store.add_jobs([line("before")], now=NOW)
    jobs, cursor = await store.added_since(0)
    assert [j.key for j in jobs] == ["before"]

    slow = await asyncpg.connect(pg.url, password=pg.server.password)
    try:
        tx = slow.transaction()
        await tx.start()
        await slow.execute(
            "INSERT INTO jobs (provider, key, reference_id, state, created_at, updated_at)"
            " VALUES ('playment', 'slow', 'slow', 'new', $1, $1)",
            NOW,
        )
        await store.add_jobs([line("fast")], now=NOW)
        jobs, cursor = await store.added_since(cursor)
        assert [j.key for j in jobs] == ["fast"]
        await tx.commit()
    finally:
        await slow.close()
    jobs, cursor = await store.added_since(cursor)
    assert "slow" in [j.key for j in jobs]
    jobs, again = await store.added_since(cursor)
    assert jobs == [] and again == cursor


async def test_concurrent_writes_share_commits(store: PostgresStore) -> None:
    await store.add_jobs([line(f"k{i:03}") for i in range(200)], now=NOW)
    jobs = await store.jobs()
    async with anyio.create_task_group() as tg:
        for job in jobs:
            tg.start_soon(lambda j: store.transition(j, Event.SUBMIT, now=NOW + 1), job)
    assert store.writes == 200
    assert store.commits < 20, f"{store.commits} commits for 200 concurrent writes"


async def test_two_processes_adding_the_same_new_job_at_once(pg: PostgresBackend) -> None:
    stores = [PostgresStore(pg.url, password=pg.server.password) for _ in range(4)]
    results = []
    try:
        for s in stores:
            await s.open()

        async def add(s: PostgresStore, i: int) -> None:
            results.append(await s.add_jobs([line("same", f"p{i}.jsonl:1")], now=NOW))

        async with anyio.create_task_group() as tg:
            for i, s in enumerate(stores):
                tg.start_soon(add, s, i)
    finally:
        for s in stores:
            await s.close()
    assert sorted(len(r.added) for r in results) == [0, 0, 0, 1]
    assert sorted(len(r.duplicates) for r in results) == [0, 1, 1, 1]
