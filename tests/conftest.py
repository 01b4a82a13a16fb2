"""Shared fixtures: the anyio backend for every async test; logging restored after each."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog
from own_package import bind

bind()  # before any test module imports ``tests.*`` (see own_package)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """A test that configures logging (``cli.main`` in-process, a buffer to read) must not
    leave the next test logging to its captured stderr, closed by then."""
    saved = structlog.get_config()
    try:
        yield
    finally:
        structlog.configure(**saved)
