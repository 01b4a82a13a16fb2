"""The status page of replicas sharing a PostgreSQL store: each replica's page lists every
replica, marks itself, and shows the jobs each holds, as the store says."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp.test_utils import TestServer
from integration.helpers import API_KEY, make_config, new_jobs, scenario
from store.pgserver import PgServer

from harvester.api import Api
from harvester.emulator.server import Emulator
from harvester.engine import Engine
from harvester.jobs import JobState
from harvester.store.postgres import PostgresStore

pytestmark = pytest.mark.anyio

LEASE_S = 3.0
JOBS = 12


@pytest.fixture
async def slow_emulator() -> AsyncIterator[Emulator]:
    emu = Emulator(scenario(job_duration_s=60, points_per_frame=300))
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


async def status(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(base + "/status.json") as r:
        assert r.status == 200
        return dict(await r.json())


async def test_each_replica_shows_every_replica_and_what_it_holds(
    tmp_path: Path,
    slow_emulator: Emulator,
    postgres_server: PgServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IT_PLAYMENT_KEY", API_KEY)
    url = postgres_server.url(postgres_server.create_database("status"))
    config = make_config(tmp_path, slow_emulator)
    config = dataclasses.replace(
        config, store=dataclasses.replace(config.store, url=url, path=None, lease_s=LEASE_S)
    )
    stop = anyio.Event()
    async with (
        PostgresStore(url, password=postgres_server.password) as a,
        PostgresStore(url, password=postgres_server.password) as b,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        anyio.create_task_group() as tg,
    ):
        await a.add_jobs(new_jobs(JOBS, frames=1), now=1.0)
        bases = []
        servers = []
        engines = []
        for store in (a, b):
            engine = Engine(config, store, burst=False, drain_grace_s=0.5)
            api = Api(
                config=config,
                store=store,
                engine=engine,
                stopping=stop.is_set,
                jobs_added=lambda: None,
                token=None,
            )
            server = TestServer(api.build_app(), host="127.0.0.1")
            await server.start_server()
            servers.append(server)
            bases.append(str(server.make_url("")).rstrip("/"))
            engines.append(engine)
            tg.start_soon(lambda e=engine: e.run(stop=stop))
        try:
            # Wait until every job runs at the provider and the two replicas hold them all.
            with anyio.fail_after(30):
                while True:
                    doc = await status(session, bases[0])
                    rows = doc["replicas"] or []
                    running = doc["providers"][0]["counts"][JobState.RUNNING.value]
                    if (
                        running == JOBS
                        and len(rows) == 2
                        and sum(r["held_jobs"] for r in rows) == JOBS
                    ):
                        break
                    await anyio.sleep(0.2)
            for base, engine in zip(bases, engines, strict=True):
                doc = await status(session, base)
                assert engine.replica is not None
                me = engine.replica.owner
                assert doc["replica"] == me
                rows = {r["id"]: r for r in doc["replicas"]}
                assert len(rows) == 2 and rows[me]["this"]
                assert all(r["live"] and r["lease_s_left"] > 0 for r in rows.values())
                assert sum(r["held_jobs"] for r in rows.values()) == JOBS
                async with session.get(base + "/") as r:
                    page = await r.text()
                assert 'id="replicas"' in page
                assert all(replica_id in page for replica_id in rows)
                assert f"<code>{me}</code> (this one)" in page
        finally:
            stop.set()
            for server in servers:
                await server.close()
