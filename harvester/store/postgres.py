"""The shared job table: PostgreSQL through an asyncpg connection pool.

Rules of this file:
- The semantics are ``SqliteStore``'s (tests/store runs one suite on both): all-or-nothing
  ``add_jobs`` naming the line that conflicts, version-checked writes, ``check()``. The
  payload is stored as the exact JSON bytes (``bytea``, not ``jsonb``, which would reorder
  keys, merge duplicates and refuse ``\\u0000``), so "the same payload" means the same thing
  on both backends.
- The program owns the schema: ``harvester_schema`` lists every migration applied, and
  ``open()`` applies the missing ones under an advisory lock, so replicas starting together
  migrate once.
- Job writes are group-committed: writes that arrive while a commit runs ride in the next
  one, as one multi-row ``UPDATE ... FROM unnest(...)`` in one transaction. Each caller
  still returns only once its own write is committed.
- Leases (``SharedStore``): one per replica, in ``replicas``; a job's ``owner`` names the
  replica holding it. Renewing is one UPDATE of one row however many jobs the replica holds,
  so renewals cost no job-row writes (no bloat, no lock conflicts with job writes). Once
  joined, every job write also requires ``owner = this replica``: a replica whose job was
  taken over is refused exactly like a stale version.
- ``added_since`` is a transaction-id cursor, not a sequence cursor: see ``added_since``.
- asyncpg and OS errors become ``StoreError`` in one place, ``_connection``; messages name
  the URL without any password (the password is never in the URL we keep, nor logged).
"""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.lowlevel
import asyncpg
import orjson

from harvester.errors import JobsFileError, StoreError, StoreUnavailable
from harvester.jobs import ACTIVE, TERMINAL, Event, Job, JobState, apply, update
from harvester.store.base import (
    MOVED_META,
    AddResult,
    DumpedJob,
    JobPage,
    JobRef,
    NewJob,
    Renewal,
    ReplicaInfo,
    encode_past_ids,
    moved_error,
    not_empty_error,
)
from harvester.store.groupcommit import GroupCommit

# The row format, key rules and conflict wording are sqlite's, shared so the two backends
# cannot drift apart on what a conflict or a corrupt row is.
from harvester.store.sqlite import (
    _JOB_COLUMNS,
    _NEED_REASON,
    _NEED_REMOTE_ID,
    _SAFE_KEY,
    _Db,
    _describe,
    _encode_payload,
    _job_from_row,
    _job_row,
    _state,
)

__all__ = ["SCHEMA_VERSION", "PostgresStore", "display_url"]

#: pg_advisory_xact_lock key for migrations ("HRVS", as sqlite's application_id)
_MIGRATION_LOCK = 0x48525653

#: the database's clock, as Unix seconds: every lease time is read and written on it, never on
#: a replica's own clock, so replicas whose clocks disagree still agree on whose lease holds.
#: ``now()`` is the start of the transaction, which a renewal begins after its sender noted
#: ``sent`` (the replica's own deadline, ``harvester.replica``, stays on the safe side).
_DB_NOW = "extract(epoch FROM now())::float8"

_ACTIVE_SQL = ", ".join(f"'{s.value}'" for s in sorted(ACTIVE))
_TERMINAL = sorted(s.value for s in TERMINAL)

