"""The daemon's control routes over real HTTP: ``DELETE /jobs/{provider}/{key}``,
``POST /jobs/{provider}/{key}/retry`` and ``GET /jobs`` paging, against ``harvester run`` in
a subprocess and the emulator."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from harvester.fsutil import TMP_MARK
from tests.daemon.test_daemon_drain import slow_storage, submit_and_wait_for_a_harvest
from tests.daemon.test_daemon_run import metric_samples
from tests.emulated import StartEmulator

from .helpers import (
    DaemonProcess,
    ReadyDaemon,
    emulator_stats,
    job_line,
    jsonl,
)

pytestmark = pytest.mark.anyio


async def call(daemon: DaemonProcess, method: str, path: str) -> tuple[int, Any]:
    async with daemon.session.request(method, daemon.base + path) as r:
        return r.status, await r.json()


async def all_pages(daemon: DaemonProcess, first: str) -> tuple[list[dict[str, Any]], int]:
    jobs: list[dict[str, Any]] = []
    href: str | None = first
    pages = 0
    while href is not None:
        status, doc = await daemon.get(href)
        assert status == 200, doc
        jobs += doc["jobs"]
        href = doc["next"]
        pages += 1
        assert pages <= 20, "paging does not end"
    return jobs, pages


async def test_cancel_retry_and_list_jobs_over_http(
    tmp_path: Path,
    start_emulator: StartEmulator,
    ready_daemon: ReadyDaemon,
    session: aiohttp.ClientSession,
) -> None:
    emu = await start_emulator({"playment": {"job_duration_s": 120.0}})
    daemon = await ready_daemon(emu)
    keys = [f"ctl-{i}" for i in range(5)]
    status, doc = await daemon.post("/jobs", jsonl(job_line(k) for k in keys))
    assert status == 201, doc
    for key in keys:
        await daemon.wait_job(key, "running")

    # Paging: every job exactly once, in pages of at most `limit`.
    jobs, pages = await all_pages(daemon, "/jobs?limit=2")
    assert sorted(j["key"] for j in jobs) == keys and pages == 3
    status, doc = await daemon.get("/jobs?state=bogus")
    assert status == 400 and "state must be a job state" in doc["error"]
    status, doc = await daemon.get("/jobs?provider=modzy")
    assert status == 400 and "'modzy' is not configured" in doc["error"]
    status, doc = await daemon.get("/jobs?limit=0")
    assert status == 400

    # Cancel: Playment has no cancel, so the job ends here and is never polled again.
    before = await daemon.get("/jobs/playment/ctl-0")
    status, doc = await call(daemon, "DELETE", "/jobs/playment/no-such")
    assert status == 404, doc
    status, doc = await call(daemon, "DELETE", "/jobs/playment/ctl-0")
    assert status == 200, doc
    assert doc["state"] == "cancelled" and doc["cancelled_by"] == "user"
    assert "has no cancel" in doc["reason"]
    assert doc["remote_id"] == before[1]["remote_id"]
    status, again = await call(daemon, "DELETE", "/jobs/playment/ctl-0")
    assert status == 409 and "already ended cancelled" in again["error"]
    assert (await daemon.get("/jobs/playment/ctl-0"))[1] == doc  # the refusal changed nothing

    jobs, _ = await all_pages(daemon, "/jobs?state=cancelled&limit=1")
    assert [j["key"] for j in jobs] == ["ctl-0"]
    jobs, _ = await all_pages(daemon, "/jobs?state=running&state=new&limit=3")
    assert sorted(j["key"] for j in jobs) == keys[1:]

    # Retry: a cancelled remote job only on request, as a new remote attempt.
    status, doc = await call(daemon, "POST", "/jobs/playment/ctl-0/retry")
    assert status == 409 and "--resubmit" in doc["error"]
    status, doc = await call(daemon, "POST", "/jobs/playment/ctl-1/retry")
    assert status == 409 and "still at work" in doc["error"]
    status, doc = await call(daemon, "POST", "/jobs/playment/no-such/retry")
    assert status == 404, doc
    first = before[1]["remote_id"]
    status, doc = await call(daemon, "POST", "/jobs/playment/ctl-0/retry?resubmit=1")
    assert status == 200, doc
    assert doc["state"] == "new" and doc["past_remote_ids"] == [first]
    running = await daemon.wait_job("ctl-0", "running")
    assert running["remote_id"] not in (None, first) and running["remote_attempt"] == 2
    # Every reference created once: the new attempt under its own (ctl-0~2), nothing twice.
    stats = await emulator_stats(emu, session)
    per_reference = stats["playment"]["creates_by_reference"]["proj-daemon"]
    assert per_reference == {**{k: 1 for k in keys}, "ctl-0~2": 1}

    # The controls are counted: one local cancel, one refused (already ended), one resubmit;
    # the refused retries changed nothing and count nothing.
    async with daemon.session.get(daemon.base + "/metrics") as r:
        text = await r.text()
    cancels = {
        (s["provider"], s["where"], s["result"]): v
        for s, v in metric_samples(text, "harvester_job_cancels_total")
    }
    assert cancels == {("playment", "local", "cancelled"): 1, ("playment", "local", "refused"): 1}
    retries = {
        (s["provider"], s["kind"]): v
        for s, v in metric_samples(text, "harvester_job_retries_total")
    }
    assert retries == {("playment", "resubmit"): 1}
    assert metric_samples(text, "harvester_job_timeouts_total") == []


async def test_a_cancel_racing_the_daemons_own_harvest_is_refused_and_loses_nothing(
    tmp_path: Path,
    start_emulator: StartEmulator,
    ready_daemon: ReadyDaemon,
    session: aiohttp.ClientSession,
) -> None:
    # Every download takes 2 s, so the DELETE lands while the daemon is harvesting the job.
    emu = await start_emulator(slow_storage(2.0))
    daemon = await ready_daemon(emu)
    await submit_and_wait_for_a_harvest(daemon, ["race-0"])
    status, doc = await call(daemon, "DELETE", "/jobs/playment/race-0")
    assert status == 409, doc
    assert "already finished at the provider and is being harvested" in doc["error"]
    status, during = await daemon.get("/jobs/playment/race-0")
    assert status == 200 and during["state"] == "harvesting", during  # the race was real

    job = await daemon.wait_job("race-0", "harvested")
    assert job["cancelled_by"] is None and job["reason"] is None
    stats = await emulator_stats(emu, session)
    assert stats["playment"]["creates_by_reference"]["proj-daemon"] == {"race-0": 1}
    # Whole: every file the MANIFEST names is there, nothing staged is left over.
    folder = Path(job["output"])
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["files"]
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"])
    assert [p for p in (tmp_path / "output").rglob(f"*{TMP_MARK}*")] == []
    async with daemon.session.get(daemon.base + "/metrics") as r:
        text = await r.text()
    refused = metric_samples(text, "harvester_job_cancels_total")
    assert refused == [({"provider": "playment", "where": "local", "result": "refused"}, 1.0)]
