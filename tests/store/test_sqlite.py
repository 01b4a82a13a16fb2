"""What only the SQLite store promises: its file, schema versioning, group commit, locking."""

from __future__ import annotations

import os
import sqlite3
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from harvester.errors import StoreError, StoreUnavailable
from harvester.jobs import Event, Job, JobState
from harvester.store.sqlite import SCHEMA_VERSION, SqliteStore

from .test_store import NOW, new

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "deep" / "er" / "harvester.db"


@pytest.fixture
async def store(path: Path, anyio_backend: str) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(path, busy_timeout_s=5.0) as opened:
        yield opened


@contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    try:
        yield conn
    finally:
        conn.close()


async def submit(store: SqliteStore, job: Job) -> None:
    await store.transition(job, Event.SUBMIT, now=NOW)


async def add(store: SqliteStore, n: int) -> list[Job]:
    await store.add_jobs([new(f"scan-{i:04}") for i in range(n)], now=NOW)
    return await store.jobs()


# --- the file --------------------------------------------------------------------------------


async def test_the_file_and_its_settings(store: SqliteStore, path: Path) -> None:
    assert path.is_file(), "parent directories are created"  # noqa: ASYNC240
    with raw(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        indexes = {r[1]: r[2] for r in conn.execute("PRAGMA index_list(jobs)")}
        assert indexes["jobs_reference_id"] == 1 and indexes["jobs_remote_id"] == 1
        assert "jobs_state" in indexes


async def test_a_newer_schema_is_refused(path: Path, anyio_backend: str) -> None:
    async with SqliteStore(path):
        pass
    with raw(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer"):
        await SqliteStore(path).open()


async def test_another_programs_database_is_refused(path: Path, anyio_backend: str) -> None:
    path.parent.mkdir(parents=True)
    with raw(path) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER)")
    with pytest.raises(StoreError, match="not a job store"):
        await SqliteStore(path).open()
    with raw(path) as conn:
        conn.execute("PRAGMA application_id = 42")
    with pytest.raises(StoreError, match="another program"):
        await SqliteStore(path).open()


async def test_a_file_that_is_not_a_database(path: Path, anyio_backend: str) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not sqlite" * 100)  # noqa: ASYNC240
    with pytest.raises(StoreError, match="cannot open"):
        await SqliteStore(path).open()


def damage_page_of(path: Path, index: str) -> None:
    """Overwrite the root page of ``index`` with garbage: damage only a read of it meets."""
    with raw(path) as conn:
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (index,)
        ).fetchone()
        size = conn.execute("PRAGMA page_size").fetchone()[0]
    assert not Path(f"{path}-wal").exists(), "closed cleanly: every page is in the file"
    with open(path, "r+b") as fh:
        fh.seek((root - 1) * size)
        fh.write(bytes(range(256)) * (size // 256))


async def test_a_writer_refuses_a_damaged_file_a_reader_reads_it(
    path: Path, anyio_backend: str
) -> None:
    """Opening to write reads every page first (nothing is written into a damaged file); a
    read-only opener does not pay that read, and cannot write."""
    async with SqliteStore(path) as store:
        await add(store, 50)
    damage_page_of(path, "jobs_remote_id")  # no count or listing reads that index
    before = path.read_bytes()  # noqa: ASYNC240
    with pytest.raises(StoreError, match=r"the file is damaged: restore it from a backup"):
        await SqliteStore(path).open()
    async with SqliteStore(path, read_only=True) as reader:
        assert await reader.counts() == {("playment", JobState.NEW): 50}
        with pytest.raises(StoreUnavailable, match="readonly"):
            await reader.add_jobs([new("scan-9999")], now=NOW)
        with pytest.raises(StoreUnavailable, match="readonly"):
            await reader.set_meta("x", "y")
    assert path.read_bytes() == before, "the file is left as it was"  # noqa: ASYNC240


async def test_a_reader_checks_a_file_it_must_upgrade_first(path: Path, anyio_backend: str) -> None:
    """An upgrade in place is a write: a read-only opener of an older file checks it first."""
    async with SqliteStore(path) as store:
        await add(store, 50)
    with raw(path) as conn:
        conn.execute("DROP INDEX jobs_state")  # as schema 4 left it
        conn.execute("CREATE INDEX jobs_state ON jobs (state)")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    damage_page_of(path, "jobs_remote_id")
    with pytest.raises(StoreError, match=r"the file is damaged"):
        await SqliteStore(path, read_only=True).open()
    with raw(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION - 1


async def test_a_reader_upgrades_a_healthy_older_file(path: Path, anyio_backend: str) -> None:
    async with SqliteStore(path) as store:
        await add(store, 3)
    with raw(path) as conn:
        conn.execute("DROP INDEX jobs_state")
        conn.execute("CREATE INDEX jobs_state ON jobs (state)")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    async with SqliteStore(path, read_only=True) as reader:
        assert len(await reader.recent([JobState.NEW], limit=10)) == 3
    with raw(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_an_unusable_directory(tmp_path: Path, anyio_backend: str) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="cannot open"):
        await SqliteStore(tmp_path / "file" / "harvester.db").open()


def test_synchronous_is_checked(path: Path) -> None:
    SqliteStore(path, synchronous="FULL")
    with pytest.raises(ValueError):
        SqliteStore(path, synchronous="OFF")  # type: ignore[arg-type]


async def test_check_finds_shared_ids_once_the_unique_indexes_are_gone(
    store: SqliteStore, path: Path
) -> None:
    await add(store, 3)
    with raw(path) as conn:
        conn.execute("DROP INDEX jobs_reference_id")
        conn.execute("DROP INDEX jobs_remote_id")
        conn.execute("UPDATE jobs SET reference_id = 'scan-0000' WHERE key = 'scan-0001'")
        conn.execute("UPDATE jobs SET remote_id = 'r-1' WHERE key != 'scan-0000'")
    assert await store.check() == [
        "playment: reference id 'scan-0000' is shared by jobs scan-0000, scan-0001",
        "playment: remote id 'r-1' is shared by jobs scan-0001, scan-0002",
    ]


# --- lifecycle --------------------------------------------------------------------------------


async def test_lifecycle(path: Path, anyio_backend: str) -> None:
    store = SqliteStore(path)
    assert "unopened" in repr(store)
    with pytest.raises(StoreError, match="not open"):
        await store.get("playment", "x")
    await store.open()
    with pytest.raises(StoreError, match="already open"):
        await store.open()
    job = (await add(store, 1))[0]
    await store.close()
    await store.close()
    assert "closed" in repr(store)
    with pytest.raises(StoreError, match="closed"):
        await store.get("playment", "x")
    with pytest.raises(StoreError, match="closed"):
        await store.transition(job, Event.SUBMIT, now=NOW)
    with pytest.raises(StoreError, match="reopened"):
        await store.open()
    assert not path.with_name(path.name + "-wal").exists(), "the last close checkpoints the WAL"


async def test_close_commits_the_writes_already_asked_for(store: SqliteStore, path: Path) -> None:
    jobs = await add(store, 50)
    async with anyio.create_task_group() as tg:
        for job in jobs:
            tg.start_soon(submit, store, job)
        await anyio.lowlevel.checkpoint()  # every writer has queued its write
        await store.close()
    async with SqliteStore(path) as again:
        assert {j.state for j in await again.jobs()} == {JobState.SUBMITTING}


# --- group commit -------------------------------------------------------------------------------


async def test_concurrent_writes_share_commits(store: SqliteStore) -> None:
    jobs = await add(store, 300)
    commits = store.commits
    async with anyio.create_task_group() as tg:
        for job in jobs:
            tg.start_soon(submit, store, job)
    assert store.writes == 300
    assert store.commits - commits <= 3, store


async def test_writers_in_steady_state_keep_sharing_commits(store: SqliteStore) -> None:
    """Each of 100 tasks writes 6 times in a row: about one commit per round, not two."""
    jobs = await add(store, 100)
    commits = store.commits

    async def drive(job: Job) -> None:
        for event in (Event.SUBMIT, Event.ACCEPTED, Event.COMPLETED):
            job = await store.transition(job, event, now=NOW, remote_id=f"r-{job.key}")
        for event in (Event.HARVEST, Event.HARVEST_RETRY, Event.HARVEST):
            job = await store.transition(job, event, now=NOW)

    async with anyio.create_task_group() as tg:
        for job in jobs:
            tg.start_soon(drive, job)
    assert store.writes == 600
    assert store.commits - commits <= 8, store


async def test_a_writer_cancelled_before_its_commit_writes_nothing(
    store: SqliteStore, path: Path
) -> None:
    first, second = await add(store, 2)
    with raw(path) as lock:
        # Another process holds the write lock, so the first commit waits in busy_timeout.
        lock.execute("BEGIN IMMEDIATE")
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: store.transition(first, Event.SUBMIT, now=NOW))
            # Wait until the first commit has taken its batch and is waiting for the lock.
            while not (store._group and store._group._flushing and not store._group._pending):
                await anyio.lowlevel.checkpoint()
            with anyio.move_on_after(0.2) as scope:
                await store.transition(second, Event.SUBMIT, now=NOW)
            assert scope.cancelled_caught
            lock.execute("COMMIT")
    # Read back after close (which commits every write still queued) from a fresh instance.
    await store.close()
    async with SqliteStore(path) as again:
        stored_first = await again.get("playment", first.key)
        assert stored_first is not None and stored_first.state is JobState.SUBMITTING
        assert await again.get("playment", second.key) == second


async def test_a_lock_held_too_long_fails_the_batch_and_the_store_recovers(
    path: Path, anyio_backend: str
) -> None:
    async with SqliteStore(path, busy_timeout_s=0.2) as store:
        jobs = await add(store, 10)
        errors: list[StoreError] = []

        async def try_submit(job: Job) -> None:
            try:
                await store.transition(job, Event.SUBMIT, now=NOW)
            except StoreError as exc:
                errors.append(exc)

        with raw(path) as lock:
            lock.execute("BEGIN IMMEDIATE")
            async with anyio.create_task_group() as tg:
                for job in jobs:
                    tg.start_soon(try_submit, job)
            lock.execute("ROLLBACK")
        assert len(errors) == 10
        assert "another process held it" in str(errors[0]), errors[0]
        assert await store.jobs() == jobs, "nothing written"
        moved = await store.transition(jobs[0], Event.SUBMIT, now=NOW)
        assert await store.get("playment", jobs[0].key) == moved


# --- a real second process ------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys, anyio
    from pathlib import Path
    from harvester.store.sqlite import SqliteStore

    async def main() -> None:
        async with SqliteStore(Path(sys.argv[1])) as store:
            for job in await store.jobs():
                if job.key.endswith(("0", "2", "4", "6", "8")):
                    for i in range(20):
                        job = await store.update(job, now=1.0, progress=float(i))

    anyio.run(main)
    """
)


async def test_two_processes_write_the_same_file(store: SqliteStore, path: Path) -> None:
    jobs = await add(store, 20)
    mine = [j for j in jobs if not j.key.endswith(("0", "2", "4", "6", "8"))]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    async def write_mine() -> None:
        for job in mine:
            for i in range(20):
                job = await store.update(job, now=1.0, progress=float(i))

    async with anyio.create_task_group() as tg:
        tg.start_soon(write_mine)
        child = await anyio.run_process(
            [sys.executable, "-c", _CHILD, str(path)], env=env, check=False
        )
    assert child.returncode == 0, child.stderr.decode()
    assert {(j.version, j.progress) for j in await store.jobs()} == {(20, 19.0)}

    # Our copy of a job the child moved on is stale now: refused, nothing written.
    theirs = next(j for j in jobs if j not in mine)
    with pytest.raises(StoreError, match="changed by another process"):
        await store.transition(theirs, Event.GIVE_UP, now=NOW, reason="stale")
    stored = await store.get(theirs.provider, theirs.key)
    assert stored is not None and stored.state is JobState.NEW


async def test_closing_while_another_process_writes_does_not_fail(
    path: Path, anyio_backend: str
) -> None:
    """``harvester submit`` beside a running daemon: the jobs are added, and closing the store
    (``PRAGMA optimize``, a hint that may want to write statistics) meets the daemon's write
    lock. That must not turn a successful submit into a traceback and exit status 1 (CI saw it
    once: "database is locked" from close)."""
    async with SqliteStore(path, busy_timeout_s=5.0) as first:
        await add(first, 500)  # tables never analysed: optimize has statistics to write
    store = SqliteStore(path, busy_timeout_s=0.2)
    await store.open()
    await store.add_jobs([new(f"more-{i:04}") for i in range(500)], now=NOW)
    with raw(path) as lock:
        lock.execute("BEGIN IMMEDIATE")
        try:
            await store.close()
        finally:
            lock.execute("ROLLBACK")
    async with SqliteStore(path, busy_timeout_s=5.0, read_only=True) as reader:
        assert len(await reader.jobs()) == 1000
