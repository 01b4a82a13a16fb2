"""What the suite needs from the machine (PostgreSQL, Azurite, a container engine, a browser):
skipped with the reason on a developer's machine that lacks it, a failure where the
``HARVESTER_REQUIRE_*`` variable says it must be there (``.ci/run`` sets them all)."""

from __future__ import annotations

import os
from typing import NoReturn, Protocol, TypeVar

import pytest


def unavailable(need: str, require_env: str, why: str) -> NoReturn:
    """Stop the test: ``need`` (e.g. "Azurite") is missing because ``why``."""
    if os.environ.get(require_env):
        pytest.fail(f"{need} is required here ({require_env} is set) but {why}")
    pytest.skip(f"needs {need}: {why}")


class _Server(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


S = TypeVar("S", bound=_Server)


def start_for_session(server: S, config: pytest.Config) -> S:
    """Start ``server`` for the rest of the session: stopped at its end, or at once if the
    start fails half-way."""
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    config.add_cleanup(server.stop)
    return server
