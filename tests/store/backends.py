"""The backends the shared store suite runs on, and what the tests may do behind a store's back.

To add a backend, write a class like ``SqliteBackend``, add its name to ``BACKENDS`` and
construct it in ``conftest.backend``. Backends in ``SHARED_BACKENDS`` also implement
``SharedStore`` (leases for several replicas) and run ``test_leases.py``.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any, Protocol

from harvester.store.base import SharedStore, Store
from harvester.store.postgres import PostgresStore
from harvester.store.sqlite import SqliteStore

from .pgserver import PgServer, run_sync

BACKENDS = ["sqlite", "postgres"]
SHARED_BACKENDS = ["postgres"]


class Backend(Protocol):
    name: str

    def make(self) -> Store:
        """A new, unopened store on the same database: a restart, or a second process."""

    def raw(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run SQL behind the store's back (to plant corruption); ``?`` placeholders."""


class SqliteBackend:
    name = "sqlite"

    def __init__(self, tmp_path: Path) -> None:
        # A directory that does not exist yet: the store must create it.
        self.path = tmp_path / "state" / "harvester.db"

    def make(self) -> Store:
        return SqliteStore(self.path, busy_timeout_s=5.0)

    def raw(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.path, timeout=5.0)
        try:
            with conn:
                return conn.execute(statement, params).fetchall()
        finally:
            conn.close()


class PostgresBackend:
    """A schema of its own in the session's test database."""

    name = "postgres"

    def __init__(self, server: PgServer, database: str) -> None:
        self.server = server
        self.url = server.schema_url(database)

    def make(self) -> Store:
        return self.make_shared()

    def make_shared(self) -> SharedStore:
        return PostgresStore(self.url, password=self.server.password)

    def raw(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        numbers = iter(range(1, len(params) + 1))
        sql = re.sub(r"\?", lambda _: f"${next(numbers)}", statement)

        async def run() -> list[tuple[Any, ...]]:
            import asyncpg

            conn = await asyncpg.connect(self.url, password=self.server.password)
            try:
                return [tuple(r) for r in await conn.fetch(sql, *params)]
            finally:
                await conn.close()

        return run_sync(run())