# Each entry upgrades the schema by one version. Append only: a released entry never changes.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE jobs (
            seq           bigint GENERATED ALWAYS AS IDENTITY,
            provider      text    NOT NULL,
            key           text    NOT NULL,
            reference_id  text,
            remote_id     text,
            payload       bytea,
            state         text    NOT NULL,
            remote_status text,
            progress      double precision,
            reason        text,
            attempts      integer NOT NULL DEFAULT 0,
            due_at        double precision,
            output        text,
            created_at    double precision NOT NULL,
            updated_at    double precision NOT NULL,
            version       integer NOT NULL DEFAULT 0,
            added_xid     xid8    NOT NULL DEFAULT pg_current_xact_id(),
            owner         text,
            claimed_at    double precision,
            PRIMARY KEY (provider, key)
        )""",
        "CREATE UNIQUE INDEX jobs_seq ON jobs (seq)",
        """CREATE UNIQUE INDEX jobs_reference_id ON jobs (provider, reference_id)
            WHERE reference_id IS NOT NULL""",
        """CREATE UNIQUE INDEX jobs_remote_id ON jobs (provider, remote_id)
            WHERE remote_id IS NOT NULL""",
        "CREATE INDEX jobs_state ON jobs (state)",
        "CREATE INDEX jobs_added_xid ON jobs (added_xid)",
        # The claim query's predicate, spelled identically, so the planner can use it: a
        # table of a million harvested jobs and a few active ones claims in microseconds.
        f"CREATE INDEX jobs_claimable ON jobs (provider, seq) WHERE state IN ({_ACTIVE_SQL})",
        "CREATE INDEX jobs_owner ON jobs (owner) WHERE owner IS NOT NULL",
        "CREATE TABLE meta (name text PRIMARY KEY, value text NOT NULL)",
        """CREATE TABLE replicas (
            id            text PRIMARY KEY,
            host          text NOT NULL,
            started_at    double precision NOT NULL,
            heartbeat_at  double precision NOT NULL,
            lease_until   double precision NOT NULL
        )""",
    ),
    # 2: a status the provider does not document, so `harvester status` can name it
    ("ALTER TABLE jobs ADD COLUMN status_unknown boolean NOT NULL DEFAULT false",),
    # 3: control (harvester cancel / retry / job_timeout_s); see the sqlite store
    (
        "ALTER TABLE jobs ADD COLUMN cancelled_by text",
        "ALTER TABLE jobs ADD COLUMN past_remote_ids text",
        "ALTER TABLE jobs ADD COLUMN started_at double precision",
        # Jobs already running have no start on record; their last change is the best bound
        # we have (never earlier than the start), or job_timeout_s would never end them.
        "UPDATE jobs SET started_at = updated_at WHERE state = 'running'",
    ),
    # 4: a cancel asked of a job another replica holds; see the sqlite store
    ("ALTER TABLE jobs ADD COLUMN cancel_requested_at double precision",),
)
SCHEMA_VERSION = len(_MIGRATIONS)
_OUR_TABLES = ("jobs", "meta", "replicas")

_SELECT_JOBS = f"SELECT {_JOB_COLUMNS} FROM jobs"
_ORDER = " ORDER BY created_at, seq"

# One statement writes a whole batch. ``i`` says which writes matched (version, and owner
# once joined); two writes of one row in one batch match once, so one wins and one is stale.
# A job reaching a terminal state gives its lease up in the same write.
_WRITE_BATCH = """
UPDATE jobs AS j SET
    reference_id = v.reference_id, remote_id = v.remote_id, state = v.state,
    remote_status = v.remote_status, progress = v.progress, reason = v.reason,
    attempts = v.attempts, due_at = v.due_at, output = v.output,
    updated_at = v.updated_at, version = v.version, status_unknown = v.status_unknown,
    cancelled_by = v.cancelled_by, past_remote_ids = v.past_remote_ids,
    started_at = v.started_at,
    owner = CASE WHEN v.state = ANY($16::text[]) THEN NULL ELSE j.owner END,
    claimed_at = CASE WHEN v.state = ANY($16::text[]) THEN NULL ELSE j.claimed_at END
