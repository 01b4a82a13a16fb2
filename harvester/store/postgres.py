"""The shared job table: PostgreSQL through an asyncpg connection pool.

What a store does (row format, key rules, the add-jobs walk, integrity rules, lifecycle, group
commit) is ``core``'s and its helpers', exactly as for sqlite (tests/store runs one suite on
both); this file holds PostgreSQL's SQL and I/O, and the leases. Its rules:
- The payload is stored as the exact JSON bytes (``bytea``, not ``jsonb``, which would
  reorder keys, merge duplicates and refuse ``\\u0000``), so "the same payload" means the
  same thing on both backends.
- The program owns the schema: ``harvester_schema`` lists every migration applied, and
  ``open()`` applies the missing ones under an advisory lock, so replicas starting together
  migrate once.
- A group commit is one multi-row ``UPDATE ... FROM unnest(...)`` in one transaction.
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
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg

from harvester.errors import StoreError, StoreUnavailable
from harvester.jobs import TERMINAL, Job, JobState
from harvester.store import integrity, queries, schema
from harvester.store.base import (
    AddResult,
    DumpedJob,
    JobRef,
    NewJob,
    Renewal,
    ReplicaInfo,
    not_empty_error,
)
from harvester.store.core import StoreCore
from harvester.store.rows import (
    ACTIVE_SQL,
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
from harvester.store.walk import StoredRow, stored_row, walk

__all__ = ["SCHEMA_VERSION", "PostgresStore", "display_url"]

_T = TypeVar("_T")

#: pg_advisory_xact_lock key for migrations ("HRVS", as sqlite's application_id)
_MIGRATION_LOCK = 0x48525653

#: the database's clock, as Unix seconds: every lease time is read and written on it, never on
#: a replica's own clock, so replicas whose clocks disagree still agree on whose lease holds.
#: ``now()`` is the start of the transaction, which a renewal begins after its sender noted
#: ``sent`` (the replica's own deadline, ``harvester.replica``, stays on the safe side).
_DB_NOW = "extract(epoch FROM now())::float8"

_TERMINAL = sorted(s.value for s in TERMINAL)

# Each entry upgrades the schema by one version (``schema``: append only).
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
        f"CREATE INDEX jobs_claimable ON jobs (provider, seq) WHERE state IN ({ACTIVE_SQL})",
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
    *schema.later_steps(schema.POSTGRES),
    # No step 5 (sqlite's index on (state, updated_at) for ``Store.recent``): an index on
    # updated_at, even a partial one, makes every write a non-HOT update, since each write
    # changes it. Measured, 200 writers of polls' updates: 36,000 -> 22,000 writes/s and HOT
    # updates 18,420 -> 0 of 20,400. ``recent`` reads jobs_state instead, one state at a time.
)
SCHEMA_VERSION = len(_MIGRATIONS)
_OUR_TABLES = ("jobs", "meta", "replicas")

_INTEGRITY = integrity.rules("seq", "string_agg(key, ', ' ORDER BY seq)")

#: the array type each written column travels in
_ARRAY_TYPES = {
    "attempts": "int",
    "version": "int",
    "status_unknown": "bool",
    **{c: "float8" for c in ("updated_at", "progress", "due_at", "started_at")},
}

# One statement writes a whole batch. ``i`` says which writes matched (version, and owner
# once joined); two writes of one row in one batch match once, so one wins and one is stale.
# A job reaching a terminal state gives its lease up in the same write.
_WRITE_BATCH = f"""
UPDATE jobs AS j SET {", ".join(f"{c} = v.{c}" for c in WRITTEN_COLUMNS)},
    owner = CASE WHEN v.state = ANY($1::text[]) THEN NULL ELSE j.owner END,
    claimed_at = CASE WHEN v.state = ANY($1::text[]) THEN NULL ELSE j.claimed_at END
FROM unnest($3::int[], $4::text[], $5::text[], $6::int[], {
    ", ".join(f"${n}::{_ARRAY_TYPES.get(c, 'text')}[]" for n, c in enumerate(WRITTEN_COLUMNS, 7))
}) AS v(i, provider, key, base_version, {", ".join(WRITTEN_COLUMNS)})
WHERE j.provider = v.provider AND j.key = v.key AND j.version = v.base_version
    AND ($2::text IS NULL OR j.owner = $2::text)
