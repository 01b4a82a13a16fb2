"""Signals: SIGTERM drains (readiness false at once, in-flight work finishes, exit 0), a second
signal stops at once (exit 3), and either way a restart finishes the rest: no job lost, none
created twice, no partial file under a final name."""

from __future__ import annotations

import signal
from pathlib import Path

import aiohttp
import anyio
import pytest

from harvester.emulator import Emulator
from tests.emulated import StartEmulator

from .helpers import (
    DaemonProcess,
    ReadyDaemon,
    StartDaemon,
    check_nothing_lost,
    job_line,
    jsonl,
    slow_storage,
    store_status,
)

pytestmark = pytest.mark.anyio


async def submit_and_wait_for_a_harvest(daemon: DaemonProcess, keys: list[str]) -> None:
    status, doc = await daemon.post("/jobs", jsonl(job_line(k) for k in keys))
    assert status == 201, doc
    with anyio.fail_after(20):
        while True:
            for key in keys:
                _, job = await daemon.get(f"/jobs/playment/{key}")
                if job.get("state") == "harvesting":
                    return
            await anyio.sleep(0.05)


async def restart_and_finish(
    start_daemon: StartDaemon,
    config: Path,
    port: int,
    emu: Emulator,
    session: aiohttp.ClientSession,
    keys: list[str],
) -> None:
    emu.state.faults.clear()
    daemon = await start_daemon(config, port)
    await daemon.wait_ready()
    for key in keys:
        job = await daemon.wait_job(key, "harvested")
        assert job["attempts"] == 1
    await check_nothing_lost(emu, session, config, len(keys))
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit(10) == 0


async def test_sigterm_drains_in_flight_work_then_a_restart_finishes_the_rest(
    tmp_path: Path,
    start_emulator: StartEmulator,
    start_daemon: StartDaemon,
    ready_daemon: ReadyDaemon,
    session: aiohttp.ClientSession,
) -> None:
    emu = await start_emulator(slow_storage(1.5))
    grace = 8.0
    # One harvest at a time, so most jobs are still waiting when the signal lands.
    daemon = await ready_daemon(emu, drain_grace_s=grace, harvest_concurrency=1)
    config, port = daemon.config, daemon.port
    keys = [f"drain-{i}" for i in range(6)]
    await submit_and_wait_for_a_harvest(daemon, keys)

    signalled = anyio.current_time()
    daemon.signal(signal.SIGTERM)
    doc = await daemon.wait_not_ready()
    assert doc["reason"].startswith("draining"), doc
    status, _ = await daemon.get("/healthz")
    assert status == 200  # alive while draining: liveness must not kill a drain
    status, doc = await daemon.post("/jobs", jsonl([job_line("late-1")]))
    assert status == 201  # stored for the next start, not lost

    assert await daemon.wait_exit(grace + 5) == 0, daemon.log()
    assert anyio.current_time() - signalled < grace + 2
    events = [e["event"] for e in daemon.events()]
    assert "draining" in events and "drained" in events and "store closed" in events

    counts = (await store_status(config))["providers"]["playment"]
    assert counts.get("harvested", 0) >= 1  # the in-flight harvest was let finish
    assert counts.get("harvested", 0) < len(keys)  # and the rest was left for the restart
    assert counts.get("harvesting", 0) == 0

    await restart_and_finish(start_daemon, config, port, emu, session, [*keys, "late-1"])


@pytest.mark.parametrize(
    ("first", "second"),
    [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)],
    ids=["term-then-int", "int-then-term"],
)
async def test_a_second_signal_stops_at_once_and_loses_nothing(
    tmp_path: Path,
    start_emulator: StartEmulator,
    start_daemon: StartDaemon,
    ready_daemon: ReadyDaemon,
    session: aiohttp.ClientSession,
    first: signal.Signals,
    second: signal.Signals,
) -> None:
    # Downloads slower than the test waits: only the second signal can end this drain.
    emu = await start_emulator(slow_storage(4.0))
    daemon = await ready_daemon(emu, drain_grace_s=30.0, harvest_concurrency=2)
    config, port = daemon.config, daemon.port
    keys = [f"forced-{i}" for i in range(3)]
    await submit_and_wait_for_a_harvest(daemon, keys)

    daemon.signal(first)
    await daemon.wait_not_ready()
    signalled = anyio.current_time()
    daemon.signal(second)
    assert await daemon.wait_exit(5) == 3, daemon.log()
    assert anyio.current_time() - signalled < 2

    doc = await store_status(config)  # --check: the store is intact
    counts = doc["providers"]["playment"]
    assert counts.get("harvested", 0) < len(keys)
    # A cut-off harvest leaves no manifest: a job has one exactly when it is harvested.
    manifests = list((config.parent / "output").rglob("MANIFEST.json"))
    assert len(manifests) == counts.get("harvested", 0)

    await restart_and_finish(start_daemon, config, port, emu, session, keys)
