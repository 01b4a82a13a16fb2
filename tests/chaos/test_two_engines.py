"""Two engines on one sqlite store: the second is refused at once, naming the first.

Without the lock a second ``harvester harvest`` (or ``run``) beside a running one loads the
same jobs, finds the first one's in-flight creates in ``submitting`` and takes them for lost
answers: with ``on_lost_create = "fail"`` Cognite, Bentley and Modzy jobs ended in error though
each was created once, with ``"resubmit"`` they were created twice. ``submit`` and ``status``
must keep working beside the engine, and a SIGKILLed engine must leave no lock behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harvester.config import Config, load_config

from .harness import (
    EmulatorThread,
    case,
    check_final,
    child_env,
    job_lines,
    read_jobs,
    scenario,
    wait_until,
    write_jobs,
)

#: long enough for the second engine to arrive while the first still works
JOB_S = 3.0
#: creates slowed down so the first engine has creates in flight when the second arrives
CREATE_DELAY_S = 1.5


@pytest.fixture(scope="module")
def emu() -> Iterator[EmulatorThread]:
    slow = [
        {"kind": "slow", "provider": p, "match": path, "count": 2, "delay_s": CREATE_DELAY_S}
        for p, path in (
            ("cognite", "/context/vision/segment"),
            ("bentley", "/reality-analysis/jobs"),
            ("modzy", "/api/jobs"),
        )
    ]
    overrides = {
        "faults": slow,
        "playment": {"job_duration_s": JOB_S},
        "cognite": {"job_duration_s": JOB_S},
        "bentley": {"job_duration_s": JOB_S},
        "modzy": {"job_duration_s": JOB_S},
    }
    with EmulatorThread(scenario(overrides)) as e:
        yield e


def states(config: Config) -> set[str]:
    try:
        return {r["state"] for r in read_jobs(config).values()}
    except sqlite3.OperationalError:  # the first engine is creating the store right now
        return set()


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_a_second_engine_is_refused_and_submit_and_status_still_work(
    emu: EmulatorThread, tmp_path: Path
) -> None:
    c = case(tmp_path, emu.urls, "twice", playment=4, others=2)
    config, jobs, lines = c.config, c.jobs, c.lines
    env = child_env()
    loaded = load_config(config)
    store = loaded.store
    assert store.path is not None
    argv = ["harvest", "-c", str(config), str(jobs), "--no-progress"]
    first = subprocess.Popen(
        [sys.executable, "-m", "harvester.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        # The first engine holds the store and has creates in flight.
        wait_until(
            lambda: "submitting" in states(loaded),
            within=30,
            what="the first engine submitting",
        )
        for command in (["harvest", str(jobs)], ["run"]):
            second = c.cli(*command, env=env, timeout=30)
            assert second.returncode == 2, second.log
            said = one_line(second.log)
            assert said.startswith("harvester: ") and str(store.path) in said, said
            assert f"pid {first.pid} on {socket.gethostname()}" in said, said
            assert "harvest -c" in said and "since 20" in said, said
            assert second.seconds < 15, "refused at once"

        # submit and status work beside the engine
        more = write_jobs(tmp_path / "more.jsonl", job_lines("twice-more", playment=1, others=0))
        added = c.cli("submit", str(more), env=env, timeout=30)
        assert added.returncode == 0 and "added 1 jobs" in added.stdout, added.log
        status = c.cli("status", "--json", env=env, timeout=30)
        assert status.returncode == 0, status.log
        assert json.loads(status.stdout)["total"] == len(lines) + 1, status.stdout

        # Killed: the kernel drops the lock with the process; no stale lock stops the rerun.
        wait_until(
            lambda: "submitting" not in states(loaded),
            within=30,
            what="every create answered",
        )
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    rerun = c.harvest(jobs=False, env=env, timeout=60)
    assert rerun.returncode == 0, rerun.tail()
    all_lines = lines + job_lines("twice-more", playment=1, others=0)
    outcome = check_final(config, emu, all_lines, crashed=False)
    assert outcome.harvested == len(all_lines)
