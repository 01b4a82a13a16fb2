"""Fixtures for the shared store suite: every test here runs on every backend in ``BACKENDS``.

The tests only see the ``Store`` protocol, plus ``Backend.make`` (a second instance on the same
database: a restart or another process) and ``Backend.raw`` (SQL behind the store's back).
The PostgreSQL backend needs a server: one is started for the session (``pgserver``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from harvester.store.base import Store

from .backends import BACKENDS, SHARED_BACKENDS, Backend, PostgresBackend, SqliteBackend
from .pgserver import PgServer, shared_server


@pytest.fixture(scope="session")
def postgres_server(request: pytest.FixtureRequest) -> PgServer:
    return shared_server(request.config)


@pytest.fixture(scope="session")
def postgres_database(postgres_server: PgServer) -> str:
    """One database for the store suite; every test makes a schema of its own in it."""
    return postgres_server.create_database("store_suite")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return SqliteBackend(tmp_path)
    if request.param == "postgres":
        return _postgres(request)
    raise AssertionError(f"no fixture for backend {request.param!r}")


@pytest.fixture(params=SHARED_BACKENDS)
def shared_backend(request: pytest.FixtureRequest) -> PostgresBackend:
    if request.param == "postgres":
        return _postgres(request)
    raise AssertionError(f"no fixture for shared backend {request.param!r}")


def _postgres(request: pytest.FixtureRequest) -> PostgresBackend:
    server: PgServer = request.getfixturevalue("postgres_server")
    return PostgresBackend(server, request.getfixturevalue("postgres_database"))


@pytest.fixture
async def store(backend: Backend, anyio_backend: str) -> AsyncIterator[Store]:
    opened = backend.make()
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()
