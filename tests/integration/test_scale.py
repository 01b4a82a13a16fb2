"""Scale properties that must hold whatever the machine: bounded memory, bounded tasks.

The emulator runs in another process here, so the memory traced in this process is the
harvester's own.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest

from harvester.config import parse_config
from harvester.emulator import truth
from harvester.engine import Engine
from harvester.jobs import JobState
from harvester.store.base import NewJob
from harvester.store.sqlite import SqliteStore

from .helpers import API_KEY, emulator_process, payload

REPO = Path(__file__).resolve().parents[2]
BIG_POINTS = 3_000_000


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[dict[str, str]]:
    scenario = (
        "seed = 5\n[playment]\njob_duration_s = 0.2\n"
        f"points_per_frame = [{BIG_POINTS}, {BIG_POINTS}]\nnum_labels = 60\n"
        "[storage]\nchunk_size = 65536\n"
    )
    with emulator_process(tmp_path, scenario) as urls:
        yield urls


def config_for(tmp_path: Path, urls: dict[str, str], **harvest: int) -> object:
    doc = {
        "store": {"url": "sqlite://state.db"},
        "output": {"dir": "out"},
        "harvest": {"concurrency": 2, "chunk_bytes": 65536, **harvest},
        "providers": {
            "playment": {
                "base_url": urls["playment"],
                "api_key_env": "SCALE_KEY",
                "project_id": "scale",
                "rate_per_s": 0,
                "poll_min_s": 0.1,
                "poll_max_s": 0.3,
                "max_concurrency": 8,
            }
        },
    }
    return parse_config(doc, source=tmp_path / "c.toml")


@pytest.mark.anyio
async def test_a_large_mask_is_streamed_never_held_whole(
    tmp_path: Path, emulator: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCALE_KEY", API_KEY)
    cfg = config_for(tmp_path, emulator)
    body_bytes = len(truth.format_mask(np.full(BIG_POINTS, 10, dtype=np.uint16)))
    assert body_bytes > 9_000_000  # a 3,000,000-point mask is about 10 MB of text
    job = NewJob("playment", "big", "big", None, payload(1), "t")
    async with SqliteStore(cfg.store.path) as store:  # type: ignore[attr-defined]
        await store.add_jobs([job], now=0.0)
        engine = Engine(cfg, store, burst=True)  # type: ignore[arg-type]
        tracemalloc.start()
        try:
            with anyio.fail_after(60):
                await engine.run()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        (done,) = await store.jobs()
    assert done.state == JobState.HARVESTED, done.reason
    arr = np.load(tmp_path / "out" / "playment" / "big" / "labels" / "f-000.npy")
    expected = truth.frame_labels(5, "big", "f-000", BIG_POINTS, 60)
    assert np.array_equal(arr, expected)
    # Held whole, the body alone would be ~10 MB (and its uint32 labels 12 MB more); streamed
    # in 64 KiB chunks through the decoder to a staging file, the peak stays far below.
    cap = body_bytes // 2
    assert peak < cap, f"peak traced memory {peak} bytes, cap {cap}"


@pytest.mark.anyio
async def test_task_count_does_not_grow_with_the_number_of_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs cost memory in the due queues, not tasks: 50 and 1,500 tracked jobs run on the
    same bounded set of tasks (workers per lane + harvest workers + a few fixed ones)."""
    from harvester.emulator.scenario import parse_scenario
    from harvester.emulator.server import Emulator

    monkeypatch.setenv("SCALE_KEY", API_KEY)
    peaks: dict[int, int] = {}
    for n in (50, 1500):
        folder = tmp_path / str(n)
        sc = parse_scenario({"playment": {"job_duration_s": 60.0, "points_per_frame": 10}})
        async with Emulator(sc) as emu:
            cfg = config_for(folder, emu.urls)
            async with SqliteStore(cfg.store.path) as store:  # type: ignore[attr-defined]
                jobs = [
                    NewJob("playment", f"j{i}", f"j{i}", None, payload(1), "t") for i in range(n)
                ]
                await store.add_jobs(jobs, now=0.0)
                engine = Engine(cfg, store, burst=True)  # type: ignore[arg-type]
                stop = anyio.Event()
                peak = 0

                async def sample(
                    engine: Engine = engine, stop: anyio.Event = stop, n: int = n
                ) -> None:
                    nonlocal peak
                    with anyio.fail_after(60):
                        await engine.ready.wait()
                        # until every job was created and polled at least once
                        while sum(1 for r in emu.state.requests() if "/jobs/" in r["path"]) < n:
                            peak = max(peak, len(asyncio.all_tasks()))
                            await anyio.sleep(0.02)
                    stop.set()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(sample)
                    await engine.run(stop=stop)
                peaks[n] = peak
    # 30x the jobs, the same tasks give or take a few transient ones (aiohttp connections,
    # store threads); one task per job would mean 1,500 more.
    assert peaks[1500] < peaks[50] + 10, peaks
    assert peaks[1500] < 60, peaks  # 8 lane workers, 2 harvesters, fixed and transient ones
