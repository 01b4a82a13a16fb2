"""Three ``harvester run`` replicas on one PostgreSQL job table, one of them SIGKILLed mid-run.

The emulator and the replicas are real subprocesses (the emulator apart from this test's
event loop, so a pause here cannot bunch its request timestamps); the replicas have their own
ports and share the store and one output folder (as pods share a ReadWriteMany volume: any replica
may harvest any job, so every replica must see every job's folder). 1,000 tiny Playment jobs
are added with ``harvester submit``. Whatever the killed replica held (jobs being submitted,
polled, downloaded) is taken over by the others once its lease expires. Then:

- every job is harvested exactly once: one ``harvested`` transition across all logs, one
  MANIFEST per job, no temporary file left, the store consistent;
- the emulator saw exactly 1,000 creates, no duplicate, one remote job per reference id;
- the replicas together never exceeded the provider's configured rate (measured from the
  emulator's own request timestamps, sliding 1 s windows).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from anyio.abc import Process
from daemon.helpers import DaemonProcess, child_env, cli_process, free_port, job_line, jsonl
from store.pgserver import PgServer

from harvester.jobs import ACTIVE, JobState
from harvester.store.postgres import PostgresStore
from tests.integration.helpers import config_toml

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

JOBS = 1000
REPLICAS = 3
RATE = 200.0  #: providers.playment.rate_per_s, for all replicas together
BURST = 4
LEASE_S = 4.0
KILL_AT = 0.3  #: fraction of the jobs harvested when one replica is killed
PASSWORD_ENV = "HARVESTER_DB_PASSWORD"


SCENARIO = """
seed = 3
[playment]
job_duration_s = 0.5
points_per_frame = 200
"""


def replica_config(folder: Path, *, url: str, emu: dict[str, str], port: int, output: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "harvester.toml"
    playment = {
        "base_url": emu["playment"],
        "api_key_env": "PLAYMENT_API_KEY",
        "project_id": "proj-replicas",
        "rate_per_s": RATE,
        "burst": BURST,
        "max_concurrency": 48,
        "poll_min_s": 0.2,
        "poll_max_s": 1,
        "request_timeout_s": 10,
    }
    config.write_text(
        config_toml(
            store={"url": url, "password_env": PASSWORD_ENV, "lease_s": LEASE_S},
            output={"dir": str(output)},
            server={"listen": f"127.0.0.1:{port}", "drain_grace_s": 5},
            harvest={"concurrency": 8},
            log={"level": "info", "format": "json"},
            providers={"playment": playment},
        )
    )
    return config


def max_per_window(times: list[float], window: float = 1.0) -> tuple[int, float]:
    """The most events in any interval of ``window`` seconds, and where it starts."""
    times = sorted(times)
    best, at, lo = 0, 0.0, 0
    for hi, t in enumerate(times):
        while t - times[lo] > window:
            lo += 1
        if hi - lo + 1 > best:
            best, at = hi - lo + 1, times[lo]
    return best, at


async def start_emulator(folder: Path, env: dict[str, str]) -> tuple[Process, dict[str, str]]:
    """``harvester emulator`` in a subprocess; its URLs from the one line it prints."""
    scenario = folder / "scenario.toml"
    scenario.write_text(SCENARIO)
    argv = [sys.executable, "-m", "harvester.cli", "emulator", "--host", "127.0.0.1"]
    argv += ["--port", "0", "--scenario", str(scenario)]
    log = _append(folder / "emulator.log")
    try:
        proc = await anyio.open_process(argv, stdin=None, stderr=log, env=env)
    finally:
        log.close()  # the child has its own copy
    assert proc.stdout is not None
    line = b""
    with anyio.fail_after(20):
        while not line.endswith(b"\n"):
            line += await proc.stdout.receive()
    return proc, dict(json.loads(line))


def _append(path: Path) -> Any:
    return open(path, "ab")  # the caller closes it


async def emulator_get(emu: dict[str, str], session: aiohttp.ClientSession, what: str) -> Any:
    """The emulator's evidence (``stats``, ``requests``), read over HTTP."""
    origin = emu["playment"].removesuffix("/playment")
    async with session.get(f"{origin}/_emulator/{what}") as r:
        assert r.status == 200
        return await r.json()


