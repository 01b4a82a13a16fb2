"""Fixtures for the replica tests: the session's PostgreSQL server (shared with tests/store)."""

from __future__ import annotations

import pytest
from store.pgserver import PgServer, shared_server


@pytest.fixture(scope="session")
def postgres_server(request: pytest.FixtureRequest) -> PgServer:
    return shared_server(request.config)
