"""Fixtures for the tests against Azurite (see ``server``)."""

from __future__ import annotations

import pytest

from .server import Azurite, shared_azurite


@pytest.fixture(scope="session")
def azurite(request: pytest.FixtureRequest) -> Azurite:
    return shared_azurite(request.config)