@pytest.mark.timeout(240)
async def test_three_replicas_harvest_1000_jobs_once_when_one_is_killed(
    tmp_path: Path, postgres_server: PgServer
) -> None:
    url = postgres_server.url(postgres_server.create_database("replicas"))
    env = child_env(**{PASSWORD_ENV: postgres_server.password})
    emulator, emu = await start_emulator(tmp_path, env)
    output = tmp_path / "output"
    daemons: list[DaemonProcess] = []
    timeout = aiohttp.ClientTimeout(total=10)
    store = PostgresStore(url, password=postgres_server.password)
    started = anyio.current_time()
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for i in range(REPLICAS):
                port = free_port()
                config = replica_config(
                    tmp_path / f"r{i}", url=url, emu=emu, port=port, output=output
                )
                daemon = DaemonProcess(config, port, session, env)
                daemons.append(daemon)
                await daemon.start()
            for daemon in daemons:
                await daemon.wait_ready(within=30)

            jobs_file = tmp_path / "jobs.jsonl"
            jobs_file.write_bytes(jsonl(job_line(f"scan-{i:04}") for i in range(JOBS)))
            submit = ("submit", "-c", str(daemons[0].config), str(jobs_file))
            done = await cli_process(*submit, within_s=60, env=env)
            assert done.returncode == 0, done.stderr.decode()
            submitted = anyio.current_time()

            await store.open()
            victim = daemons[0]
            victim_id = _replica_id(victim)
            with anyio.fail_after(45):
                while _harvested(await store.counts()) < KILL_AT * JOBS:  # noqa: ASYNC110
                    await anyio.sleep(0.2)
            owned, committed = await _owned(store, victim_id)
            victim_jobs = set(owned)
            victim.signal(signal.SIGKILL)
            killed, killed_wall = anyio.current_time(), time.time()
            assert await victim.wait_exit(5) == -signal.SIGKILL

            last: dict[tuple[str, JobState], int] = {}
            try:
                with anyio.fail_after(90):
                    while _active(last := await store.counts()):  # noqa: ASYNC110
                        await anyio.sleep(0.5)
            except TimeoutError:
                logs = "\n".join(d.log()[-3000:] for d in daemons)
                raise AssertionError(f"not all harvested: {last}\n{logs}") from None
            finished = anyio.current_time()

            # -- exactly once -------------------------------------------------------------
            counts = await store.counts()
            assert counts == {("playment", JobState.HARVESTED): JOBS}, counts
            assert await store.check() == []
            harvested = Counter(
                e["job"]
                for d in daemons
                for e in d.events()
                if e.get("event") == "job state" and e.get("state") == "harvested"
            )
            twice = [k for k, n in harvested.items() if n > 1]
            assert twice == [], f"harvested more than once: {twice}"
            # A replica killed between its commit and its log line leaves no line behind: the
            # job was the victim's, held at our look or already committed by then (a terminal
            # write gives the lease up, so a job committed just before our look and logged
            # after it is no longer listed as the victim's; the survivors' lines are all in).
            unlogged = {f"scan-{i:04}" for i in range(JOBS)} - set(harvested)
            assert unlogged <= victim_jobs | committed, unlogged - victim_jobs - committed
            # Nobody touched the victim's jobs while it was alive: every survivor event
            # naming one of them comes after the kill (and after the victim's lease).
            taken = [
                (_wall(e) - killed_wall, e["job"], e["event"])
                for d in daemons[1:]
                for e in d.events()
                if e.get("job") in victim_jobs
            ]
            early = [t for t in taken if t[0] < 0]
            assert early == [], f"survivors worked on the victim's jobs before it died: {early}"
            assert {t[1] for t in taken} == victim_jobs - unlogged - _finished_by_victim(
                daemons[0], victim_jobs
            )
            manifests = sorted(p.parent.name for p in output.glob("playment/*/MANIFEST.json"))
            assert manifests == [f"scan-{i:04}" for i in range(JOBS)]
            leftovers = [p for p in output.rglob("*") if ".tmp-" in p.name]
            assert leftovers == [], f"temporary files left behind: {leftovers[:5]}"

            # -- no duplicate remote work -------------------------------------------------
            stats = (await emulator_get(emu, session, "stats"))["playment"]
            assert stats["creates"] == JOBS
            assert stats["duplicate_creates"] == 0
            assert stats["max_jobs_per_reference"] == 1

            # -- the rate limit held for all replicas together -----------------------------
            requests = await emulator_get(emu, session, "requests")
            (tmp_path / "requests.json").write_text(json.dumps(requests))
            times = [r["t"] for r in requests if r["provider"] == "playment"]
            peak, peak_at = max_per_window(times)
            span = max(times) - min(times)
            mean = len(times) / span
            survivors = [
                e for d in daemons[1:] for e in d.events() if e.get("event") == "jobs claimed"
            ]
            print(
                f"\nreplicas: {JOBS} jobs, {len(times)} Playment requests in {span:.1f} s"
                f" (mean {mean:.0f}/s); busiest 1 s window: {peak} requests"
                f" (limit {RATE:g}/s + burst {BURST}) at +{peak_at - min(times):.1f} s;"
                f" victim held {len(victim_jobs)} jobs {dict(Counter(owned.values()))}"
                f" when killed at +{killed - submitted:.1f} s;"
                f" all harvested at +{finished - submitted:.1f} s;"
                f" survivors took them over from +{min(taken)[0]:.1f} s after the kill"
                f" (lease {LEASE_S:g} s); startup {submitted - started:.1f} s;"
                f" survivors' claim rounds {len(survivors)}"
            )
            assert peak <= RATE * 1.1, f"{peak} requests in one second, limit {RATE:g}/s"
            assert victim_jobs, "the killed replica held nothing: no takeover tested"
    finally:
        with anyio.CancelScope(shield=True):
            for daemon in daemons:
                await daemon.kill()
            await store.close()
            emulator.kill()
            with anyio.move_on_after(5):
                await emulator.wait()
            await emulator.aclose()


