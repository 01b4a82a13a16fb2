"""The real engine on virtual time against Playment in memory (``harvester.testing``).

No sockets and no real sleeps: the ``FakeClock`` jumps from one wake-up to the next once every
task waits, so a run of minutes of virtual time takes milliseconds, and it is the same run
every time (one seeded ``random.Random`` for the engine's jitter).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from harvester.clock import FakeClock
from harvester.config import Config, parse_config
from harvester.emulator.scenario import BentleyScenario, ModzyScenario
from harvester.engine import Engine
from harvester.jobs import Job, job_key
from harvester.store.base import NewJob
from harvester.store.sqlite import SqliteStore
from harvester.testing.bentley import MemoryBentley
from harvester.testing.modzy import MemoryModzy
from harvester.testing.network import MemoryNetwork, MemoryRequest
from harvester.testing.playment import MemoryPlayment
from harvester.testing.virtual import run_until, threads_inline

API_KEY = "engine-test-key"
PROJECT = "engine-project"
BENTLEY_SECRET = "engine-bentley-secret"


class Rig:
    def __init__(self, tmp_path: Path, store: SqliteStore) -> None:
        self.tmp_path = tmp_path
        self.store = store
        self.clock = FakeClock(start=1000.0)
        self.network = MemoryNetwork(self.clock)
        self.playment: MemoryPlayment | None = None
        self.bentley: MemoryBentley | None = None
        self.modzy: MemoryModzy | None = None
        self.provider: dict[str, Any] = {}

    def setup(self, *, job_duration_s: float = 10.0, **provider: Any) -> Config:
        self.playment = MemoryPlayment(self.clock, job_duration_s=job_duration_s)
        self.playment.mount(self.network)
        section: dict[str, Any] = {
            "base_url": self.playment.api,
            "api_key_env": "ENGINE_TEST_PLAYMENT_KEY",
            "project_id": PROJECT,
            "rate_per_s": 0,
            "burst": 50,
            "max_concurrency": 4,
            "poll_min_s": 1,
            "poll_max_s": 8,
            "backoff_base_s": 0.5,
            "backoff_max_s": 4,
        }
        section.update(provider)
        return self._config("playment", section)

    def setup_bentley(self, scenario: BentleyScenario, **provider: Any) -> Config:
        """Bentley in memory, with Bentley's own polling defaults (``poll_min_s`` 15,
        ``poll_max_s`` 120) unless ``provider`` overrides them."""
        self.bentley = MemoryBentley(
            self.clock, client_id="engine-client", client_secret=BENTLEY_SECRET, scenario=scenario
        )
        self.bentley.mount(self.network)
        section: dict[str, Any] = {
            "base_url": self.bentley.api,
            "token_url": self.bentley.tokens.url,
            "client_id": "engine-client",
            "client_secret_env": "ENGINE_TEST_BENTLEY_SECRET",
            "rate_per_s": 0,
            "burst": 50,
            "max_concurrency": 4,
            "backoff_base_s": 0.5,
            "backoff_max_s": 4,
        }
        section.update(provider)
        return self._config("bentley", section)

    def setup_modzy(
        self, scenario: ModzyScenario, *, harvest: dict[str, Any] | None = None, **provider: Any
    ) -> Config:
        self.modzy = MemoryModzy(self.clock, scenario=scenario).mount(self.network)
        section: dict[str, Any] = {
            "base_url": self.modzy.api,
            "api_key_env": "ENGINE_TEST_MODZY_KEY",
            "rate_per_s": 0,
            "burst": 50,
            "max_concurrency": 4,
            "poll_min_s": 5,
            "poll_max_s": 30,
            "backoff_base_s": 0.5,
            "backoff_max_s": 4,
        }
        section.update(provider)
        return self._config("modzy", section, harvest)

    def _config(
        self, name: str, section: dict[str, Any], harvest: dict[str, Any] | None = None
    ) -> Config:
        doc = {
            "store": {"url": "sqlite://state.db"},
            "output": {"dir": "out"},
            "harvest": {"concurrency": 2, "chunk_bytes": 4096, **(harvest or {})},
            "log": {"level": "warning", "format": "json"},
            "providers": {name: section},
        }
        self.config = parse_config(doc, source=self.tmp_path / "config.toml")
        return self.config

    def engine(self, **kw: Any) -> Engine:
        return Engine(
            self.config,
            self.store,
            clock=self.clock,
            exchanges=self.network,
            rng=random.Random(1),
            **kw,
        )

    async def add(self, n: int, *, frames: int = 2) -> list[NewJob]:
        jobs = [
            NewJob(
                "playment",
                job_key(f"scan-{i:03d}"),
                f"scan-{i:03d}",
                None,
                {
                    "data": {
                        "sensor_data": {
                            "frames": [
                                {"frame_id": f"f-{j:03d}", "sensors": []} for j in range(frames)
                            ],
                            "sensor_meta": [],
                        }
                    },
                    "work_flow_id": "wf",
                },
                f"test:{i + 1}",
            )
            for i in range(n)
        ]
        await self.store.add_jobs(jobs, now=self.clock.wall())
        return jobs

    async def run(
        self,
        engine: Engine,
        *,
        within_s: float,
        stop_when: Callable[[], bool] | None = None,
    ) -> float:
        """Run ``engine`` to its end on virtual time (stopping it once ``stop_when()``);
        the virtual seconds it took."""
        start = self.clock.monotonic()
        stop, finished = anyio.Event(), anyio.Event()

        async def main() -> None:
            try:
                await engine.run(stop=stop)
            finally:
                finished.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(main)
            if stop_when is not None:
                await run_until(
                    self.clock, lambda: stop_when() or finished.is_set(), within_s=within_s
                )
                stop.set()
            await run_until(self.clock, finished.is_set, within_s=within_s)
        return self.clock.monotonic() - start

    async def job(self, key: str, provider: str = "playment") -> Job:
        job = await self.store.get(provider, key)
        assert job is not None
        return job

    def api_requests(self, method: str | None = None, suffix: str = "") -> list[MemoryRequest]:
        assert self.playment is not None
        return [
            r
            for r in self.network.sent
            if r.url.startswith(self.playment.api)
            and (method is None or r.method == method)
            and r.path.endswith(suffix)
        ]

    def check_labels(self, jobs: list[NewJob], frames: int) -> None:
        """Every harvested label array equals the emulator's truth for it."""
        assert self.playment is not None
        for new in jobs:
            assert new.reference_id is not None
            remote = self.playment.job_by_reference(PROJECT, new.reference_id)
            assert remote is not None
            folder = self.config.output.dir / "playment" / new.key
            for i in range(frames):
                arr = np.load(folder / "labels" / f"f-{i:03d}.npy")
                assert np.array_equal(arr, self.playment.results.labels(remote, i)), (new.key, i)


@pytest.fixture
async def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    monkeypatch.setenv("ENGINE_TEST_PLAYMENT_KEY", API_KEY)
    monkeypatch.setenv("ENGINE_TEST_BENTLEY_SECRET", BENTLEY_SECRET)
    monkeypatch.setenv("ENGINE_TEST_MODZY_KEY", "engine-modzy-key")
    monkeypatch.chdir(tmp_path)
    with threads_inline():
        async with SqliteStore(tmp_path / "state.db") as store:
            yield Rig(tmp_path, store)
