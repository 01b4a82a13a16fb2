"""Replicas whose wall clocks disagree, on a real PostgreSQL: leases are timed by the
database's clock, so a replica 600 s ahead (or behind) neither takes over another's jobs nor
has its own taken, and a create in flight is never reconciled behind its sender's back.

Cognite, Bentley and Modzy offer no lookup: a ``submitting`` job claimed by a second replica
while the first one's POST is still out ends in error (``on_lost_create = "fail"``) or is
created twice (``"resubmit"``). Creates are slowed down here so they are in flight when the
skewed replica starts claiming.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from chaos.harness import SECRETS, job_lines, scenario, scopes, write_config
from store.pgserver import PgServer

from harvester.clock import SystemClock
from harvester.config import Config, load_config
from harvester.emulator.server import Emulator
from harvester.engine import Engine
from harvester.jobs import JobState, job_key
from harvester.store.base import NewJob
from harvester.store.postgres import PostgresStore

pytestmark = pytest.mark.anyio

LEASE_S = 3.0
SKEW_S = 600.0
PER_PROVIDER = 4
CREATE_DELAY_S = 2.5
#: the create routes (the slow fault counts only its first PER_PROVIDER hits: the creates)
CREATE_PATHS = {
    "cognite": "/context/vision/segment",
    "bentley": "/reality-analysis/jobs",
    "modzy": "/api/jobs",
}


class SkewedClock(SystemClock):
    """The real clock, but its wall time is off by ``offset`` seconds (a replica whose NTP
    is broken). Monotonic time, which deadlines use, is untouched."""

    __slots__ = ("offset",)

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def wall(self) -> float:
        return time.time() + self.offset


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    slow = [
        {"kind": "slow", "provider": p, "match": path, "count": PER_PROVIDER}
        | {"delay_s": CREATE_DELAY_S}
        for p, path in CREATE_PATHS.items()
    ]
    emu = Emulator(scenario({"faults": slow}))
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


def shared_config(tmp_path: Path, emu: Emulator, url: str) -> Config:
    path = write_config(
        tmp_path,
        emu.urls,
        "skew",
        providers=tuple(CREATE_PATHS),
        provider={"on_lost_create": "fail"},
    )
    config = load_config(path)
    store = dataclasses.replace(config.store, url=url, path=None, lease_s=LEASE_S)
    return dataclasses.replace(config, store=store)


def new_jobs(lines: list[dict[str, Any]]) -> list[NewJob]:
    return [
        NewJob(
            ln["provider"],
            job_key(ln["reference_id"]),
            ln["reference_id"],
            None,
            ln["payload"],
            "t",
        )
        for ln in lines
    ]


@pytest.mark.parametrize(
    ("first_offset", "second_offset"),
    [(0.0, SKEW_S), (-SKEW_S, 0.0)],
    ids=["second-replica-ahead", "first-replica-behind"],
)
async def test_skewed_replicas_take_nothing_from_each_other(
    tmp_path: Path,
    emulator: Emulator,
    postgres_server: PgServer,
    monkeypatch: pytest.MonkeyPatch,
    first_offset: float,
    second_offset: float,
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    url = postgres_server.url(postgres_server.create_database("skew"))
    config = shared_config(tmp_path, emulator, url)
    lines = job_lines("skew", playment=0, others=PER_PROVIDER)
    jobs = new_jobs(lines)
    password = postgres_server.password
    async with (
        PostgresStore(url, password=password) as a,
        PostgresStore(url, password=password) as b,
    ):
        await a.add_jobs(jobs, now=time.time())
        first = Engine(config, a, burst=True, clock=SkewedClock(first_offset))
        second = Engine(config, b, burst=True, clock=SkewedClock(second_offset))
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first.run)
                # The first replica has claimed every job and its creates are in flight ...
                while await a.counts() != {  # noqa: ASYNC110
                    (p, JobState.SUBMITTING): PER_PROVIDER for p in CREATE_PATHS
                }:
                    await anyio.sleep(0.05)
                # ... when the second one starts, its clock 600 s apart from the first's.
                tg.start_soon(second.run)
        rows = await a.jobs()
    ended = {f"{j.provider}/{j.key}": (j.state.value, j.reason) for j in rows}
    bad = {job: how for job, how in ended.items() if how[0] != "harvested"}
    assert not bad, f"{len(bad)} of {len(ended)} jobs not harvested: {bad}"
    stats = emulator.state.stats()
    for provider, scope in scopes(lines, "skew").items():
        if provider not in CREATE_PATHS:
            continue
        creates = stats[provider]["creates_by_reference"].get(scope, {})
        assert sorted(creates.values()) == [1] * PER_PROVIDER, (provider, creates)
    assert first.fatal is None and second.fatal is None