RETURNING v.i
"""

_CLAIM = f"""
WITH picked AS (
    SELECT j.provider, j.key FROM jobs AS j
    WHERE j.provider = $1 AND j.state IN ({ACTIVE_SQL})
      AND (j.owner IS NULL OR NOT EXISTS (
          SELECT 1 FROM replicas AS r WHERE r.id = j.owner AND r.lease_until >= {_DB_NOW}))
    ORDER BY j.seq
    LIMIT $2
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE jobs AS j SET owner = $3, claimed_at = {_DB_NOW}
FROM picked WHERE j.provider = picked.provider AND j.key = picked.key
RETURNING j.seq, {", ".join(f"j.{c}" for c in JOB_COLUMN_NAMES)}
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


class PostgresStore(StoreCore):
    """The ``Store`` and ``SharedStore`` protocols on one PostgreSQL database."""

    _sql = queries.Dialect(numbered=True, order="seq")

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
        super().__init__(display_url(url))
        self._url = url
        self._password = password
        self._pool_size = pool_size
        self._command_timeout_s = command_timeout_s
        self._pool: Any = None
        self._owner: str | None = None
        self._lease_s = 0.0

    def _repr_extra(self) -> str:
        return f" owner={self._owner}" if self._owner else ""

    @property
    def owner(self) -> str | None:
        """The replica id this store writes as, once joined."""
        return self._owner

    # --- lifecycle ------------------------------------------------------------------------

    async def _connect(self) -> None:
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
            async with self._connection(opening=True) as conn:
                await self._migrate(conn)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._disconnect()
            raise

    async def _disconnect(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        with anyio.move_on_after(10) as scope:  # real time: bounds the server's I/O
            await pool.close()
        if scope.cancelled_caught:
            pool.terminate()

    @asynccontextmanager
    async def _connection(self, *, opening: bool = False) -> AsyncIterator[Any]:
        """A pooled connection; the one asyncpg/OS error -> ``StoreError`` map."""
        if not opening:
            self._require_open()
        try:
            async with self._pool.acquire() as conn:
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
            steps = schema.steps_to_apply(_MIGRATIONS, current, self._where)
            for version, step in enumerate(steps, start=current + 1):
                for statement in step:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO harvester_schema (version) VALUES ($1)", version)

    async def _fetch(
        self, sql: str, params: Sequence[Any], convert: Callable[[tuple[Any, ...]], _T]
    ) -> list[_T]:
        async with self._connection() as conn:
            rows = await conn.fetch(sql, *params)
        return [convert(tuple(r)) for r in rows]

    # --- jobs -----------------------------------------------------------------------------

    async def _add(self, jobs: Sequence[NewJob], now: float) -> AddResult:
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
        # Everything the batch could collide with, in three queries; then the walk, in line
        # order, looks rows up in what these found.
        rows: dict[tuple[str, str], StoredRow] = {}
        for r in await conn.fetch(
            "SELECT provider, key, reference_id, remote_id, payload, state FROM jobs"
            " WHERE (provider, key) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
            [j.provider for j in jobs],
            [j.key for j in jobs],
        ):
            rows[r[0], r[1]] = stored_row(tuple(r)[2:])
        holders: dict[tuple[str, str, str], tuple[str, str]] = {}
        for column, _ in ID_COLUMNS:
            wanted = [(j.provider, v) for j in jobs if (v := getattr(j, column)) is not None]
            if not wanted:
                continue
            for provider, value, key, state in await conn.fetch(
                f"SELECT provider, {column}, key, state FROM jobs WHERE ({column}) IS NOT NULL"
                f" AND (provider, {column}) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                [w[0] for w in wanted],
                [w[1] for w in wanted],
            ):
                holders[column, provider, value] = (key, state)

        walked = walk(
            jobs,
            lambda provider, key: rows.get((provider, key)),
            lambda column, provider, value: holders.get((column, provider, value)),
        )
        if walked.inserts:
            # ORDER BY the line number: seq (the tie-breaker of "oldest first") follows the file.
            await conn.execute(
                "INSERT INTO jobs (provider, key, reference_id, remote_id, payload, state,"
                " created_at, updated_at)"
                " SELECT p, k, r, x, d, $6, $7, $7 FROM unnest($1::text[], $2::text[],"
                " $3::text[], $4::text[], $5::bytea[]) WITH ORDINALITY AS t(p, k, r, x, d, n)"
                " ORDER BY n",
                *(list(column) for column in zip(*walked.inserts, strict=True)),
                JobState.NEW.value,
                now,
            )
        return walked.result

    async def get(self, provider: str, key: str) -> Job | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"{SELECT_JOBS} WHERE provider = $1 AND key = $2", provider, key
            )
        return None if row is None else job_from_row(tuple(row))

    async def load_payload(self, job: Job) -> Mapping[str, Any] | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT payload FROM jobs WHERE provider = $1 AND key = $2", job.provider, job.key
            )
        return decode_payload(f"{job.provider}/{job.key}", None if row is None else tuple(row))

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
                f" AND state IN ({ACTIVE_SQL}) ORDER BY seq",
                str(max(cursor, 0)),
            )
        refs = [JobRef(p, k, parse_state(p, k, s)) for p, k, s in rows]
        return refs, max(cursor, xmin)

    async def dump(self) -> tuple[list[DumpedJob], dict[str, str]]:
        async with (
            self._connection() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            rows = await conn.fetch(
                f"SELECT {JOB_COLUMNS}, payload FROM jobs ORDER BY created_at, seq"
            )
            meta = await conn.fetch("SELECT name, value FROM meta")
        jobs = [(job_from_row(tuple(r)[:-1]), r["payload"]) for r in rows]
        return jobs, {str(name): str(value) for name, value in meta}

    async def restore(self, jobs: Sequence[DumpedJob], meta: Mapping[str, str]) -> None:
        async with self._connection() as conn, conn.transaction():
            # Nobody adds a job or a meta value between the check and the copy.
            await conn.execute("LOCK TABLE jobs, meta IN EXCLUSIVE MODE")
            n_jobs = await conn.fetchval("SELECT count(*) FROM jobs")
            n_meta = await conn.fetchval("SELECT count(*) FROM meta")
            if n_jobs or n_meta:
                raise not_empty_error(self._where, n_jobs, n_meta)
            await conn.copy_records_to_table(
                "jobs",
                records=[(*job_row(job), payload) for job, payload in jobs],
                columns=[*JOB_COLUMN_NAMES, "payload"],
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

    async def update_meta(self, name: str, update: Callable[[str | None], str]) -> str:
        async with self._connection() as conn, conn.transaction():
            # The row exists (as a placeholder no one else can see until this commits, and
            # that a concurrent updater waits on) so FOR UPDATE has a row to lock even the
            # first time: the read below sees the last committed update, and no other runs
            # between it and the write.
            created = await conn.fetchval(
                "INSERT INTO meta (name, value) VALUES ($1, '') ON CONFLICT (name) DO NOTHING"
                " RETURNING true",
                name,
            )
            stored = await conn.fetchval("SELECT value FROM meta WHERE name = $1 FOR UPDATE", name)
            value = update(None if created else str(stored))
            await conn.execute("UPDATE meta SET value = $2 WHERE name = $1", name, value)
        return value

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
        async with (
            self._connection() as conn,
            # One snapshot: every query below sees the same rows.
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            for rule in _INTEGRITY:
                problems += rule.problems(await conn.fetch(rule.sql))
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
                f" WHERE owner = $1 AND state IN ({ACTIVE_SQL})",
                owner,
            )
            live = await conn.fetchval(
                f"SELECT count(*) FROM replicas WHERE lease_until >= {_DB_NOW}"
            )
            active = await conn.fetch(
                f"SELECT provider, count(*) FROM jobs WHERE state IN ({ACTIVE_SQL})"
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
                f" AND j.state IN ({ACTIVE_SQL})) FROM replicas r ORDER BY r.started_at, r.id"
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
        return [job_from_row(tuple(r)[1:]) for r in sorted(rows, key=lambda r: r[0])]

    async def take_or_request_cancel(self, provider: str, key: str) -> tuple[Job | None, bool]:
        owner = self._joined()
        async with self._connection() as conn, conn.transaction():
            # The row lock keeps claimers (SKIP LOCKED) off it until this decision is in.
            row = await conn.fetchrow(
                f"SELECT j.owner = $3 OR j.owner IS NULL OR NOT EXISTS (SELECT 1 FROM replicas"
                f" AS r WHERE r.id = j.owner AND r.lease_until >= {_DB_NOW}),"
                f" j.state IN ({ACTIVE_SQL}) FROM jobs AS j"
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
                f"{SELECT_JOBS} WHERE provider = $1 AND key = $2", provider, key
            )
        return job_from_row(tuple(got)), taken

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
            _TERMINAL,
            self._owner,
            list(range(len(writes))),
            [j.provider for j in jobs],
            [j.key for j in jobs],
            [w[1] for w in writes],
            *(list(column) for column in zip(*map(written_values, jobs), strict=True)),
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
            problems[i] = refused_write(
                base_version, found.get((job.provider, job.key)), self._owner
            )
        return problems

    async def _taken_id_problem(
        self, conn: Any, job: Job, exc: asyncpg.UniqueViolationError
    ) -> str:
        holders = {}
        for column, _ in ID_COLUMNS:
            value = getattr(job, column)
            holders[column] = (
                None
                if value is None
                else await conn.fetchval(
                    f"SELECT key FROM jobs WHERE provider = $1 AND {column} = $2 AND key != $3",
                    job.provider,
                    value,
                    job.key,
                )
            )
        return taken_id_problem(job, holders, exc)
