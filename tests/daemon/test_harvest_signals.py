"""Signals to ``harvester harvest`` (a real subprocess, the emulator in this process): the
first SIGTERM or SIGINT drains (in-flight work finishes, exit 3 with work left), a second one
stops at once (exit 3); either way the store checks clean and a rerun finishes every job,
none created twice, no partial file left. The same ``lifecycle.Shutdown`` as the daemon's
(``test_daemon_drain.py``)."""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from harvester.config import load_config
from harvester.emulator import Emulator
from harvester.lifecycle import Exit
from tests.chaos.harness import read_jobs
from tests.emulated import StartEmulator

from .helpers import (
    DaemonProcess,
    check_nothing_lost,
    child_env,
    cli_process,
    free_port,
    job_line,
    jsonl,
    slow_storage,
    store_status,
    write_config,
)

pytestmark = pytest.mark.anyio
KEYS = [f"sig-{i}" for i in range(6)]


class HarvestProcess(DaemonProcess):
    """``harvester harvest -c CONFIG JOBS --json`` with DaemonProcess's log, signal and wait."""

    def __init__(self, config: Path, jobs: Path, session: aiohttp.ClientSession) -> None:
        super().__init__(config, 0, session, child_env())
        self.log_path = config.parent / "harvest.log"
        self.argv = [sys.executable, "-m", "harvester.cli", "harvest", "-c", str(config)]
        self.argv += [str(jobs), "--json", "--no-progress"]

    async def start(self) -> None:
        self._log_file = self._open_log()
        self.proc = await anyio.open_process(
            self.argv, stdin=None, stdout=None, stderr=self._log_file, env=self.env,
            cwd=self.config.parent,
        )  # fmt: skip


def _states(config: Path) -> list[str]:
    try:
        rows = read_jobs(load_config(config, offline=True))
    except sqlite3.OperationalError as exc:  # the harvest has not made its table yet
        assert "no such table" in str(exc)
        return []
    return [row["state"] for row in rows.values()]


async def states(config: Path) -> list[str]:
    """The jobs' states, read beside the running harvest (off this loop: the emulator's)."""
    return await anyio.to_thread.run_sync(_states, config)


async def start_harvest(
    tmp_path: Path, emu: Emulator, session: aiohttp.ClientSession, *, grace: float
) -> tuple[Path, HarvestProcess]:
    """A harvest of KEYS, one harvest at a time, returned once one is in flight."""
    config = write_config(tmp_path, emu, free_port(), drain_grace_s=grace, harvest_concurrency=1)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(jsonl(job_line(k) for k in KEYS))
    proc = HarvestProcess(config, jobs, session)
    await proc.start()
    with anyio.fail_after(30):
        while "harvesting" not in await states(config):
            assert proc.proc is not None and proc.proc.returncode is None, proc.log()
            await anyio.sleep(0.05)
    return config, proc


async def wait_logged(proc: HarvestProcess, event: str) -> None:
    """The signal is delivered asynchronously: wait until the process says it got it."""
    with anyio.fail_after(5):
        # a log file to read, no event to wait on
        while not any(e.get("event", "").startswith(event) for e in proc.events()):  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def rerun_finishes(
    config: Path, emu: Emulator, session: aiohttp.ClientSession
) -> dict[str, Any]:
    emu.state.faults.clear()
    done = await cli_process("harvest", "-c", str(config), "--json", within_s=60, cwd=config.parent)
    assert done.returncode == Exit.OK, done.stderr.decode()[-3000:]
    assert sorted(await states(config)) == ["harvested"] * len(KEYS)
    await check_nothing_lost(emu, session, config, len(KEYS))
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
async def test_a_signal_drains_a_harvest_and_a_rerun_finishes_it(
    tmp_path: Path,
    start_emulator: StartEmulator,
    session: aiohttp.ClientSession,
    sig: signal.Signals,
) -> None:
    emu = await start_emulator(slow_storage(1.5))
    grace = 8.0
    config, proc = await start_harvest(tmp_path, emu, session, grace=grace)
    try:
        signalled = anyio.current_time()
        proc.signal(sig)
        assert await proc.wait_exit(grace + 5) == Exit.INTERRUPTED, proc.log()
        assert anyio.current_time() - signalled < grace + 2
    finally:
        await proc.kill()
    events = [e["event"] for e in proc.events()]
    assert "draining" in events and "drained" in events, events

    counts = (await store_status(config))["providers"]["playment"]
    assert counts.get("harvested", 0) >= 1  # the in-flight harvest was let finish
    assert counts.get("harvested", 0) < len(KEYS)  # the rest was left for the rerun
    assert counts.get("harvesting", 0) == 0
    await rerun_finishes(config, emu, session)


@pytest.mark.parametrize(
    ("first", "second"),
    [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGINT)],
    ids=["term-then-int", "int-then-int"],
)
async def test_a_second_signal_stops_a_harvest_at_once_and_loses_nothing(
    tmp_path: Path,
    start_emulator: StartEmulator,
    session: aiohttp.ClientSession,
    first: signal.Signals,
    second: signal.Signals,
) -> None:
    # Downloads slower than the test waits: only the second signal can end this drain.
    emu = await start_emulator(slow_storage(4.0))
    config, proc = await start_harvest(tmp_path, emu, session, grace=30.0)
    try:
        proc.signal(first)
        await wait_logged(proc, "signal received: draining")
        signalled = anyio.current_time()
        proc.signal(second)
        assert await proc.wait_exit(5) == Exit.INTERRUPTED, proc.log()
        assert anyio.current_time() - signalled < 2
    finally:
        await proc.kill()
    assert "second signal: stopping now (state is saved)" in [e["event"] for e in proc.events()]

    doc = await store_status(config)  # --check: the store is intact
    counts = doc["providers"]["playment"]
    assert counts.get("harvested", 0) < len(KEYS)
    # A cut-off harvest leaves no manifest: a job has one exactly when it is harvested.
    manifests = list((config.parent / "output").rglob("MANIFEST.json"))
    assert len(manifests) == counts.get("harvested", 0)
    await rerun_finishes(config, emu, session)
