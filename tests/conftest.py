"""Shared fixtures: the anyio backend for every async test."""

from __future__ import annotations

import pytest
from own_package import bind

bind()  # before any test module imports ``tests.*`` (see own_package)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
