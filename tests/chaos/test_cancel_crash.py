"""A cancel racing a create or a harvest, with real SIGKILLs (``HARVESTER_FAILPOINTS``):
nothing lost, no remote job created twice, nothing partial under a final name.

- create: ``harvest`` killed right after Bentley accepted the create (the remote id never
  stored, the job left ``submitting``); ``harvester cancel`` must find the remote job by its
  reference before cancelling it, not leave it running unseen nor create it again.
- the cancel itself killed after the provider cancelled but before the store said so: the
  next run learns the verdict from the provider.
- harvest: ``harvest`` killed in the middle of a download; the cancel is refused (the work
  is done at the provider) and changes nothing, and the next run harvests the job whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harvester.config import load_config
from harvester.failpoints import ENV
from harvester.jobs import job_key
from tests.badinput.helpers import tree_digest

from .harness import (
    EmulatorThread,
    case,
    check_crash_state,
    check_final,
    child_env,
    job_lines,
    read_jobs,
)

SCENARIO = {"bentley": {"job_duration_s": 120.0}}


def bentley_only(prefix: str) -> list[dict[str, Any]]:
    return [ln for ln in job_lines(prefix, playment=0, others=1) if ln["provider"] == "bentley"]


def bentley_creates(emu: EmulatorThread, lines: list[dict[str, Any]]) -> dict[str, int]:
    scope = lines[0]["payload"]["iTwinId"]
    counts: dict[str, int] = emu.stats()["bentley"]["creates_by_reference"].get(scope, {})
    return counts


def test_cancel_of_a_create_cut_off_by_a_kill_finds_and_cancels_the_remote_job(
    tmp_path: Path, emu: EmulatorThread
) -> None:
    c = case(tmp_path, emu.urls, "cc-create", lines=bentley_only("cc-create"))
    config, lines = c.config, c.lines
    killed = c.harvest(env=child_env(**{ENV: "submit.after_post=kill@1"}))
    assert killed.killed, killed.tail()
    (row,) = read_jobs(load_config(config)).values()
    assert row["state"] == "submitting" and row["remote_id"] is None
    assert sum(bentley_creates(emu, lines).values()) == 1  # the create landed

    done = c.cli("cancel", "--json", row["key"])
    assert done.returncode == 0, done.log
    (job,) = json.loads(done.stdout)["done"]
    assert job["state"] == "cancelled" and job["cancelled_by"] == "user"
    assert job["remote_id"] and f"at bentley (remote job {job['remote_id']})" in job["reason"]
    check_crash_state(config, emu, lines)

    again = c.harvest(jobs=False)
    assert again.returncode == 1, again.tail()  # a cancelled job: exit 1, nothing resent
    assert bentley_creates(emu, lines) == {lines[0]["reference_id"]: 1}
    (row,) = read_jobs(load_config(config)).values()
    assert row["state"] == "cancelled" and row["remote_id"] == job["remote_id"]


def test_a_cancel_killed_before_its_commit_is_finished_by_the_providers_verdict(
    tmp_path: Path, emu: EmulatorThread
) -> None:
    c = case(tmp_path, emu.urls, "cc-commit", lines=bentley_only("cc-commit"))
    config, lines = c.config, c.lines
    started = c.harvest("--timeout", "3")
    assert started.returncode == 3, started.tail()
    (row,) = read_jobs(load_config(config)).values()
    assert row["state"] == "running"
    key = row["key"]
    cut = c.cli("cancel", key, env=child_env(**{ENV: "store.before_commit=kill@1"}))
    assert cut.killed, cut.log
    assert read_jobs(load_config(config))[("bentley", key)]["state"] == "running"
    check_crash_state(config, emu, lines)

    again = c.harvest(jobs=False)
    assert again.returncode == 1, again.tail()
    row = read_jobs(load_config(config))[("bentley", key)]
    assert row["state"] == "cancelled" and row["cancelled_by"] == "provider", row
    assert bentley_creates(emu, lines) == {lines[0]["reference_id"]: 1}
    check_crash_state(config, emu, lines)


def test_cancel_during_a_killed_harvest_is_refused_and_the_harvest_completes(
    tmp_path: Path, emu: EmulatorThread
) -> None:
    c = case(tmp_path, emu.urls, "cc-harvest", playment=1, others=0, providers=("playment",))
    config, lines = c.config, c.lines
    killed = c.harvest(env=child_env(**{ENV: "download.chunk=kill@1"}))
    assert killed.killed, killed.tail()
    key = job_key(lines[0]["reference_id"])
    assert read_jobs(load_config(config))[("playment", key)]["state"] in (
        "succeeded",
        "harvesting",
    )
    check_crash_state(config, emu, lines)

    def stored() -> dict[str, str]:
        digest = tree_digest(tmp_path)
        digest.pop("state.db.lock", None)  # rewritten by every command that takes it
        return digest

    before = stored()
    refused = c.cli("cancel", key)
    assert refused.returncode == 1, refused.log
    (line,) = [ln for ln in refused.log.splitlines() if ln.strip()]
    assert "already finished at the provider and is being harvested" in line, line
    assert stored() == before

    done = c.harvest(jobs=False)
    assert done.returncode == 0, done.tail()
    outcome = check_final(config, emu, lines, crashed=True)
    assert outcome.harvested == 1
