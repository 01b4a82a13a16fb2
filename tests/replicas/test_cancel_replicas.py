"""Cancel with several replicas on one PostgreSQL store: a job another replica holds gets a
cancel request on its row (202 "requested") and its holder cancels it at the provider, once;
a job nobody holds is taken under the lease rules and cancelled by whoever asked. Through
an engine's control path (the daemon's ``DELETE /jobs/...``) and through ``harvester cancel``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import anyio
import pytest
from store.pgserver import PgServer

from harvester.cli_control import cancel as cli_cancel
from harvester.config import Config
from harvester.emulator.server import Emulator
from harvester.engine import Engine
from harvester.jobs import JobState
from harvester.store.postgres import PostgresStore
from tests.control.test_cancel_retry import counts, modzy_status
from tests.integration.test_all_providers import SECRETS, config, jobs_for, scenario

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


def shared(tmp_path: Path, emu: Emulator, server: PgServer) -> Config:
    cfg = config(tmp_path, emu)
    url = server.url(server.create_database("cancel"))
    return dataclasses.replace(
        cfg, store=dataclasses.replace(cfg.store, url=url, path=None, lease_s=3.0)
    )


def opened(cfg: Config, server: PgServer) -> PostgresStore:
    assert cfg.store.url is not None
    return PostgresStore(cfg.store.url, password=server.password)


async def run_cli(
    cfg: Config, server: PgServer, key: str, capsys: pytest.CaptureFixture[str]
) -> dict[str, list[dict[str, object]]]:
    """``harvester cancel --json --provider modzy KEY`` in its own store connection."""
    args = argparse.Namespace(command="cancel", provider="modzy", keys=[key], state=None, json=True)
    capsys.readouterr()
    async with opened(cfg, server) as store:
        assert await cli_cancel(cfg, store, args) == 0
    out = capsys.readouterr().out
    # the JSON document starts at a line of its own, whether or not log lines precede it
    start = re.search(r"^\{$", out, re.MULTILINE)
    assert start is not None, out
    return json.loads(out[start.start() :])  # type: ignore[no-any-return]


async def owners(store: PostgresStore) -> dict[str, str | None]:
    async with store._connection() as conn:
        rows = await conn.fetch("SELECT key, owner FROM jobs ORDER BY key")
    return {str(k): o for k, o in rows}


async def wait_for(store: PostgresStore, key: str, state: JobState) -> None:
    with anyio.fail_after(30):
        while (job := await store.get("modzy", key)) is None or job.state != state:  # noqa: ASYNC110
            await anyio.sleep(0.05)  # polling rows: no event to wait on


async def test_cancel_from_any_replica_and_from_the_cli(
    tmp_path: Path, postgres_server: PgServer, capsys: pytest.CaptureFixture[str]
) -> None:
    async with Emulator(scenario(modzy={"job_duration_s": 60.0})) as emu:
        cfg = shared(tmp_path, emu, postgres_server)
        async with opened(cfg, postgres_server) as store:
            await store.add_jobs(jobs_for("modzy", 3), now=0.0)
            # Every job submitted and running, then the only replica leaves: none is held.
            first, stop = Engine(cfg, store, providers=["modzy"], burst=False), anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: first.run(stop=stop))
                for key in ("modzy-0", "modzy-1", "modzy-2"):
                    await wait_for(store, key, JobState.RUNNING)
                stop.set()
            assert set((await owners(store)).values()) == {None}
            assert list(await owners(store)) == ["modzy-0", "modzy-1", "modzy-2"]

            # Unheld: the CLI takes it and cancels it at the provider itself.
            out = await run_cli(cfg, postgres_server, "modzy-0", capsys)
            assert [d["key"] for d in out["done"]] == ["modzy-0"] and "requested" not in out
            job = await store.get("modzy", "modzy-0")
            assert job is not None and job.state == JobState.CANCELLED
            assert job.cancel_requested_at is None and job.cancelled_by == "user"
            assert (await owners(store))["modzy-0"] is None  # the CLI gave its lease up

            # Held: two replicas; the one asked records the request, the holder serves it.
            a = Engine(cfg, store, providers=["modzy"], burst=False)
            async with opened(cfg, postgres_server) as store_b:
                b = Engine(cfg, store_b, providers=["modzy"], burst=False)
                stop = anyio.Event()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(lambda: a.run(stop=stop))
                    tg.start_soon(lambda: b.run(stop=stop))
                    assert a.replica is not None and b.replica is not None
                    by_id = {a.replica.owner: a, b.replica.owner: b}
                    with anyio.fail_after(30):
                        while None in list((await owners(store)).values())[1:]:  # noqa: ASYNC110
                            await anyio.sleep(0.05)  # polling rows: no event to wait on
                    holder = by_id[str((await owners(store))["modzy-1"])]
                    other = a if holder is b else b
                    req = await other.cancel("modzy", "modzy-1", wait_s=5)
                    assert req.requested and req.error is None
                    assert req.job is not None and req.job.cancel_requested_at is not None
                    assert req.job.state == JobState.RUNNING  # the holder has not acted yet
                    out = await run_cli(cfg, postgres_server, "modzy-2", capsys)
                    assert out["done"] == [] and out["refused"] == []
                    assert [d["key"] for d in out["requested"]] == ["modzy-2"]
                    assert out["requested"][0]["cancel_requested_at"] is not None
                    for key in ("modzy-1", "modzy-2"):
                        await wait_for(store, key, JobState.CANCELLED)
                    stop.set()
            cancels = [counts(e.metrics, "harvester_job_cancels") for e in (a, b)]
            assert [c for c in cancels if c] and all(
                set(c) <= {("modzy", "provider", "cancelled")} for c in cancels
            )
            assert sum(c.get(("modzy", "provider", "cancelled"), 0) for c in cancels) == 2
            jobs = await store.jobs()
            assert {j.key: j.state for j in jobs} == {
                f"modzy-{i}": JobState.CANCELLED for i in range(3)
            }
            assert len({j.remote_id for j in jobs}) == 3  # one remote job each, none twice
            for j in jobs:
                assert j.remote_id is not None and j.past_remote_ids == ()
                assert await modzy_status(emu, j.remote_id) == "CANCELED"
                assert j.reason is not None and "at modzy" in j.reason
                assert (j.cancel_requested_at is not None) == (j.key != "modzy-0")
