"""Bentley outputs whose bytes do not match their container listing, end to end.

The emulator's ``corrupt_first_n`` sends the first N blob reads with one byte flipped while
the listing keeps the true Content-Length and Content-MD5: what a damaged transfer or a bad
cache in front of storage looks like. harvester must notice, keep no such file, and try the
job again; a blob that never arrives intact ends the job in error saying why.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from harvester.config import Config, parse_config
from harvester.emulator.scenario import parse_scenario
from harvester.emulator.server import Emulator
from harvester.engine import Engine
from harvester.fsutil import sha256_file
from harvester.jobs import Job, JobState
from harvester.logs import configure
from harvester.store.base import NewJob
from harvester.store.sqlite import SqliteStore

pytestmark = pytest.mark.anyio
OUTPUT = "segmentation2D"
PAYLOAD: dict[str, Any] = {
    "type": "Segmentation2D",
    "iTwinId": "itwin-1",
    "specifications": {
        "inputs": {"photos": "rd-1"},
        "outputs": [OUTPUT],
        "options": {},
    },
}


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IT_BENTLEY_SECRET", "bentley-secret-integrity")


def emulator(corrupt_first_n: int, blob_bytes: int = 5000) -> Emulator:
    bentley = {
        "job_duration_s": 0.2,
        "parts_per_output": 2,
        "blob_bytes": blob_bytes,
        "list_page_size": 2,
        "corrupt_first_n": corrupt_first_n,
    }
    return Emulator(parse_scenario({"seed": 3, "bentley": bentley}))


def config(
    tmp_path: Path,
    emu: Emulator,
    max_attempts: int,
    frame_concurrency: int = 4,
    part_bytes: int = 8 << 20,
) -> Config:
    bentley = {
        "base_url": emu.urls["bentley"],
        "token_url": emu.urls["token"],
        "client_id": "ben",
        "client_secret_env": "IT_BENTLEY_SECRET",
        "rate_per_s": 0,
        "poll_min_s": 0.1,
        "poll_max_s": 0.3,
        "backoff_base_s": 0.05,
        "backoff_max_s": 0.2,
        "request_timeout_s": 5,
    }
    doc = {
        "store": {"url": "sqlite://state.db"},
        "output": {"dir": "out"},
        "harvest": {
            "max_attempts": max_attempts,
            "chunk_bytes": 1024,
            "frame_concurrency": frame_concurrency,
            "part_bytes": part_bytes,
        },
        "providers": {"bentley": bentley},
    }
    return parse_config(doc, source=tmp_path / "config.toml")


async def harvest_one(cfg: Config) -> Job:
    assert cfg.store.path is not None
    async with SqliteStore(cfg.store.path) as store:
        await store.add_jobs([NewJob("bentley", "b-1", "b-1", None, PAYLOAD, "t")], now=0.0)
        with anyio.fail_after(60):
            await Engine(cfg, store, providers=["bentley"]).run()
        (job,) = await store.jobs()
        return job


@pytest.mark.parametrize("ranged", [False, True])
async def test_a_corrupted_blob_is_fetched_again_and_lands_intact(
    tmp_path: Path, ranged: bool
) -> None:
    """Whole, or (``ranged``) each blob in ranged parts fetched in parallel: the MD5 over the
    parts in order catches the damage just the same."""
    log = io.StringIO()
    configure("info", "json", stream=log)
    try:
        async with emulator(corrupt_first_n=1, blob_bytes=40_000 if ranged else 5000) as emu:
            part_bytes = 7000 if ranged else 8 << 20
            job = await harvest_one(config(tmp_path, emu, max_attempts=3, part_bytes=part_bytes))
            assert job.state == JobState.HARVESTED, job.reason
            assert emu.state.stats()["bentley"]["corrupted_reads"] == 1
            reads = [
                r
                for r in emu.state.requests()
                if r["provider"] == "storage" and r["status"] in (200, 206)
            ]
            assert {r["status"] for r in reads if r["path"].endswith(".bin")} == (
                {206} if ranged else {200}
            ), [(r["path"], r["status"]) for r in reads]
            assert job.remote_id is not None
            truth = emu.state.job_truth("bentley", job.remote_id)["outputs"][OUTPUT]["blobs"]
    finally:
        configure("warning", "json")
    folder = tmp_path / "out" / "bentley" / "b-1"
    manifest = json.loads((folder / "MANIFEST.json").read_text())["files"]
    for name, meta in truth.items():
        rel = f"outputs/{OUTPUT}/{name}"
        assert sha256_file(folder / rel) == meta["sha256"] == manifest[rel]["sha256"], name
    # The first attempt failed on the MD5, said so, and was retried.
    retries = [
        json.loads(line) for line in log.getvalue().splitlines() if "the bytes' MD5 is" in line
    ]
    assert retries, log.getvalue()[-2000:]
    assert "the listing says" in retries[0]["reason"] and "(Content-MD5)" in retries[0]["reason"]


async def test_a_blob_that_never_matches_its_md5_ends_the_job_in_error(tmp_path: Path) -> None:
    async with emulator(corrupt_first_n=1000) as emu:
        # One blob at a time, so each attempt reads exactly one (corrupted) blob.
        job = await harvest_one(config(tmp_path, emu, max_attempts=2, frame_concurrency=1))
        assert emu.state.stats()["bentley"]["corrupted_reads"] == 2
    assert job.state == JobState.ERROR
    reason = job.reason or ""
    first = f"outputs/{OUTPUT}/{OUTPUT}/labels.json"  # downloaded first: sorted by path
    assert reason.startswith("harvest failed 2 times; last: bentley job b-1: " + first), reason
    assert "the bytes' MD5 is" in reason and "(Content-MD5)" in reason
    folder = tmp_path / "out" / "bentley" / "b-1"
    assert not (folder / first).exists()  # never kept under its final name
    assert not (folder / "MANIFEST.json").exists()
    assert [p.name for p in folder.rglob("*") if ".tmp-" in p.name] == []