def _replica_id(daemon: DaemonProcess) -> str:
    for event in daemon.events():
        if event.get("event") == "replica joined":
            return str(event["replica"])
    raise AssertionError(f"no 'replica joined' in the log:\n{daemon.log()}")


async def _owned(store: PostgresStore, owner: str) -> tuple[dict[str, str], set[str]]:
    """key -> state of every job ``owner`` holds now, and the keys of the jobs harvested by
    now, in one snapshot (asked behind the store's back)."""
    async with store._connection() as conn:
        rows = await conn.fetch(
            "SELECT key, state, owner FROM jobs WHERE owner = $1 OR state = $2",
            owner,
            JobState.HARVESTED.value,
        )
    owned = {r[0]: r[1] for r in rows if r[2] == owner}
    return owned, {r[0] for r in rows if r[1] == JobState.HARVESTED.value}


def _finished_by_victim(victim: DaemonProcess, jobs: set[str]) -> set[str]:
    """Jobs the victim finished between our look at what it held and its death."""
    return {
        e["job"]
        for e in victim.events()
        if e.get("job") in jobs and e.get("event") == "job state" and e.get("state") == "harvested"
    }


def _wall(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def _harvested(counts: dict[tuple[str, JobState], int]) -> int:
    return counts.get(("playment", JobState.HARVESTED), 0)


def _active(counts: dict[tuple[str, JobState], int]) -> int:
    return sum(n for (_, s), n in counts.items() if s in ACTIVE)
