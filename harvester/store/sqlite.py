"""The embedded job table: SQLite in WAL mode behind one connection.

What a store does (row format, key rules, the add-jobs walk, integrity rules, lifecycle, group
commit) is ``core``'s and its helpers'; this file holds SQLite's SQL and I/O. Its rules:
- sqlite3 blocks, so every call runs in a worker thread, and a ``CapacityLimiter(1)`` per
  store lets only one run at a time. This process therefore has exactly one writer and never
  uses the connection from two threads at once, which is why ``check_same_thread=False`` is safe.
- Other processes may open the same file (``harvester submit`` next to ``harvester run``).
  SQLite's file locks and ``busy_timeout`` serialise the writers. Every job write is
  conditional on the row's ``version``, so a job changed elsewhere is refused rather than
  overwritten. WAL needs shared memory, so the file must be on a local filesystem, not NFS.
- The program owns the schema: ``PRAGMA user_version`` counts the ``_MIGRATIONS`` applied,
  and ``PRAGMA application_id`` marks the file as ours.
- A damaged file is refused before anything is written into it (see ``_Db.quick_check``).
- ``sqlite3.Error`` becomes ``StoreError`` in one place each for the writer's thread
  (``SqliteStore._call``) and the event loop's point reads (``SqliteStore._read``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import anyio.to_thread

from harvester.errors import StoreError, StoreUnavailable
from harvester.jobs import ACTIVE, Job, JobState
from harvester.store import integrity, queries, schema
from harvester.store.base import AddResult, DumpedJob, JobRef, NewJob, not_empty_error
from harvester.store.core import StoreCore
from harvester.store.rows import (
    ID_COLUMNS,
    JOB_COLUMN_NAMES,
    JOB_COLUMNS,
    SELECT_JOBS,
    WRITTEN_COLUMNS,
    decode_payload,
    job_from_row,
    job_row,
    parse_state,
    refused_write,
    taken_id_problem,
    written_values,
)
from harvester.store.walk import walk

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

_T = TypeVar("_T")

#: "HRVS": tells our files apart from any other SQLite database a path might point at
_APPLICATION_ID = 0x48525653

# Each entry upgrades the schema by one version (``schema``: append only).
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE jobs (
            provider      TEXT    NOT NULL,
            key           TEXT    NOT NULL,
            reference_id  TEXT,
            remote_id     TEXT,
            payload       BLOB,
            state         TEXT    NOT NULL,
            remote_status TEXT,
            progress      REAL,
            reason        TEXT,
            attempts      INTEGER NOT NULL DEFAULT 0,
            due_at        REAL,
            output        TEXT,
            created_at    REAL    NOT NULL,
            updated_at    REAL    NOT NULL,
            version       INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (provider, key)
        )""",
        """CREATE UNIQUE INDEX jobs_reference_id ON jobs (provider, reference_id)
            WHERE reference_id IS NOT NULL""",
        """CREATE UNIQUE INDEX jobs_remote_id ON jobs (provider, remote_id)
            WHERE remote_id IS NOT NULL""",
        "CREATE INDEX jobs_state ON jobs (state)",
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    *schema.later_steps(schema.SQLITE),
    # 5: the status page's recent failures (``Store.recent``) read the newest rows of a few
    # states, not every row of the table. The index on state gains updated_at rather than a
    # second index beside it: one index to keep up per write, as before (measured: a second
    # one costs ~7% CPU per write, a partial one ~30%). PostgreSQL has no such step: there an
    # index on updated_at would make every poll's write a non-HOT update (postgres.py).
    ("DROP INDEX jobs_state", "CREATE INDEX jobs_state ON jobs (state, updated_at)"),
)
SCHEMA_VERSION = len(_MIGRATIONS)

_INTEGRITY = integrity.rules("rowid", "group_concat(key, ', ')")

