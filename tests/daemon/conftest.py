"""Fixtures for the daemon tests: the emulator in this process and daemons that are always
killed at the end of the test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from harvester.emulator import Emulator
from tests.emulated import emulator_fixtures

from .helpers import (
    FAST,
    DaemonProcess,
    ReadyDaemon,
    StartDaemon,
    child_env,
    free_port,
    write_config,
)

start_emulator, session = emulator_fixtures(FAST, timeout_s=10)


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


@pytest.fixture
def ready_daemon(tmp_path: Path, start_daemon: StartDaemon) -> ReadyDaemon:
    """``await ready_daemon(emu, **config)`` -> a daemon on a free port, ready, its config
    ``write_config(tmp_path, emu, port, **config)``; ``env`` adds to its environment."""

    async def start(
        emu: Emulator, *, env: dict[str, str] | None = None, **config: Any
    ) -> DaemonProcess:
        port = free_port()
        daemon = await start_daemon(
            write_config(tmp_path, emu, port, **config), port, **(env or {})
        )
        await daemon.wait_ready()
        return daemon

    return start
