"""Shared set-up for integration tests: a config pointing at an emulator, jobs, checks."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from harvester.config import Config, parse_config
from harvester.emulator.scenario import Scenario, parse_scenario
from harvester.emulator.server import Emulator
from harvester.engine import Engine
from harvester.fsutil import sha256_file
from harvester.jobs import JobState, job_key
from harvester.store.base import NewJob
from harvester.store.sqlite import SqliteStore

API_KEY = "it-key-0123456789-marker"
REPO = Path(__file__).resolve().parents[2]
#: a provider lane that waits as little as possible: polls, backoff and timeouts all short
FAST_LANE: dict[str, Any] = {
    "rate_per_s": 0,
    "max_concurrency": 8,
    "poll_min_s": 0.1,
    "poll_max_s": 0.5,
    "request_timeout_s": 5,
    "backoff_base_s": 0.05,
    "backoff_max_s": 0.5,
}


def playment_lane(base_url: str, **extra: Any) -> dict[str, Any]:
    """A ``[providers.playment]`` table for the emulator's project at ``base_url``, polled
    often; ``extra`` adds to it or overrides."""
    return {
        "base_url": base_url,
        "api_key_env": "IT_PLAYMENT_KEY",
        "project_id": "it-project",
        "rate_per_s": 0,
        "poll_min_s": 0.1,
        "poll_max_s": 0.5,
        **extra,
    }


def config_toml(**tables: dict[str, Any]) -> str:
    """A config file's text: ``[store]`` (a sqlite file beside it) and ``[output]`` (``out``)
    unless given, then every table given; ``providers={name: {...}}`` becomes one
    ``[providers.NAME]`` table each. Values are spelled by ``json.dumps``, which spells
    strings, numbers, booleans and lists as TOML does."""
    doc: dict[str, dict[str, Any]] = {
        "store": {"url": "sqlite://state.db"},
        "output": {"dir": "out"},
        **tables,
    }
    named = [(name, table) for name, table in doc.items() if name != "providers"]
    named += [(f"providers.{p}", t) for p, t in doc.get("providers", {}).items()]
    return "\n".join(
        f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
        for name, table in named
    )


@contextmanager
def emulator_process(folder: Path, scenario_toml: str) -> Iterator[dict[str, str]]:
    """``harvester emulator --port 0`` as a user runs it, with a scenario; yields its URLs."""
    scenario = folder / "scenario.toml"
    scenario.write_text(scenario_toml)
    errors = folder / "emulator.stderr"  # a file, not a pipe: nothing can fill up and block
    cmd = [sys.executable, "-m", "harvester.cli", "emulator", "--port", "0"]
    with errors.open("w") as err:
        proc = subprocess.Popen(
            [*cmd, "--scenario", str(scenario)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=REPO,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, errors.read_text() or "no output"
        yield json.loads(line)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def scenario(**playment: Any) -> Scenario:
    base: dict[str, Any] = {"job_duration_s": 0.3, "points_per_frame": [2000, 4000]}
    base.update(playment.pop("_playment", {}))
    storage = playment.pop("_storage", {})
    base.update(playment)
    return parse_scenario({"seed": 7, "playment": base, "storage": storage})


def make_config(
    tmp_path: Path,
    emulator: Emulator,
    *,
    output: dict[str, Any] | None = None,
    harvest: dict[str, Any] | None = None,
    **provider: Any,
) -> Config:
    section = playment_lane(emulator.urls["playment"], burst=50, **FAST_LANE)
    section.update(provider)
    doc = {
        "store": {"url": "sqlite://state.db"},
        "output": output or {"dir": "out"},
        "harvest": {"concurrency": 4, "chunk_bytes": 4096, **(harvest or {})},
        "log": {"level": "warning", "format": "json"},
        "providers": {"playment": section},
    }
    return parse_config(doc, source=tmp_path / "config.toml")


@asynccontextmanager
async def stored(
    config: Config, jobs: Sequence[NewJob], *, now: float = 0.0
) -> AsyncIterator[SqliteStore]:
    """``config``'s sqlite store, open for the block, with ``jobs`` added to it."""
    assert config.store.path is not None
    async with SqliteStore(config.store.path) as store:
        if jobs:
            await store.add_jobs(list(jobs), now=now)
        yield store


async def harvest_burst(
    config: Config, jobs: Sequence[NewJob], *, limit_s: float = 60.0, now: float = 0.0
) -> tuple[dict[JobState, int], Engine]:
    """Add ``jobs`` and run the engine in burst mode to its end (within ``limit_s``): the
    store's counts by state, and the engine (its metrics)."""
    async with stored(config, jobs, now=now) as store:
        engine = Engine(config, store, burst=True)
        with anyio.fail_after(limit_s):
            await engine.run()
        counts = await store.counts()
    return {state: n for (_, state), n in counts.items()}, engine


def payload(frames: int) -> dict[str, Any]:
    return {
        "data": {
            "sensor_data": {
                "frames": [{"frame_id": f"f-{i:03d}", "sensors": []} for i in range(frames)],
                "sensor_meta": [],
            }
        },
        "work_flow_id": "wf-it",
    }


def new_jobs(n: int, *, frames: int = 2, prefix: str = "scan") -> list[NewJob]:
    return [
        NewJob(
            "playment",
            job_key(f"{prefix}-{i:03d}"),
            f"{prefix}-{i:03d}",
            None,
            payload(frames),
            f"test:{i + 1}",
        )
        for i in range(n)
    ]


def jobs_file(path: Path, jobs: list[NewJob]) -> Path:
    lines = [
        json.dumps({"provider": j.provider, "reference_id": j.reference_id, "payload": j.payload})
        for j in jobs
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def check_outputs(config: Config, emulator: Emulator, jobs: list[NewJob], frames: int) -> None:
    """Every label array equals the emulator's ground truth; every manifest entry is true."""
    for job in jobs:
        folder = config.output.dir / "playment" / job.key
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        assert manifest["reference_id"] == job.reference_id
        files = manifest["files"]
        assert {"job.json", "result.json", "classes.json"} <= set(files)
        for rel, entry in files.items():
            path = folder / rel
            assert path.stat().st_size == entry["bytes"], rel
            assert sha256_file(path) == entry["sha256"], rel
        for i in range(frames):
            frame = f"f-{i:03d}"
            assert job.reference_id is not None
            truth = emulator.state.truth_labels("playment", job.reference_id, frame)
            arr = np.load(folder / "labels" / f"{frame}.npy")
            assert arr.ndim == 1
            assert np.array_equal(arr, truth), (job.key, frame)
            entry = files[f"labels/{frame}.npy"]
            assert entry["shape"] == [len(truth)]
            assert entry["max"] == int(truth.max()) and entry["min"] == int(truth.min())
            assert arr.dtype == np.dtype(entry["dtype"])
            assert arr.dtype.itemsize == (1 if truth.max() < 256 else 2)
        leftovers = [p for p in folder.rglob("*") if ".tmp-" in p.name]
        assert leftovers == []
