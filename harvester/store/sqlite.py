"""The embedded job table: SQLite in WAL mode behind one connection.

Rules of this file:
- sqlite3 blocks, so every call runs in a worker thread, and a ``CapacityLimiter(1)`` per
  store lets only one run at a time. This process therefore has exactly one writer and never
  uses the connection from two threads at once, which is why ``check_same_thread=False`` is safe.
- Other processes may open the same file (``harvester submit`` next to ``harvester run``).
  SQLite's file locks and ``busy_timeout`` serialise the writers. Every job write is
  conditional on the row's ``version``, so a job changed elsewhere is refused rather than
  overwritten. WAL needs shared memory, so the file must be on a local filesystem, not NFS.
- Job writes (``transition``/``update``) are group-committed. Writes that arrive while a
  commit is running go into the next transaction together, so 200 concurrent pollers cost one
  commit per batch instead of 200. Each caller still returns only once its own write is
  committed.
- The program owns the schema: ``PRAGMA user_version`` counts the ``_MIGRATIONS`` applied,
  and ``PRAGMA application_id`` marks the file as ours.
- ``sqlite3.Error`` becomes ``StoreError`` in one place, ``SqliteStore._call``.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
import orjson

from harvester.errors import JobsFileError, StoreError, StoreUnavailable
from harvester.jobs import ACTIVE, Event, Job, JobState, apply, update
from harvester.store.base import (
    MOVED_META,
    AddResult,
    DumpedJob,
    JobPage,
    JobRef,
    NewJob,
    decode_past_ids,
    encode_past_ids,
    moved_error,
    not_empty_error,
)
from harvester.store.groupcommit import GroupCommit

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

_T = TypeVar("_T")

#: "HRVS": tells our files apart from any other SQLite database a path might point at
_APPLICATION_ID = 0x48525653

# Each entry upgrades the schema by one version. Append only: a released entry never changes,
# because files written by older versions replay the list from where they stopped.
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
    # 2: a status the provider does not document, so `harvester status` can name it
    ("ALTER TABLE jobs ADD COLUMN status_unknown INTEGER NOT NULL DEFAULT 0",),
    # 3: control (harvester cancel / retry / job_timeout_s): who cancelled, the remote ids of
    # earlier remote attempts (a JSON array), and when the current attempt started
    (
        "ALTER TABLE jobs ADD COLUMN cancelled_by TEXT",
        "ALTER TABLE jobs ADD COLUMN past_remote_ids TEXT",
        "ALTER TABLE jobs ADD COLUMN started_at REAL",
        # Jobs already running have no start on record; their last change is the best bound
        # we have (never earlier than the start), or job_timeout_s would never end them.
        "UPDATE jobs SET started_at = updated_at WHERE state = 'running'",
    ),
    # 4: a cancel asked of a job another replica holds (kept by the row, never by a write)
    ("ALTER TABLE jobs ADD COLUMN cancel_requested_at REAL",),
)
SCHEMA_VERSION = len(_MIGRATIONS)

# The order of ``Job``'s constructor, so a row becomes a Job without a dict in between.
_JOB_COLUMNS = (
    "provider, key, reference_id, remote_id, state, created_at, updated_at, remote_status,"
    " progress, reason, attempts, due_at, output, version, status_unknown, cancelled_by,"
    " past_remote_ids, started_at, cancel_requested_at"
)
_SELECT_JOBS = f"SELECT {_JOB_COLUMNS} FROM jobs"
_ORDER = " ORDER BY created_at, rowid"
_INSERT_JOB = (
    "INSERT INTO jobs (provider, key, reference_id, remote_id, payload, state, created_at,"
    " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPDATE_JOB = (
    "UPDATE jobs SET reference_id = ?, remote_id = ?, state = ?, remote_status = ?,"
    " progress = ?, reason = ?, attempts = ?, due_at = ?, output = ?, updated_at = ?,"
    " version = ?, status_unknown = ?, cancelled_by = ?, past_remote_ids = ?, started_at = ?"
    " WHERE provider = ? AND key = ? AND version = ?"
)

_SAFE_KEY = re.compile(r"[A-Za-z0-9._+-]{1,120}")
_NEED_REMOTE_ID = ("running", "succeeded", "harvesting", "harvested")
_NEED_REASON = ("failed", "cancelled", "error")


def _job_from_row(row: tuple[Any, ...]) -> Job:
    (provider, key, reference_id, remote_id, state, created_at, updated_at, remote_status,
     progress, reason, attempts, due_at, output, version, unknown, cancelled_by, past,
     started_at, cancel_requested_at) = row  # fmt: skip
    return Job(
        provider,
        key,
        reference_id,
        remote_id,
        _state(provider, key, state),
        created_at,
        updated_at,
        remote_status,
        progress,
        reason,
        attempts,
        due_at,
        output,
        version,
        bool(unknown),  # sqlite keeps it as 0/1
        cancelled_by,
        decode_past_ids(past),
        started_at,
        cancel_requested_at,
    )


_N_JOB_COLUMNS = len(_JOB_COLUMNS.split(","))


def _job_row(job: Job) -> tuple[Any, ...]:
    """``job`` in the order of ``_JOB_COLUMNS``, the inverse of ``_job_from_row``."""
    return (
        job.provider,
        job.key,
        job.reference_id,
        job.remote_id,
        job.state.value,
        job.created_at,
        job.updated_at,
        job.remote_status,
        job.progress,
        job.reason,
        job.attempts,
        job.due_at,
        job.output,
        job.version,
        job.status_unknown,
        job.cancelled_by,
        encode_past_ids(job.past_remote_ids),
        job.started_at,
        job.cancel_requested_at,
    )


def _state(provider: str, key: str, state: str) -> JobState:
    try:
        return JobState(state)
    except ValueError:
        raise StoreError(
            f"stored state {state!r} is not a job state", job=f"{provider}/{key}"
        ) from None


def _describe(provider: str, key: str, state: str, sources: Mapping[tuple[str, str], str]) -> str:
    """Name an existing job for a conflict message: the line that added it, or the store."""
    source = sources.get((provider, key))
    if source is not None:
        return f"{provider}/{key} from {source}"
    return f"the stored job {provider}/{key} (state {state})"


def _placeholders(n: int) -> str:
    return ", ".join("?" * n)


def _encode_payload(payload: Mapping[str, Any] | None, source: str) -> bytes | None:
    if payload is None:
        return None
    try:
        # ``default`` covers read-only mappings (MappingProxyType) that orjson refuses.
        return orjson.dumps(payload, default=_plain_mapping)
    except orjson.JSONEncodeError as exc:
        raise JobsFileError(f"{source}: payload cannot be stored as JSON: {exc}") from exc


def _plain_mapping(obj: object) -> dict[Any, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON")


def _same_payload(stored: bytes | None, new: bytes | None) -> bool:
    # Stored bytes keep the line's key order; "the same payload" must not depend on it, but
    # must still tell 1 from 1.0 and true from 1, which comparing Python values would not.
    if stored is None or new is None:
        return stored is new
    if stored == new:
        return True
    canonical = orjson.OPT_SORT_KEYS
    return orjson.dumps(orjson.loads(stored), option=canonical) == orjson.dumps(
        orjson.loads(new), option=canonical
    )


def _damaged(exc: BaseException) -> str:
    """What to do about a file SQLite finds damaged (truncated, overwritten): not a retry."""
    if getattr(exc, "sqlite_errorname", "").startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return _damaged_hint()
    return ""


def _damaged_hint() -> str:
    return " (the file is damaged: restore it from a backup)"


class _Db:
    """The synchronous half: one connection, only ever called from the store's worker thread."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    @classmethod
    def connect(cls, path: Path, busy_timeout_s: float, synchronous: str) -> _Db:
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
            db.migrate(path)
            db.quick_check(path)
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
        return cls(conn)

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
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"{path}: job store schema version {current} is newer than this"
                    f" harvester understands ({SCHEMA_VERSION}); upgrade harvester"
                )
            if current == 0:
                tables = self.conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
                ).fetchone()[0]
                if tables:
                    raise StoreError(f"{path}: is an SQLite database but not a job store")
                self.conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
            for step in _MIGRATIONS[current:]:
                for statement in step:
                    self.conn.execute(statement)
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def quick_check(self, path: Path) -> None:
        """Refuse a file cut short or overwritten before anybody works from it: a damaged
        page otherwise surfaces only when some job's row is read, after the process may
        already have written (or sent) something. Reads the whole file once (about a
        second per GB), at open only."""
        try:
            found = self.conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            found = str(exc)
        if found != "ok":
            detail = " ".join(str(found).split())[:200]  # one line, however SQLite words it
            raise StoreError(f"{path}: {detail}{_damaged_hint()}")

    def _check_application_id(self, path: Path) -> None:
        app_id = self._pragma("application_id")
        if app_id not in (0, _APPLICATION_ID):
            raise StoreError(f"{path}: is an SQLite database of another program")

    def _pragma(self, name: str) -> int:
        return int(self.conn.execute(f"PRAGMA {name}").fetchone()[0])

    def close(self) -> None:
        try:
            self.conn.execute("PRAGMA optimize")
        finally:
            self.conn.close()

    # --- jobs -----------------------------------------------------------------------------

    def add_jobs(self, jobs: Sequence[NewJob], now: float) -> AddResult:
        added: list[str] = []
        duplicates: list[str] = []
        sources: dict[tuple[str, str], str] = {}  # jobs of this batch -> the line that had them
        with self.transaction():
            for new in jobs:
                label = f"{new.provider}/{new.key}"
                if not _SAFE_KEY.fullmatch(new.key) or new.key.startswith("."):
                    raise JobsFileError(f"{new.source}: {new.key!r} is not a safe job key")
                if new.reference_id is None and new.remote_id is None:
                    raise JobsFileError(f"{new.source}: a job needs a reference_id or a job_id")
                payload = _encode_payload(new.payload, new.source)
                row = self.conn.execute(
                    "SELECT reference_id, remote_id, payload, state FROM jobs"
                    " WHERE provider = ? AND key = ?",
                    (new.provider, new.key),
                ).fetchone()
                if row is None:
                    self._refuse_taken_ids(new, sources)
                    self.conn.execute(
                        _INSERT_JOB,
                        (
                            new.provider,
                            new.key,
                            new.reference_id,
                            new.remote_id,
                            payload,
                            JobState.NEW.value,
                            now,
                            now,
                        ),
                    )
                    added.append(label)
                elif differs := self._differences(row, new, payload):
                    existing = _describe(new.provider, new.key, row[3], sources)
                    raise JobsFileError(
                        f"{new.source}: {label} conflicts with {existing}: {', '.join(differs)}"
                    )
                elif (new.provider, new.key) not in sources:
                    duplicates.append(label)
                # else: an identical repeat of an earlier line of this batch, counted there
                sources.setdefault((new.provider, new.key), new.source)
        return AddResult(added=tuple(added), duplicates=tuple(duplicates))

    @staticmethod
    def _differences(row: tuple[Any, ...], new: NewJob, payload: bytes | None) -> list[str]:
        differs = []
        if row[0] != new.reference_id:
            differs.append(f"reference id {row[0]!r} there, {new.reference_id!r} here")
        # A submitted job acquires its remote id later: a line without job_id (the same line
        # added again after the job was created) does not contradict it.
        if new.remote_id is not None and row[1] != new.remote_id:
            differs.append(f"job id {row[1]!r} there, {new.remote_id!r} here")
        if not _same_payload(row[2], payload):
            differs.append("different payload")
        return differs

    def _refuse_taken_ids(self, new: NewJob, sources: Mapping[tuple[str, str], str]) -> None:
        for column, value, name in (
            ("reference_id", new.reference_id, "reference id"),
            ("remote_id", new.remote_id, "job id"),
        ):
            if value is None:
                continue
            owner = self.conn.execute(
                f"SELECT key, state FROM jobs WHERE provider = ? AND {column} = ?",
                (new.provider, value),
            ).fetchone()
            if owner is not None:
                existing = _describe(new.provider, owner[0], owner[1], sources)
                raise JobsFileError(f"{new.source}: {name} {value!r} already belongs to {existing}")

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
                        (
                            job.reference_id,
                            job.remote_id,
                            job.state.value,
                            job.remote_status,
                            job.progress,
                            job.reason,
                            job.attempts,
                            job.due_at,
                            job.output,
                            job.updated_at,
                            job.version,
                            job.status_unknown,
                            job.cancelled_by,
                            encode_past_ids(job.past_remote_ids),
                            job.started_at,
                            job.provider,
                            job.key,
                            base_version,
                        ),
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
        if row is None:
            return "is no longer in the job store"
        return (
            f"was changed by another process or task (stored version {row[0]},"
            f" this write was based on {base_version}); nothing written"
        )

    def _taken_id_problem(self, job: Job, exc: sqlite3.IntegrityError) -> str:
        for column, value, name in (
            ("reference_id", job.reference_id, "reference id"),
            ("remote_id", job.remote_id, "remote id"),
        ):
            owner = self.conn.execute(
                f"SELECT key FROM jobs WHERE provider = ? AND {column} = ? AND key != ?",
                (job.provider, value, job.key),
            ).fetchone()
            if owner is not None:
                return f"{name} {value!r} already belongs to {job.provider}/{owner[0]}"
        return f"refused by the job table: {exc}"

    def get(self, provider: str, key: str) -> Job | None:
        row = self.conn.execute(
            f"{_SELECT_JOBS} WHERE provider = ? AND key = ?", (provider, key)
        ).fetchone()
        return None if row is None else _job_from_row(row)

    def load_payload(self, provider: str, key: str) -> Mapping[str, Any] | None:
        row = self.conn.execute(
            "SELECT payload FROM jobs WHERE provider = ? AND key = ?", (provider, key)
        ).fetchone()
        if row is None:
            raise StoreError("is not in the job store", job=f"{provider}/{key}")
        if row[0] is None:
            return None
        payload: Mapping[str, Any] = orjson.loads(row[0])
        return payload

    def select(self, provider: str | None, states: Sequence[JobState] | None) -> list[Job]:
        where: list[str] = []
        params: list[str] = []
        if provider is not None:
            where.append("provider = ?")
            params.append(provider)
        if states is not None:
            if not states:
                return []
            where.append(f"state IN ({_placeholders(len(states))})")
            params.extend(JobState(s).value for s in states)
        sql = _SELECT_JOBS + (f" WHERE {' AND '.join(where)}" if where else "") + _ORDER
        return [_job_from_row(row) for row in self.conn.execute(sql, params)]

    def recent(self, states: Sequence[JobState], limit: int) -> list[Job]:
        if not states or limit <= 0:
            return []
        sql = (
            f"{_SELECT_JOBS} WHERE state IN ({_placeholders(len(states))})"
            " ORDER BY updated_at DESC, rowid DESC LIMIT ?"
        )
        params = [*(JobState(s).value for s in states), limit]
        return [_job_from_row(row) for row in self.conn.execute(sql, params)]

    def page(
        self,
        provider: str | None,
        states: Sequence[JobState] | None,
        since: float | None,
        after: int,
        limit: int,
    ) -> JobPage:
        # Keyset paging on rowid: each page is one indexed range read, however many jobs the
        # table holds, and a job added meanwhile lands after every cursor already handed out.
        where: list[str] = ["rowid > ?"]
        params: list[Any] = [after]
        if provider is not None:
            where.append("provider = ?")
            params.append(provider)
        if states is not None:
            if not states:
                return JobPage([], None)
            where.append(f"state IN ({_placeholders(len(states))})")
            params.extend(JobState(s).value for s in states)
        if since is not None:
            where.append("updated_at >= ?")
            params.append(since)
        rows = self.conn.execute(
            f"SELECT rowid, {_JOB_COLUMNS} FROM jobs WHERE {' AND '.join(where)}"
            " ORDER BY rowid LIMIT ?",
            (*params, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        jobs = [_job_from_row(row[1:]) for row in rows]
        return JobPage(jobs, int(rows[-1][0]) if more else None)

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
            job_state = _state(provider, key, state)
            if job_state in ACTIVE:
                refs.append(JobRef(provider, key, job_state))
        return refs, int(top)

    def counts(self) -> dict[tuple[str, JobState], int]:
        result: dict[tuple[str, JobState], int] = {}
        rows = self.conn.execute(
            "SELECT provider, state, count(*) FROM jobs GROUP BY provider, state"
        )
        for provider, state, n in rows:
            try:
                result[provider, JobState(state)] = n
            except ValueError:
                raise StoreError(
                    f"{n} job(s) of {provider} have the unknown state {state!r}"
                ) from None
        return result

    def unknown_statuses(self) -> dict[tuple[str, str], int]:
        rows = self.conn.execute(
            "SELECT provider, remote_status, count(*) FROM jobs WHERE status_unknown = 1"
            f" AND state IN ({_placeholders(len(ACTIVE))}) GROUP BY provider, remote_status",
            sorted(s.value for s in ACTIVE),
        )
        return {(provider, raw or ""): n for provider, raw, n in rows}

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

    def dump(self) -> tuple[list[DumpedJob], dict[str, str]]:
        with self.transaction("DEFERRED"):  # one snapshot for both tables
            rows = self.conn.execute(
                f"SELECT {_JOB_COLUMNS}, payload FROM jobs ORDER BY created_at, rowid"
            ).fetchall()
            meta = dict(self.conn.execute("SELECT name, value FROM meta").fetchall())
        return [(_job_from_row(row[:-1]), row[-1]) for row in rows], meta

    def restore(self, jobs: Sequence[DumpedJob], meta: Mapping[str, str], where: str) -> None:
        with self.transaction():
            (n_jobs,) = self.conn.execute("SELECT count(*) FROM jobs").fetchone()
            (n_meta,) = self.conn.execute("SELECT count(*) FROM meta").fetchone()
            if n_jobs or n_meta:
                raise not_empty_error(where, n_jobs, n_meta)
            self.conn.executemany(
                f"INSERT INTO jobs ({_JOB_COLUMNS}, payload)"
                f" VALUES ({_placeholders(_N_JOB_COLUMNS + 1)})",
                ((*_job_row(job), payload) for job, payload in jobs),
            )
            self.conn.executemany("INSERT INTO meta (name, value) VALUES (?, ?)", meta.items())

    def check(self) -> list[str]:
        problems: list[str] = []
        # DEFERRED: a read-only snapshot, so every query below sees the same rows.
        with self.transaction("DEFERRED"):
            rows = [str(r[0]) for r in self.conn.execute("PRAGMA integrity_check")]
            if rows != ["ok"]:
                problems.extend(f"sqlite integrity check: {r}" for r in rows)
            states = [s.value for s in JobState]
            # (condition, its parameters, the problem; formatted with the row's columns)
            rules: tuple[tuple[str, Sequence[Any], str], ...] = (
                (
                    f"state NOT IN ({_placeholders(len(states))})",
                    states,
                    "state {state!r} is not a job state",
                ),
                (
                    f"state IN ({_placeholders(len(_NEED_REMOTE_ID))})"
                    " AND (remote_id IS NULL OR remote_id = '')",
                    _NEED_REMOTE_ID,
                    "{state} without a remote id",
                ),
                (
                    f"state IN ({_placeholders(len(_NEED_REASON))})"
                    " AND (reason IS NULL OR reason = '')",
                    _NEED_REASON,
                    "{state} without a reason",
                ),
                (
                    "state = 'harvested' AND (output IS NULL OR output = '')",
                    (),
                    "harvested without an output directory",
                ),
                (
                    "reference_id IS NULL AND remote_id IS NULL",
                    (),
                    "neither a reference id nor a remote id",
                ),
                ("version < 0", (), "negative version {version}"),
                ("attempts < 0", (), "negative attempt count {attempts}"),
            )
            for condition, params, problem in rules:
                for provider, key, state, version, attempts in self.conn.execute(
                    "SELECT provider, key, state, version, attempts FROM jobs"
                    f" WHERE {condition} ORDER BY rowid",
                    params,
                ):
                    found = problem.format(state=state, version=version, attempts=attempts)
                    problems.append(f"{provider}/{key}: {found}")
            for column, name in (("reference_id", "reference id"), ("remote_id", "remote id")):
                for provider, value, keys in self.conn.execute(
                    f"SELECT provider, {column}, group_concat(key, ', ') FROM jobs"
                    f" WHERE {column} IS NOT NULL GROUP BY provider, {column}"
                    " HAVING count(*) > 1"
                ):
                    problems.append(f"{provider}: {name} {value!r} is shared by jobs {keys}")
            # The key names the job's output directory, so an unsafe one is a path traversal.
            for provider, key in self.conn.execute("SELECT provider, key FROM jobs"):
                if not _SAFE_KEY.fullmatch(str(key)) or str(key).startswith("."):
                    problems.append(f"{provider}/{key}: key is not a safe path component")
        return problems


class SqliteStore:
    """The ``Store`` protocol on one SQLite file (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_s: float = 10.0,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', not {synchronous!r}")
        self._path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._synchronous = synchronous
        self._db: _Db | None = None
        self._reader: _Db | None = None  #: read-only, used on the event loop (point reads)
        self._closed = False
        # Made in open(): anyio primitives belong to the event loop that runs them.
        self._limiter: anyio.CapacityLimiter | None = None
        self._group: GroupCommit | None = None  #: set by open()

    @property
    def commits(self) -> int:
        """Group commits done (each holds one or more job writes)."""
        return self._group.commits if self._group else 0

    @property
    def writes(self) -> int:
        """Job writes those commits carried."""
        return self._group.writes if self._group else 0

    def __repr__(self) -> str:
        status = "open" if self._db else ("closed" if self._closed else "unopened")
        return (
            f"<SqliteStore {str(self._path)!r} {status} commits={self.commits}"
            f" writes={self.writes} pending={self._group.pending if self._group else 0}>"
        )

    @property
    def path(self) -> Path:
        return self._path

    # --- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        if self._db is not None:
            raise StoreError(f"{self._path}: job store is already open")
        if self._closed:
            raise StoreError(f"{self._path}: a closed job store cannot be reopened")
        self._limiter = anyio.CapacityLimiter(1)
        self._group = GroupCommit(self._write_batch)
        try:
            self._db = await anyio.to_thread.run_sync(
                _Db.connect,
                self._path,
                self._busy_timeout_s,
                self._synchronous,
                limiter=self._limiter,
            )
            self._reader = _Db.connect_reader(self._path, self._busy_timeout_s)
            moved = self._reader.get_meta(MOVED_META)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(
                f"{self._path}: cannot open the job store: {exc}{_damaged(exc)}"
            ) from exc
        if moved is not None:
            await self.close()
            raise moved_error(str(self._path), moved)

    async def close(self) -> None:
        """Commit the writes already asked for, then close. Safe to call twice."""
        if self._db is None:
            self._closed = True
            return
        # Shielded: a cancelled shutdown must still not leave callers waiting on a commit
        # that will never happen, nor the connection open.
        with anyio.CancelScope(shield=True):
            if self._group is not None:
                await self._group.drain()
            db, self._db = self._db, None
            self._closed = True
            reader, self._reader = self._reader, None
            if reader is not None:
                reader.close()
            if db is not None:
                await anyio.to_thread.run_sync(db.close, limiter=self._limiter)

    async def __aenter__(self) -> SqliteStore:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _require_open(self) -> _Db:
        if self._db is None:
            state = "closed" if self._closed else "not open"
            raise StoreUnavailable(f"{self._path}: job store is {state}")
        return self._db

    async def _call(self, fn: Callable[[_Db], _T]) -> _T:
        """Run ``fn`` on the connection in the store's thread; the one sqlite3 -> StoreError map."""
        db = self._require_open()
        try:
            return await anyio.to_thread.run_sync(fn, db, limiter=self._limiter)
        except sqlite3.Error as exc:
            hint = _damaged(exc)
            if getattr(exc, "sqlite_errorname", "") == "SQLITE_BUSY":
                hint = f" (another process held it longer than {self._busy_timeout_s:g} s)"
            raise StoreUnavailable(f"{self._path}: {exc}{hint}") from exc

    # --- jobs -----------------------------------------------------------------------------

    async def add_jobs(self, jobs: Sequence[NewJob], *, now: float) -> AddResult:
        if not jobs:
            return AddResult(added=(), duplicates=())
        return await self._call(lambda db: db.add_jobs(jobs, now))

    def _read(self, fn: Callable[[_Db], _T]) -> _T:
        self._require_open()
        assert self._reader is not None
        try:
            return fn(self._reader)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self._path}: {exc}{_damaged(exc)}") from exc

    async def get(self, provider: str, key: str) -> Job | None:
        return self._read(lambda db: db.get(provider, key))

    async def load_payload(self, job: Job) -> Mapping[str, Any] | None:
        return self._read(lambda db: db.load_payload(job.provider, job.key))

    async def transition(self, job: Job, event: Event, *, now: float, **changes: Any) -> Job:
        # apply() first: an illegal move raises before anything reaches the database.
        return await self._writer().write(apply(job, event, now=now, **changes), job)

    async def update(self, job: Job, *, now: float, **changes: Any) -> Job:
        return await self._writer().write(update(job, now=now, **changes), job)

    async def active(self, provider: str | None = None) -> list[Job]:
        states = sorted(ACTIVE)
        return await self._call(lambda db: db.select(provider, states))

    async def jobs(
        self, *, provider: str | None = None, states: Sequence[JobState] | None = None
    ) -> list[Job]:
        """Jobs filtered by provider and/or state, oldest first (``states=[]`` matches none)."""
        return await self._call(lambda db: db.select(provider, states))

    async def counts(self) -> dict[tuple[str, JobState], int]:
        return await self._call(_Db.counts)

    async def unknown_statuses(self) -> dict[tuple[str, str], int]:
        return await self._call(_Db.unknown_statuses)

    async def recent(self, states: Sequence[JobState], *, limit: int) -> list[Job]:
        return await self._call(lambda db: db.recent(states, limit))

    async def added_since(self, cursor: int) -> tuple[list[JobRef], int]:
        return await self._call(lambda db: db.added_since(cursor))

    async def page(
        self,
        *,
        provider: str | None = None,
        states: Sequence[JobState] | None = None,
        since: float | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> JobPage:
        return await self._call(lambda db: db.page(provider, states, since, after, limit))

    async def get_meta(self, name: str) -> str | None:
        return await self._call(lambda db: db.get_meta(name))

    async def set_meta(self, name: str, value: str) -> None:
        await self._call(lambda db: db.set_meta(name, value))

    async def check(self) -> list[str]:
        return await self._call(_Db.check)

    async def dump(self) -> tuple[list[DumpedJob], dict[str, str]]:
        return await self._call(_Db.dump)

    async def restore(self, jobs: Sequence[DumpedJob], meta: Mapping[str, str]) -> None:
        await self._call(lambda db: db.restore(jobs, meta, str(self._path)))

    # --- group commit ---------------------------------------------------------------------

    def _writer(self) -> GroupCommit:
        self._require_open()
        assert self._group is not None
        return self._group

    async def _write_batch(self, writes: Sequence[tuple[Job, int]]) -> list[str | None]:
        return await self._call(lambda db: db.write_jobs(writes))
