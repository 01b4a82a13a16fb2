"""Fixtures for the shared store suite: every test here runs on every backend in ``BACKENDS``.

The tests only see the ``Store`` protocol, plus ``Backend.make`` (a second instance on the same
database: a restart or another process) and ``Backend.raw`` (SQL behind the store's back).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from harvester.store.base import Store

from .backends import BACKENDS, Backend, SqliteBackend


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return SqliteBackend(tmp_path)
    raise AssertionError(f"no fixture for backend {request.param!r}")


@pytest.fixture
async def store(backend: Backend, anyio_backend: str) -> AsyncIterator[Store]:
    opened = backend.make()
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()