FROM unnest(
    $1::int[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
    $8::float8[], $9::text[], $10::int[], $11::float8[], $12::text[], $13::float8[],
    $14::int[], $15::int[], $18::bool[], $19::text[], $20::text[], $21::float8[]
) AS v(i, provider, key, reference_id, remote_id, state, remote_status, progress, reason,
       attempts, due_at, output, updated_at, version, base_version, status_unknown,
       cancelled_by, past_remote_ids, started_at)
WHERE j.provider = v.provider AND j.key = v.key AND j.version = v.base_version
    AND ($17::text IS NULL OR j.owner = $17::text)
RETURNING v.i
"""

_CLAIM = f"""
WITH picked AS (
    SELECT j.provider, j.key FROM jobs AS j
    WHERE j.provider = $1 AND j.state IN ({_ACTIVE_SQL})
      AND (j.owner IS NULL OR NOT EXISTS (
          SELECT 1 FROM replicas AS r WHERE r.id = j.owner AND r.lease_until >= {_DB_NOW}))
    ORDER BY j.seq
    LIMIT $2
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE jobs AS j SET owner = $3, claimed_at = {_DB_NOW}
FROM picked WHERE j.provider = picked.provider AND j.key = picked.key
RETURNING j.seq, {", ".join(f"j.{c.strip()}" for c in _JOB_COLUMNS.split(","))}
"""


def display_url(url: str) -> str:
    """``url`` as it may appear in messages and logs: any password removed."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{parts.username}@{host}" if parts.username else host
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "postgresql://(unparseable URL)"


class PostgresStore:
    """The ``Store`` and ``SharedStore`` protocols on one PostgreSQL database."""

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        pool_size: int = 8,
        command_timeout_s: float = 60.0,
    ) -> None:
        if pool_size < 2:
            raise ValueError(f"pool_size must be >= 2, got {pool_size}")
        self._url = url
        self._where = display_url(url)
        self._password = password
        self._pool_size = pool_size
        self._command_timeout_s = command_timeout_s
        self._pool: Any = None
        self._closed = False
        self._owner: str | None = None
        self._lease_s = 0.0
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
        status = "open" if self._pool else ("closed" if self._closed else "unopened")
        owner = f" owner={self._owner}" if self._owner else ""
        return (
            f"<PostgresStore {self._where!r} {status}{owner} commits={self.commits}"
            f" writes={self.writes} pending={self._group.pending if self._group else 0}>"
        )

    @property
    def owner(self) -> str | None:
        """The replica id this store writes as, once joined."""
        return self._owner

    # --- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            raise StoreError(f"{self._where}: job store is already open")
        if self._closed:
            raise StoreError(f"{self._where}: a closed job store cannot be reopened")
        self._group = GroupCommit(self._write_batch)
        try:
            pool = await asyncpg.create_pool(
                dsn=self._url,
                password=self._password,
                min_size=1,
                max_size=self._pool_size,
                command_timeout=self._command_timeout_s,
                server_settings={"application_name": "harvester"},
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"{self._where}: cannot open the job store: {exc}") from exc
        except ValueError as exc:  # asyncpg's verdict on a malformed DSN
            raise StoreError(f"{self._where}: not a usable PostgreSQL URL: {exc}") from exc
        self._pool = pool
        try:
            async with self._connection() as conn:
                await self._migrate(conn)
                moved = await conn.fetchval("SELECT value FROM meta WHERE name = $1", MOVED_META)
            if moved is not None:
                raise moved_error(self._where, str(moved))
        except BaseException:
            self._pool = None
            with anyio.CancelScope(shield=True):
                await pool.close()
            raise

    async def close(self) -> None:
        """Commit the writes already asked for, then close. Safe to call twice."""
        if self._pool is None:
            self._closed = True
            return
        # Shielded: a cancelled shutdown must still not leave callers waiting on a commit
        # that will never happen, nor connections open on the server.
        with anyio.CancelScope(shield=True):
            if self._group is not None:
                await self._group.drain()
            pool, self._pool = self._pool, None
            self._closed = True
            with anyio.move_on_after(10) as scope:  # real time: bounds the server's I/O
                await pool.close()
            if scope.cancelled_caught:
                pool.terminate()

    async def __aenter__(self) -> PostgresStore:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _require_open(self) -> Any:
        if self._pool is None:
            state = "closed" if self._closed else "not open"
            raise StoreUnavailable(f"{self._where}: job store is {state}")
        return self._pool

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection; the one asyncpg/OS error -> ``StoreError`` map."""
        pool = self._require_open()
        try:
            async with pool.acquire() as conn:
                yield conn
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"{self._where}: {type(exc).__name__}: {exc}") from exc

    async def _migrate(self, conn: Any) -> None:
        async with conn.transaction():
            # Replicas starting together wait here for the first one's migration.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            if await conn.fetchval("SELECT to_regclass('harvester_schema')") is None:
                for table in _OUR_TABLES:
                    if await conn.fetchval("SELECT to_regclass($1)", table) is not None:
                        raise StoreError(
                            f"{self._where}: has a table {table!r} but is not a harvester job"
                            " store; use a database (or schema) of its own"
                        )
                await conn.execute(
                    "CREATE TABLE harvester_schema (version integer PRIMARY KEY,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                current = 0
            else:
                current = await conn.fetchval(
                    "SELECT coalesce(max(version), 0) FROM harvester_schema"
                )
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"{self._where}: job store schema version {current} is newer than this"
                    f" harvester understands ({SCHEMA_VERSION}); upgrade harvester"
                )
            for version, step in enumerate(_MIGRATIONS[current:], start=current + 1):
                for statement in step:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO harvester_schema (version) VALUES ($1)", version)

    # --- jobs -----------------------------------------------------------------------------

    async def add_jobs(self, jobs: Sequence[NewJob], *, now: float) -> AddResult:
        if not jobs:
            return AddResult(added=(), duplicates=())
        # Two processes adding the same new key at once: the second INSERT fails on the
        # primary key once the first commits. Its next attempt sees that row and decides
        # duplicate or conflict as if the two had come one after the other.
        for attempt in range(3):
            try:
                async with self._connection() as conn, conn.transaction():
                    return await self._add_jobs(conn, jobs, now)
            except StoreError as exc:
                if attempt == 2 or not isinstance(exc.__cause__, asyncpg.UniqueViolationError):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _add_jobs(self, conn: Any, jobs: Sequence[NewJob], now: float) -> AddResult:
        # Everything the batch could collide with, in three queries, then the batch is walked
        # in line order exactly as sqlite walks it row by row: the first bad line is named.
        rows: dict[tuple[str, str], tuple[Any, ...]] = {}
        for r in await conn.fetch(
            "SELECT provider, key, reference_id, remote_id, payload, state FROM jobs"
            " WHERE (provider, key) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
            [j.provider for j in jobs],
            [j.key for j in jobs],
        ):
            rows[r[0], r[1]] = (r[2], r[3], r[4], r[5])
        owners: dict[tuple[str, str, str], tuple[str, str]] = {}
        for column in ("reference_id", "remote_id"):
            wanted = [(j.provider, getattr(j, column)) for j in jobs if getattr(j, column)]
            if not wanted:
                continue
            for provider, value, key, state in await conn.fetch(
                f"SELECT provider, {column}, key, state FROM jobs WHERE ({column}) IS NOT NULL"
                f" AND (provider, {column}) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                [w[0] for w in wanted],
                [w[1] for w in wanted],
            ):
                owners[column, provider, value] = (key, state)

        added: list[str] = []
        duplicates: list[str] = []
        sources: dict[tuple[str, str], str] = {}
        inserts: list[tuple[str, str, str | None, str | None, bytes | None]] = []
        for new in jobs:
            label = f"{new.provider}/{new.key}"
            if not _SAFE_KEY.fullmatch(new.key) or new.key.startswith("."):
                raise JobsFileError(f"{new.source}: {new.key!r} is not a safe job key")
            if new.reference_id is None and new.remote_id is None:
                raise JobsFileError(f"{new.source}: a job needs a reference_id or a job_id")
            payload = _encode_payload(new.payload, new.source)
            row = rows.get((new.provider, new.key))
            if row is None:
                for column, value, name in (
                    ("reference_id", new.reference_id, "reference id"),
                    ("remote_id", new.remote_id, "job id"),
                ):
                    owner = owners.get((column, new.provider, value)) if value else None
                    if owner is not None:
                        existing = _describe(new.provider, owner[0], owner[1], sources)
                        raise JobsFileError(
                            f"{new.source}: {name} {value!r} already belongs to {existing}"
                        )
                inserts.append((new.provider, new.key, new.reference_id, new.remote_id, payload))
                rows[new.provider, new.key] = (
                    new.reference_id,
                    new.remote_id,
                    payload,
                    JobState.NEW.value,
                )
                for column, value in (
                    ("reference_id", new.reference_id),
                    ("remote_id", new.remote_id),
                ):
                    if value:
                        owners[column, new.provider, value] = (new.key, JobState.NEW.value)
                added.append(label)
            elif differs := _Db._differences(row, new, payload):
                existing = _describe(new.provider, new.key, row[3], sources)
                raise JobsFileError(
                    f"{new.source}: {label} conflicts with {existing}: {', '.join(differs)}"
                )
            elif (new.provider, new.key) not in sources:
                duplicates.append(label)
            sources.setdefault((new.provider, new.key), new.source)
        if inserts:
            # ORDER BY the line number: seq (the tie-breaker of "oldest first") follows the file.
            await conn.execute(
                "INSERT INTO jobs (provider, key, reference_id, remote_id, payload, state,"
                " created_at, updated_at)"
                " SELECT p, k, r, x, d, $6, $7, $7 FROM unnest($1::text[], $2::text[],"
                " $3::text[], $4::text[], $5::bytea[]) WITH ORDINALITY AS t(p, k, r, x, d, n)"
                " ORDER BY n",
                [i[0] for i in inserts],
                [i[1] for i in inserts],
                [i[2] for i in inserts],
                [i[3] for i in inserts],
                [i[4] for i in inserts],
                JobState.NEW.value,
                now,
            )
        return AddResult(added=tuple(added), duplicates=tuple(duplicates))

    async def get(self, provider: str, key: str) -> Job | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"{_SELECT_JOBS} WHERE provider = $1 AND key = $2", provider, key
            )
        return None if row is None else _job_from_row(tuple(row))

    async def load_payload(self, job: Job) -> Mapping[str, Any] | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT payload FROM jobs WHERE provider = $1 AND key = $2", job.provider, job.key
            )
        if row is None:
            raise StoreError("is not in the job store", job=f"{job.provider}/{job.key}")
        if row[0] is None:
            return None
        payload: Mapping[str, Any] = orjson.loads(row[0])
        return payload

    async def transition(self, job: Job, event: Event, *, now: float, **changes: Any) -> Job:
        # apply() first: an illegal move raises before anything reaches the database.
        return await self._writer().write(apply(job, event, now=now, **changes), job)

    async def update(self, job: Job, *, now: float, **changes: Any) -> Job:
        return await self._writer().write(update(job, now=now, **changes), job)

    async def active(self, provider: str | None = None) -> list[Job]:
        return await self._select(provider, sorted(ACTIVE))

    async def jobs(
        self, *, provider: str | None = None, states: Sequence[JobState] | None = None
    ) -> list[Job]:
        """Jobs filtered by provider and/or state, oldest first (``states=[]`` matches none)."""
        return await self._select(provider, states)

    async def _select(self, provider: str | None, states: Sequence[JobState] | None) -> list[Job]:
        where: list[str] = []
        params: list[Any] = []
        if provider is not None:
            params.append(provider)
            where.append(f"provider = ${len(params)}")
        if states is not None:
            if not states:
                return []
            params.append([JobState(s).value for s in states])
            where.append(f"state = ANY(${len(params)}::text[])")
        sql = _SELECT_JOBS + (f" WHERE {' AND '.join(where)}" if where else "") + _ORDER
        async with self._connection() as conn:
            rows = await conn.fetch(sql, *params)
        return [_job_from_row(tuple(r)) for r in rows]

    async def recent(self, states: Sequence[JobState], *, limit: int) -> list[Job]:
        if not states or limit <= 0:
            return []
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"{_SELECT_JOBS} WHERE state = ANY($1::text[])"
                " ORDER BY updated_at DESC, seq DESC LIMIT $2",
                [JobState(s).value for s in states],
                limit,
            )
        return [_job_from_row(tuple(r)) for r in rows]

    async def page(
        self,
        *,
        provider: str | None = None,
        states: Sequence[JobState] | None = None,
        since: float | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> JobPage:
        """See the protocol. Keyset paging on ``seq`` (the unique index ``jobs_seq``): a
        listing, not a feed, so a job whose insert commits behind a later one may be missed
        by a walk already past its ``seq`` (``added_since`` is the feed)."""
        where: list[str] = ["seq > $1"]
        params: list[Any] = [after]
        if provider is not None:
            params.append(provider)
            where.append(f"provider = ${len(params)}")
        if states is not None:
            if not states:
                return JobPage([], None)
            params.append([JobState(s).value for s in states])
            where.append(f"state = ANY(${len(params)}::text[])")
        if since is not None:
            params.append(since)
            where.append(f"updated_at >= ${len(params)}")
        params.append(limit + 1)
        sql = (
            f"SELECT seq, {_JOB_COLUMNS} FROM jobs WHERE {' AND '.join(where)}"
            f" ORDER BY seq LIMIT ${len(params)}"
        )
        async with self._connection() as conn:
            rows = await conn.fetch(sql, *params)
        more = len(rows) > limit
        rows = rows[:limit]
        jobs = [_job_from_row(tuple(r)[1:]) for r in rows]
        return JobPage(jobs, int(rows[-1][0]) if more else None)

    async def counts(self) -> dict[tuple[str, JobState], int]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT provider, state, count(*) FROM jobs GROUP BY provider, state"
            )
        result: dict[tuple[str, JobState], int] = {}
        for provider, state, n in rows:
            try:
                result[provider, JobState(state)] = int(n)
            except ValueError:
                raise StoreError(
                    f"{n} job(s) of {provider} have the unknown state {state!r}"
                ) from None
        return result

    async def unknown_statuses(self) -> dict[tuple[str, str], int]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT provider, remote_status, count(*) FROM jobs WHERE status_unknown"
                f" AND state IN ({_ACTIVE_SQL}) GROUP BY provider, remote_status"
            )
        return {(provider, raw or ""): int(n) for provider, raw, n in rows}

    async def added_since(self, cursor: int) -> tuple[list[JobRef], int]:
        """Active jobs added after ``cursor``; see the protocol.

        A sequence cursor is not safe here: ``seq`` values are handed out when rows are
        inserted, but transactions commit in any order, so a reader can see seq 11 while seq
        10 is still uncommitted, move its cursor past 10 and never see it. Instead every row
        records the id of the transaction that inserted it (``added_xid``), and the cursor is
        the oldest transaction still running when we read (the snapshot's ``xmin``). Every
        transaction older than that has ended, so its rows are either in this answer or will
        never exist; younger ones are read again next time. The price: a row committed while
        an older transaction is still open is reported twice (callers already ignore jobs
        they know); the gain: none is ever missed, whatever the commit order.
        """
        async with (
            self._connection() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            # Both statements see one snapshot: the one whose xmin becomes the cursor.
            xmin = int(await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())::text"))
            rows = await conn.fetch(
                "SELECT provider, key, state FROM jobs WHERE added_xid >= $1::text::xid8"
                f" AND state IN ({_ACTIVE_SQL}) ORDER BY seq",
                str(max(cursor, 0)),
            )
        refs = [JobRef(p, k, _state(p, k, s)) for p, k, s in rows]
        return refs, max(cursor, xmin)

    async def dump(self) -> tuple[list[DumpedJob], dict[str, str]]:
        async with (
            self._connection() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            rows = await conn.fetch(f"SELECT {_JOB_COLUMNS}, payload FROM jobs{_ORDER}")
            meta = await conn.fetch("SELECT name, value FROM meta")
        jobs = [(_job_from_row(tuple(r)[:-1]), r["payload"]) for r in rows]
        return jobs, {str(name): str(value) for name, value in meta}

    async def restore(self, jobs: Sequence[DumpedJob], meta: Mapping[str, str]) -> None:
        columns = [c.strip() for c in _JOB_COLUMNS.split(",")] + ["payload"]
        async with self._connection() as conn, conn.transaction():
            # Nobody adds a job or a meta value between the check and the copy.
            await conn.execute("LOCK TABLE jobs, meta IN EXCLUSIVE MODE")
            n_jobs = await conn.fetchval("SELECT count(*) FROM jobs")
            n_meta = await conn.fetchval("SELECT count(*) FROM meta")
            if n_jobs or n_meta:
                raise not_empty_error(self._where, n_jobs, n_meta)
            await conn.copy_records_to_table(
                "jobs",
                records=[(*_job_row(job), payload) for job, payload in jobs],
                columns=columns,
            )
            await conn.executemany(
                "INSERT INTO meta (name, value) VALUES ($1, $2)", list(meta.items())
            )

    # --- meta and integrity ---------------------------------------------------------------

    async def get_meta(self, name: str) -> str | None:
        async with self._connection() as conn:
            value = await conn.fetchval("SELECT value FROM meta WHERE name = $1", name)
        return None if value is None else str(value)

    async def set_meta(self, name: str, value: str) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO meta (name, value) VALUES ($1, $2)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                name,
                value,
            )

    async def add_meta(self, name: str, value: str) -> str:
        async with self._connection() as conn, conn.transaction():
            # DO NOTHING waits for a concurrent insert of the same name to commit, so the
            # SELECT after it sees whichever value won.
            await conn.execute(
                "INSERT INTO meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                name,
                value,
            )
            stored = await conn.fetchval("SELECT value FROM meta WHERE name = $1", name)
        return str(stored)

    async def check(self) -> list[str]:
        problems: list[str] = []
        states = [s.value for s in JobState]
        # (condition, its parameters, the problem; formatted with the row's columns)
        rules: tuple[tuple[str, Sequence[Any], str], ...] = (
            ("NOT (state = ANY($1::text[]))", (states,), "state {state!r} is not a job state"),
            (
                "state = ANY($1::text[]) AND (remote_id IS NULL OR remote_id = '')",
                (list(_NEED_REMOTE_ID),),
                "{state} without a remote id",
            ),
            (
                "state = ANY($1::text[]) AND (reason IS NULL OR reason = '')",
                (list(_NEED_REASON),),
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
        async with (
            self._connection() as conn,
            # One snapshot: every query below sees the same rows.
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            for condition, params, problem in rules:
                for provider, key, state, version, attempts in await conn.fetch(
                    "SELECT provider, key, state, version, attempts FROM jobs"
                    f" WHERE {condition} ORDER BY seq",
                    *params,
                ):
                    found = problem.format(state=state, version=version, attempts=attempts)
                    problems.append(f"{provider}/{key}: {found}")
            for column, name in (("reference_id", "reference id"), ("remote_id", "remote id")):
                for provider, value, keys in await conn.fetch(
                    f"SELECT provider, {column}, string_agg(key, ', ' ORDER BY seq) FROM jobs"
                    f" WHERE {column} IS NOT NULL GROUP BY provider, {column}"
                    " HAVING count(*) > 1"
                ):
                    problems.append(f"{provider}: {name} {value!r} is shared by jobs {keys}")
            # The key names the job's output directory, so an unsafe one is a path traversal.
            for provider, key in await conn.fetch("SELECT provider, key FROM jobs ORDER BY seq"):
                if not _SAFE_KEY.fullmatch(str(key)) or str(key).startswith("."):
                    problems.append(f"{provider}/{key}: key is not a safe path component")
        return problems

    # --- leases (SharedStore) -------------------------------------------------------------

    # Lease times are the database's (``_DB_NOW``): a replica's clock never reaches a lease.
    _UPSERT_REPLICA = (
        "INSERT INTO replicas (id, host, started_at, heartbeat_at, lease_until)"
        f" VALUES ($1, $2, {_DB_NOW}, {_DB_NOW}, {_DB_NOW} + $3::float8)"
        " ON CONFLICT (id) DO UPDATE SET"
        " heartbeat_at = excluded.heartbeat_at, lease_until = excluded.lease_until"
    )

    async def join(self, owner: str, *, lease_s: float) -> None:
        if not owner:
            raise ValueError("a replica needs a non-empty owner id")
        if not (math.isfinite(lease_s) and lease_s > 0):
            raise ValueError(f"lease_s must be > 0, got {lease_s!r}")
        async with self._connection() as conn:
            await conn.execute(self._UPSERT_REPLICA, owner, socket.gethostname(), lease_s)
        self._owner = owner
        self._lease_s = lease_s

    def _joined(self) -> str:
        if self._owner is None:
            raise StoreError(f"{self._where}: this store has not joined as a replica")
        return self._owner

    async def renew(self) -> Renewal:
        owner = self._joined()
        async with self._connection() as conn, conn.transaction():
            # One transaction, so one ``now()``: every comparison below uses the same instant.
            still = await conn.fetchval(
                f"SELECT lease_until >= {_DB_NOW} FROM replicas WHERE id = $1 FOR UPDATE", owner
            )
            # A missing row (deleted as long dead) is re-created: the replica is back.
            await conn.execute(self._UPSERT_REPLICA, owner, socket.gethostname(), self._lease_s)
            # Active only: a finished job gives its lease up with its last write, but one
            # finished behind our back must not come back to us at every renewal.
            held = await conn.fetch(
                "SELECT provider, key, cancel_requested_at IS NOT NULL FROM jobs"
                f" WHERE owner = $1 AND state IN ({_ACTIVE_SQL})",
                owner,
            )
            live = await conn.fetchval(
                f"SELECT count(*) FROM replicas WHERE lease_until >= {_DB_NOW}"
            )
            active = await conn.fetch(
                f"SELECT provider, count(*) FROM jobs WHERE state IN ({_ACTIVE_SQL})"
                " GROUP BY provider"
            )
            # Rows of replicas dead for ten leases only make the table longer; their jobs
            # were claimable since their first lease ran out, row or no row.
            await conn.execute(
                f"DELETE FROM replicas WHERE lease_until < {_DB_NOW} - $1::float8",
                10 * self._lease_s,
            )
        return Renewal(
            live_replicas=max(1, int(live)),
            held=frozenset((str(p), str(k)) for p, k, _ in held),
            lapsed=not still,
            active={str(p): int(n) for p, n in active},
            cancels=frozenset((str(p), str(k)) for p, k, asked in held if asked),
        )

    async def replicas(self) -> list[ReplicaInfo]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT r.id, r.host, r.started_at, {_DB_NOW} - r.heartbeat_at,"
                f" r.lease_until - {_DB_NOW}, (SELECT count(*) FROM jobs j WHERE j.owner = r.id"
                f" AND j.state IN ({_ACTIVE_SQL})) FROM replicas r ORDER BY r.started_at, r.id"
            )
        return [
            ReplicaInfo(str(i), str(h), float(s), float(b), float(u), int(n))
            for i, h, s, b, u, n in rows
        ]

    async def claim(self, provider: str, *, limit: int) -> list[Job]:
        owner = self._joined()
        if limit <= 0:
            return []
        async with self._connection() as conn:
            rows = await conn.fetch(_CLAIM, provider, limit, owner)
        # RETURNING comes in no particular order; oldest first, as promised.
        return [_job_from_row(tuple(r)[1:]) for r in sorted(rows, key=lambda r: r[0])]

    async def take_or_request_cancel(self, provider: str, key: str) -> tuple[Job | None, bool]:
        owner = self._joined()
        async with self._connection() as conn, conn.transaction():
            # The row lock keeps claimers (SKIP LOCKED) off it until this decision is in.
            row = await conn.fetchrow(
                f"SELECT j.owner = $3 OR j.owner IS NULL OR NOT EXISTS (SELECT 1 FROM replicas"
                f" AS r WHERE r.id = j.owner AND r.lease_until >= {_DB_NOW}),"
                f" j.state IN ({_ACTIVE_SQL}) FROM jobs AS j"
                " WHERE j.provider = $1 AND j.key = $2 FOR UPDATE",
                provider,
                key,
                owner,
            )
            if row is None:
                return None, False
            free, active = bool(row[0]), bool(row[1])
            if not active:
                change, taken = "", False
            elif free:
                change, taken = f"owner = $3, claimed_at = {_DB_NOW}", True
            else:
                change = f"cancel_requested_at = coalesce(cancel_requested_at, {_DB_NOW})"
                taken = False
            if change:
                await conn.execute(
                    f"UPDATE jobs SET {change} WHERE provider = $1 AND key = $2"
                    + ("" if taken else " AND $3::text IS NOT NULL"),
                    provider,
                    key,
                    owner,
                )
            got = await conn.fetchrow(
                f"{_SELECT_JOBS} WHERE provider = $1 AND key = $2", provider, key
            )
        return _job_from_row(tuple(got)), taken

    async def forget_cancel_request(self, provider: str, key: str) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE jobs SET cancel_requested_at = NULL WHERE provider = $1 AND key = $2",
                provider,
                key,
            )

    async def release(self, provider: str, keys: Sequence[str]) -> int:
        owner = self._joined()
        if not keys:
            return 0
        async with self._connection() as conn:
            status = await conn.execute(
                "UPDATE jobs SET owner = NULL, claimed_at = NULL"
                " WHERE provider = $1 AND key = ANY($2::text[]) AND owner = $3",
                provider,
                list(keys),
                owner,
            )
        return int(status.split()[-1])

    async def leave(self) -> None:
        owner = self._joined()
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                "UPDATE jobs SET owner = NULL, claimed_at = NULL WHERE owner = $1", owner
            )
            await conn.execute("DELETE FROM replicas WHERE id = $1", owner)
        self._owner = None

    # --- group commit ---------------------------------------------------------------------

    def _writer(self) -> GroupCommit:
        self._require_open()
        assert self._group is not None
        return self._group

    async def _write_batch(self, writes: Sequence[tuple[Job, int]]) -> list[str | None]:
        """Write each job whose row is still at its base version (and ours, once joined)."""
        if not writes:  # every writer of the batch was cancelled before it was taken
            return []
        async with self._connection() as conn:
            try:
                async with conn.transaction():
                    matched = await self._update(conn, writes)
                    return await self._problems(conn, writes, matched)
            except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError):
                pass
            # One row broke a constraint (a remote id another job has, say) and took the
            # whole statement with it. Again one row at a time, each in a savepoint, so
            # only that row is refused.
            problems: list[str | None] = []
            async with conn.transaction():
                for job, base_version in writes:
                    try:
                        async with conn.transaction():
                            matched = await self._update(conn, [(job, base_version)])
                    except asyncpg.UniqueViolationError as exc:
                        problems.append(await self._taken_id_problem(conn, job, exc))
                        continue
                    except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as exc:
                        problems.append(f"cannot store this job: {exc}")
                        continue
                    problems.extend(await self._problems(conn, [(job, base_version)], matched))
            return problems

    async def _update(self, conn: Any, writes: Sequence[tuple[Job, int]]) -> set[int]:
        jobs = [w[0] for w in writes]
        rows = await conn.fetch(
            _WRITE_BATCH,
            list(range(len(writes))),
            [j.provider for j in jobs],
            [j.key for j in jobs],
            [j.reference_id for j in jobs],
            [j.remote_id for j in jobs],
            [j.state.value for j in jobs],
            [j.remote_status for j in jobs],
            [j.progress for j in jobs],
            [j.reason for j in jobs],
            [j.attempts for j in jobs],
            [j.due_at for j in jobs],
            [j.output for j in jobs],
            [j.updated_at for j in jobs],
            [j.version for j in jobs],
            [w[1] for w in writes],
            _TERMINAL,
            self._owner,
            [j.status_unknown for j in jobs],
            [j.cancelled_by for j in jobs],
            [encode_past_ids(j.past_remote_ids) for j in jobs],
            [j.started_at for j in jobs],
        )
        return {int(r[0]) for r in rows}

    async def _problems(
        self, conn: Any, writes: Sequence[tuple[Job, int]], matched: set[int]
    ) -> list[str | None]:
        missed = [i for i in range(len(writes)) if i not in matched]
        if not missed:
            return [None] * len(writes)
        found = {
            (r[0], r[1]): (r[2], r[3])
            for r in await conn.fetch(
                "SELECT provider, key, version, owner FROM jobs"
                " WHERE (provider, key) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                [writes[i][0].provider for i in missed],
                [writes[i][0].key for i in missed],
            )
        }
        problems: list[str | None] = [None] * len(writes)
        for i in missed:
            job, base_version = writes[i]
            row = found.get((job.provider, job.key))
            if row is None:
                problems[i] = "is no longer in the job store"
            elif self._owner is not None and row[1] != self._owner and row[0] == base_version:
                holder = f"replica {row[1]}" if row[1] else "no replica"
                problems[i] = (
                    f"is held by {holder}, not by this one ({self._owner}): its lease was"
                    " taken over or given up; nothing written"
                )
            else:
                problems[i] = (
                    f"was changed by another process or task (stored version {row[0]},"
                    f" this write was based on {base_version}); nothing written"
                )
        return problems

    async def _taken_id_problem(
        self, conn: Any, job: Job, exc: asyncpg.UniqueViolationError
    ) -> str:
        for column, value, name in (
            ("reference_id", job.reference_id, "reference id"),
            ("remote_id", job.remote_id, "remote id"),
        ):
            if value is None:
                continue
            holder = await conn.fetchval(
                f"SELECT key FROM jobs WHERE provider = $1 AND {column} = $2 AND key != $3",
                job.provider,
                value,
                job.key,
            )
            if holder is not None:
                return f"{name} {value!r} already belongs to {job.provider}/{holder}"
        return f"refused by the job table: {exc}"
