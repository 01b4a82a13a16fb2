"""The emulator in the test's own event loop, shared by the suites that start it that way
(``tests/emulator``, ``tests/daemon``): a scenario as the suite's fast defaults plus a test's
overrides, a starter that stops every emulator it started when the test ends, and the two
fixtures such a suite's conftest declares (``emulator_fixtures``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from harvester.emulator import Emulator
from harvester.emulator.scenario import parse_scenario

StartEmulator = Callable[..., Awaitable[Emulator]]


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it, nested tables merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


@asynccontextmanager
async def emulators(defaults: dict[str, Any]) -> AsyncIterator[StartEmulator]:
    """``async with emulators(FAST) as start:`` ``await start({...overrides...})`` -> a started
    emulator; all of them are stopped when the block ends."""
    started: list[Emulator] = []

    async def start(overrides: dict[str, Any] | None = None) -> Emulator:
        emu = Emulator(parse_scenario(merged(defaults, overrides or {})))
        await emu.start()
        started.append(emu)
        return emu

    try:
        yield start
    finally:
        for emu in started:
            await emu.stop()


def emulator_fixtures(defaults: dict[str, Any], *, timeout_s: float) -> tuple[Any, Any]:
    """A suite's ``start_emulator`` fixture (emulators on ``defaults`` plus a test's overrides)
    and its ``session`` fixture (an HTTP client whose every request ends within
    ``timeout_s``), for its conftest: ``start_emulator, session = emulator_fixtures(...)``."""

    @pytest.fixture
    async def start_emulator() -> AsyncIterator[StartEmulator]:
        """``await start_emulator({...scenario overrides...})`` -> a started emulator."""
        async with emulators(defaults) as start:
            yield start

    @pytest.fixture
    async def session() -> AsyncIterator[aiohttp.ClientSession]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
            yield s

    return start_emulator, session