_INSERT_JOB = (
    "INSERT INTO jobs (provider, key, reference_id, remote_id, payload, state, created_at,"
    " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPDATE_JOB = (
    f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in WRITTEN_COLUMNS)}"
    " WHERE provider = ? AND key = ? AND version = ?"
)


def _placeholders(n: int) -> str:
    return ", ".join("?" * n)


def _damaged(exc: BaseException) -> str:
    """What to do about a file SQLite finds damaged (truncated, overwritten): not a retry."""
    if getattr(exc, "sqlite_errorname", "").startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return _DAMAGED_HINT
    return ""


_DAMAGED_HINT = " (the file is damaged: restore it from a backup)"


class _Db:
    """The synchronous half: one connection, only ever called from the store's worker thread."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.read_only = False

    @classmethod
    def connect(cls, path: Path, busy_timeout_s: float, synchronous: str, read_only: bool) -> _Db:
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: sqlite3 must not open transactions behind our back; every
        # transaction here is an explicit BEGIN so its extent is visible in the code.
        conn = sqlite3.connect(
            path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{path}: cannot use WAL journaling (got {mode!r})")
            # In WAL mode NORMAL syncs at checkpoints, not at every commit. A commit still
            # survives the process dying (kill -9, OOM, container restart) and the file is
            # never corrupted, but a power loss or kernel crash may drop the last commits.
            # FULL (one fsync per group commit) closes that window for those who need it.
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
            db = cls(conn)
            if not read_only or db._pragma("user_version") != SCHEMA_VERSION:
                db.quick_check(path)  # before anything is written: an upgrade is a write
            db.migrate(path)
            if read_only:
                conn.execute("PRAGMA query_only = ON")
                db.read_only = True
        except BaseException:
            conn.close()
            raise
        return db

    @classmethod
    def connect_reader(cls, path: Path, busy_timeout_s: float) -> _Db:
        """A read-only connection for point reads made on the event loop itself.

        In WAL mode a reader neither waits for the writer nor holds it up, and a point read
        by primary key takes microseconds: cheaper inline than a hand-off to the store's
        thread, where every poll's read would queue behind the group commits (measured: a
        ~19 ms wait per read with 64 workers, capping polls at ~2.5k/s). Each statement reads
        the latest commit, so "persisted before acted on" still holds.
        """
        conn = sqlite3.connect(
            path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            conn.execute("PRAGMA query_only = ON")
        except BaseException:
            conn.close()
            raise
        db = cls(conn)
        db.read_only = True
        return db

    @contextmanager
    def transaction(self, kind: str = "IMMEDIATE") -> Iterator[None]:
        # IMMEDIATE takes the write lock up front, where busy_timeout waits for it. A
        # deferred transaction that reads first and upgrades later can instead fail at once
        # with SQLITE_BUSY when another process committed in between.
        self.conn.execute(f"BEGIN {kind}")
        try:
            yield
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                # A failing ROLLBACK must not hide the error that made it necessary.
                with suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
            raise

    def migrate(self, path: Path) -> None:
        if self._pragma("user_version") == SCHEMA_VERSION:
            self._check_application_id(path)
            return
        with self.transaction():
            # Read again under the write lock: another process may have migrated meanwhile.
            current = self._pragma("user_version")
            self._check_application_id(path)
            steps = schema.steps_to_apply(_MIGRATIONS, current, str(path))
            if current == 0:
                tables = self.conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
                ).fetchone()[0]
                if tables:
                    raise StoreError(f"{path}: is an SQLite database but not a job store")
                self.conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
            for step in steps:
                for statement in step:
                    self.conn.execute(statement)
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def quick_check(self, path: Path) -> None:
        """Refuse a file overwritten in part before anybody writes into it or works from it.

        SQLite itself refuses a file cut short or not a database at all when it reads the
        header (at open); a page overwritten with garbage, though, surfaces only when that
        page is read, after the process may already have written (a damaged free-page list
        lets a write overwrite live rows) or sent something. Reads the whole file once (about
        a second per GB, ~200 ms per 100k jobs), so it runs for an opener that will write;
        a read-only one (``harvester status``, job listings) is told of a damaged page by
        the read that meets it, as one clear error."""
        try:
            found = self.conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            found = str(exc)
        if found != "ok":
            detail = " ".join(str(found).split())[:200]  # one line, however SQLite words it
            raise StoreError(f"{path}: {detail}{_DAMAGED_HINT}")

    def _check_application_id(self, path: Path) -> None:
        app_id = self._pragma("application_id")
        if app_id not in (0, _APPLICATION_ID):
            raise StoreError(f"{path}: is an SQLite database of another program")

    def _pragma(self, name: str) -> int:
        return int(self.conn.execute(f"PRAGMA {name}").fetchone()[0])

    def close(self) -> None:
        try:
            if not self.read_only:
                self.conn.execute("PRAGMA optimize")
        except sqlite3.OperationalError:
            # optimize is a hint that may want to write statistics: beside another writer (a
            # daemon, when `submit` closes) it can meet a lock, and the next close retries it
            pass
        finally:
            self.conn.close()

    # --- jobs -----------------------------------------------------------------------------

    def add_jobs(self, jobs: Sequence[NewJob], now: float) -> AddResult:
        with self.transaction():
            walked = walk(jobs, self._find_row, self._find_holder)
            new = JobState.NEW.value
            self.conn.executemany(_INSERT_JOB, ((*row, new, now, now) for row in walked.inserts))
        return walked.result

    def _find_row(self, provider: str, key: str) -> Any:
        return self.conn.execute(
            "SELECT reference_id, remote_id, payload, state FROM jobs"
            " WHERE provider = ? AND key = ?",
            (provider, key),
        ).fetchone()

    def _find_holder(self, column: str, provider: str, value: str) -> Any:
        return self.conn.execute(
            f"SELECT key, state FROM jobs WHERE provider = ? AND {column} = ?",
            (provider, value),
        ).fetchone()

    def write_jobs(self, writes: Sequence[tuple[Job, int]]) -> list[str | None]:
        """Write each job whose row is still at its base version, all in one transaction.

        Returns one problem per write (None: written). A single UPDATE is atomic on its own:
        one that matches no row or breaks a constraint leaves nothing behind and the
        transaction goes on, so one stale write never costs the others theirs.
        """
        problems: list[str | None] = []
        if not writes:  # every writer of the batch was cancelled before it was taken
            return problems
        with self.transaction():
            for job, base_version in writes:
                try:
                    cursor = self.conn.execute(
                        _UPDATE_JOB,
                        (*written_values(job), job.provider, job.key, base_version),
                    )
                except sqlite3.IntegrityError as exc:
                    problems.append(self._taken_id_problem(job, exc))
                    continue
                except (sqlite3.InterfaceError, sqlite3.ProgrammingError) as exc:
                    problems.append(f"cannot store this job: {exc}")
                    continue
                problems.append(None if cursor.rowcount == 1 else self._stale(job, base_version))
        return problems

    def _stale(self, job: Job, base_version: int) -> str:
        row = self.conn.execute(
            "SELECT version FROM jobs WHERE provider = ? AND key = ?", (job.provider, job.key)
        ).fetchone()
        return refused_write(base_version, None if row is None else (row[0], None), None)

    def _taken_id_problem(self, job: Job, exc: sqlite3.IntegrityError) -> str:
        holders = {}
        for column, _ in ID_COLUMNS:
            row = self.conn.execute(
                f"SELECT key FROM jobs WHERE provider = ? AND {column} = ? AND key != ?",
                (job.provider, getattr(job, column), job.key),
            ).fetchone()
            holders[column] = None if row is None else row[0]
        return taken_id_problem(job, holders, exc)

    def get(self, provider: str, key: str) -> Job | None:
        row = self.conn.execute(
            f"{SELECT_JOBS} WHERE provider = ? AND key = ?", (provider, key)
        ).fetchone()
        return None if row is None else job_from_row(row)

    def load_payload(self, provider: str, key: str) -> Mapping[str, Any] | None:
        row = self.conn.execute(
            "SELECT payload FROM jobs WHERE provider = ? AND key = ?", (provider, key)
        ).fetchone()
        return decode_payload(f"{provider}/{key}", row)

    def added_since(self, cursor: int) -> tuple[list[JobRef], int]:
        # Rows enter the table only through add_jobs and are never deleted, so rowids only
        # grow and a rowid cursor sees every new row. One statement: one snapshot, so a row
        # committed meanwhile is either in this answer or after its cursor.
        # Rows are read one by one, and only the columns a JobRef needs: a list of every
        # row of a 100,000-job table would be tens of MB the process keeps as fragmentation.
        rows = self.conn.execute(
            "SELECT rowid, provider, key, state FROM jobs WHERE rowid > ? ORDER BY rowid",
            (cursor,),
        )
        top = cursor
        refs: list[JobRef] = []
        for rowid, provider, key, state in rows:
            top = rowid
            job_state = parse_state(provider, key, state)
            if job_state in ACTIVE:
                refs.append(JobRef(provider, key, job_state))
        return refs, int(top)

    # --- meta and integrity ---------------------------------------------------------------

    def get_meta(self, name: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, name: str, value: str) -> None:
        with self.transaction():
            self.conn.execute(
                "INSERT INTO meta (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )

    def update_meta(self, name: str, update: Callable[[str | None], str]) -> str:
        with self.transaction():  # IMMEDIATE: the write lock is held from the read on
            row = self.conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
            value = update(None if row is None else str(row[0]))
            self.conn.execute(
                "INSERT INTO meta (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )
        return value

    def dump(self) -> tuple[list[DumpedJob], dict[str, str]]:
        with self.transaction("DEFERRED"):  # one snapshot for both tables
            rows = self.conn.execute(
                f"SELECT {JOB_COLUMNS}, payload FROM jobs ORDER BY created_at, rowid"
            ).fetchall()
            meta = dict(self.conn.execute("SELECT name, value FROM meta").fetchall())
        return [(job_from_row(row[:-1]), row[-1]) for row in rows], meta

    def restore(self, jobs: Sequence[DumpedJob], meta: Mapping[str, str], where: str) -> None:
        with self.transaction():
            (n_jobs,) = self.conn.execute("SELECT count(*) FROM jobs").fetchone()
            (n_meta,) = self.conn.execute("SELECT count(*) FROM meta").fetchone()
            if n_jobs or n_meta:
                raise not_empty_error(where, n_jobs, n_meta)
            self.conn.executemany(
                f"INSERT INTO jobs ({JOB_COLUMNS}, payload)"
                f" VALUES ({_placeholders(len(JOB_COLUMN_NAMES) + 1)})",
                ((*job_row(job), payload) for job, payload in jobs),
            )
            self.conn.executemany("INSERT INTO meta (name, value) VALUES (?, ?)", meta.items())

    def check(self) -> list[str]:
        problems: list[str] = []
        # DEFERRED: a read-only snapshot, so every query below sees the same rows.
        with self.transaction("DEFERRED"):
            rows = [str(r[0]) for r in self.conn.execute("PRAGMA integrity_check")]
            if rows != ["ok"]:
                problems.extend(f"sqlite integrity check: {r}" for r in rows)
            for rule in _INTEGRITY:
                problems += rule.problems(self.conn.execute(rule.sql))
        return problems


class SqliteStore(StoreCore):
    """The ``Store`` protocol on one SQLite file (see the module docstring).

    ``read_only``: this opener only reads (``harvester status``, listings). Its connection
    refuses writes, and opening skips the page check ``_Db.quick_check`` (a file of an older
    schema is still checked, then upgraded).
    """

    _sql = queries.Dialect(numbered=False, order="rowid")

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_s: float = 10.0,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        read_only: bool = False,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', not {synchronous!r}")
        super().__init__(str(path))
        self._path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._synchronous = synchronous
        self._read_only = read_only
        self._db: _Db | None = None
        self._reader: _Db | None = None  #: read-only, used on the event loop (point reads)
        # Made in _connect(): anyio primitives belong to the event loop that runs them.
        self._limiter: anyio.CapacityLimiter | None = None

    @property
    def path(self) -> Path:
        return self._path

    # --- lifecycle ------------------------------------------------------------------------

    async def _connect(self) -> None:
        self._limiter = anyio.CapacityLimiter(1)
        try:
            self._db = await anyio.to_thread.run_sync(
                _Db.connect,
                self._path,
                self._busy_timeout_s,
                self._synchronous,
                self._read_only,
                limiter=self._limiter,
            )
            self._reader = _Db.connect_reader(self._path, self._busy_timeout_s)
        except (sqlite3.Error, OSError) as exc:
            with anyio.CancelScope(shield=True):
                await self._disconnect()
            raise StoreUnavailable(
                f"{self._path}: cannot open the job store: {exc}{_damaged(exc)}"
            ) from exc

    async def _disconnect(self) -> None:
        db, self._db = self._db, None
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        if db is not None:
            await anyio.to_thread.run_sync(db.close, limiter=self._limiter)

    async def _call(self, fn: Callable[[_Db], _T]) -> _T:
        """Run ``fn`` on the connection in the store's thread; the one sqlite3 -> StoreError map."""
        self._require_open()
        assert self._db is not None
        try:
            return await anyio.to_thread.run_sync(fn, self._db, limiter=self._limiter)
        except sqlite3.Error as exc:
            hint = _damaged(exc)
            if getattr(exc, "sqlite_errorname", "") == "SQLITE_BUSY":
                hint = f" (another process held it longer than {self._busy_timeout_s:g} s)"
            raise StoreUnavailable(f"{self._path}: {exc}{hint}") from exc

    def _read(self, fn: Callable[[_Db], _T]) -> _T:
        self._require_open()
        assert self._reader is not None
        try:
            return fn(self._reader)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self._path}: {exc}{_damaged(exc)}") from exc

    async def _fetch(
        self, sql: str, params: Sequence[Any], convert: Callable[[tuple[Any, ...]], _T]
    ) -> list[_T]:
        return await self._call(lambda db: [convert(r) for r in db.conn.execute(sql, params)])

    # --- jobs -----------------------------------------------------------------------------

    async def _add(self, jobs: Sequence[NewJob], now: float) -> AddResult:
        return await self._call(lambda db: db.add_jobs(jobs, now))

    async def get(self, provider: str, key: str) -> Job | None:
        return self._read(lambda db: db.get(provider, key))

    async def load_payload(self, job: Job) -> Mapping[str, Any] | None:
        return self._read(lambda db: db.load_payload(job.provider, job.key))

    async def added_since(self, cursor: int) -> tuple[list[JobRef], int]:
        return await self._call(lambda db: db.added_since(cursor))

    async def get_meta(self, name: str) -> str | None:
        return await self._call(lambda db: db.get_meta(name))

    async def set_meta(self, name: str, value: str) -> None:
        await self._call(lambda db: db.set_meta(name, value))

    async def update_meta(self, name: str, update: Callable[[str | None], str]) -> str:
        return await self._call(lambda db: db.update_meta(name, update))

    async def check(self) -> list[str]:
        return await self._call(_Db.check)

    async def dump(self) -> tuple[list[DumpedJob], dict[str, str]]:
        return await self._call(_Db.dump)

    async def restore(self, jobs: Sequence[DumpedJob], meta: Mapping[str, str]) -> None:
        await self._call(lambda db: db.restore(jobs, meta, str(self._path)))

    async def _write_batch(self, writes: Sequence[tuple[Job, int]]) -> list[str | None]:
        return await self._call(lambda db: db.write_jobs(writes))
