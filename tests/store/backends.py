"""The backends the shared store suite runs on, and what the tests may do behind a store's back.

To add a backend (e.g. Postgres), write a class like ``SqliteBackend``, add its name to
``BACKENDS`` and construct it in ``conftest.backend``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Protocol

from harvester.store.base import Store
from harvester.store.sqlite import SqliteStore

BACKENDS = ["sqlite"]


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
