"""Fixtures for the daemon tests: the emulator in this process and daemons that are always
killed at the end of the test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.emulated import StartEmulator, emulators

from .helpers import FAST, DaemonProcess, StartDaemon, child_env


@pytest.fixture
async def start_emulator() -> AsyncIterator[StartEmulator]:
    async with emulators(FAST) as start:
        yield start


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
