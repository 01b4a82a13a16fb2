"""Fixtures for the daemon tests: the emulator in this process and daemons that are always
killed at the end of the test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from harvester.emulator import Emulator
from harvester.emulator.scenario import parse_scenario

from .helpers import FAST, DaemonProcess, StartDaemon, StartEmulator, child_env, merged


@pytest.fixture
async def start_emulator() -> AsyncIterator[StartEmulator]:
    started: list[Emulator] = []

    async def start(overrides: dict[str, Any] | None = None) -> Emulator:
        emu = Emulator(parse_scenario(merged(FAST, overrides or {})))
        await emu.start()
        started.append(emu)
        return emu

    yield start
    for emu in started:
        await emu.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        yield s


@pytest.fixture
async def start_daemon(session: aiohttp.ClientSession) -> AsyncIterator[StartDaemon]:
    """``await start_daemon(config, port)`` -> a started (not yet ready) daemon; every daemon
    still running at the end of the test is killed."""
    started: list[DaemonProcess] = []

    async def start(
        config: Path, port: int, *, nofile: int | None = None, **env: str
    ) -> DaemonProcess:
        daemon = DaemonProcess(config, port, session, child_env(**env), nofile=nofile)
        started.append(daemon)
        await daemon.start()
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            await daemon.kill()
