"""``harvester cancel``, ``retry`` and ``jobs`` as a user runs them: subprocesses against the
emulator, their ``--json`` output, the README's exit codes, and one line for bad input with
the store and output byte for byte unchanged."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from harvester.jobs import job_key
from tests.badinput.helpers import tree_digest
from tests.chaos.harness import (
    SECRETS,
    EmulatorThread,
    Run,
    case,
    child_env,
    harvester,
    job_lines,
)

SLOW = {"job_duration_s": 120.0}
#: the emulator of this module (the ``emu`` fixture): jobs run until cancelled
SCENARIO = {"playment": SLOW, "bentley": SLOW, "modzy": SLOW}


def modzy_status(emu: EmulatorThread, remote_id: str) -> str:
    req = urllib.request.Request(
        f"{emu.urls['modzy']}/api/jobs/{remote_id}",
        headers={"Authorization": f"ApiKey {SECRETS['CHAOS_MODZY_KEY']}"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(json.loads(resp.read())["status"])


class Work:
    """A folder whose jobs were submitted and are running (slow) at the emulator."""

    def __init__(self, folder: Path, emu: EmulatorThread, prefix: str) -> None:
        self.folder = folder
        lines = job_lines(prefix, playment=1, others=1)
        self.lines = [ln for ln in lines if ln["provider"] != "cognite"]
        providers = ("playment", "bentley", "modzy")
        made = case(folder, emu.urls, prefix, lines=self.lines, providers=providers)
        self.config = made.config
        self.env = child_env()
        started = self.cli("harvest", str(made.jobs), "--no-progress", "--timeout", "3")
        assert started.returncode == 3, started.tail()  # stopped with work left
        self.keys = {ln["provider"]: job_key(ln["reference_id"]) for ln in self.lines}

    def cli(self, *args: str) -> Run:
        command, *rest = args
        return harvester(command, "-c", str(self.config), *rest, env=self.env, cwd=self.folder)

    def snapshot(self, *, lock: bool = True) -> dict[str, str]:
        """The store and output; ``lock=False`` leaves out the engine lock's file, which a
        command that ran (and was refused by the provider) rewrites with its holder."""
        digest = tree_digest(self.folder)
        if not lock:
            digest.pop("state.db.lock", None)
        return digest

    def jobs(self, *args: str) -> dict[str, dict[str, Any]]:
        run = self.cli("jobs", "--json", *args)
        assert run.returncode == 0, run.tail()
        docs = [json.loads(line) for line in run.stdout.splitlines()]
        return {d["provider"]: d for d in docs}


def one_line(run: Run, code: int, says: str) -> None:
    lines = [ln for ln in run.log.splitlines() if ln.strip()]
    assert run.returncode == code, (run.returncode, run.stdout, run.log)
    assert len(lines) == 1, lines
    assert lines[0].startswith("harvester: ") and says in lines[0], lines[0]


def test_cancel_retry_and_jobs_from_the_command_line(tmp_path: Path, emu: EmulatorThread) -> None:
    w = Work(tmp_path, emu, "cli-ctl")
    listed = w.jobs()
    assert {p: d["state"] for p, d in listed.items()} == {
        "playment": "running",
        "bentley": "running",
        "modzy": "running",
    }
    assert all(d["remote_id"] and d["created_at"] for d in listed.values())

    # Bad input: one line, exit 2, nothing stored changed.
    before = w.snapshot()
    for args, says in [
        (("cancel", "no-such-key"), "no-such-key: no such job"),
        (("cancel", "--state", "bogus"), "--state 'bogus' is not a job state"),
        (("cancel",), "name the jobs: KEY ... and/or --state STATE"),
        (("cancel", "--provider", "cognite", "x"), "--provider 'cognite' is not configured"),
        (("retry", w.keys["modzy"]), "is running, still at work; nothing to retry"),
        (("retry", "no-such-key", w.keys["modzy"]), "no-such-key: no such job"),
        (("jobs", "--state", "bogus"), "--state 'bogus' is not a job state"),
        (("jobs", "--since", "yesterday"), "--since 'yesterday' is neither ISO-8601"),
    ]:
        one_line(w.cli(*args), 2, says)
        assert w.snapshot() == before, args

    done = w.cli(
        "cancel",
        "--json",
        f"modzy/{w.keys['modzy']}",
        f"bentley/{w.keys['bentley']}",
        w.keys["playment"],
    )
    assert done.returncode == 0, done.tail()
    doc = json.loads(done.stdout)
    assert doc["refused"] == []
    cancelled = {d["provider"]: d for d in doc["done"]}
    assert {p: (d["state"], d["cancelled_by"]) for p, d in cancelled.items()} == {
        p: ("cancelled", "user") for p in ("playment", "bentley", "modzy")
    }
    assert "at modzy" in cancelled["modzy"]["reason"]
    assert "at bentley" in cancelled["bentley"]["reason"]
    assert "has no cancel" in cancelled["playment"]["reason"]
    assert modzy_status(emu, cancelled["modzy"]["remote_id"]) == "CANCELED"

    # Cancelling again is refused (exit 1, README), one line, nothing changed.
    before = w.snapshot(lock=False)
    one_line(w.cli("cancel", w.keys["modzy"]), 1, "has already ended cancelled")
    assert w.snapshot(lock=False) == before
    # A cancelled remote job is submitted again only on request.
    before = w.snapshot()
    one_line(w.cli("retry", w.keys["modzy"]), 2, "--resubmit submits it again")
    assert w.snapshot() == before

    assert set(w.jobs("--state", "cancelled", "--provider", "modzy")) == {"modzy"}
    assert w.jobs("--state", "running") == {}
    assert set(w.jobs("--since", "2000-01-01T00:00:00Z")) == {"playment", "bentley", "modzy"}
    assert w.jobs("--since", "4102444800") == {}  # 2100: nothing changed since
    text = w.cli("jobs")
    assert text.returncode == 0 and text.stdout.splitlines()[0].startswith("PROVIDER\tKEY")
    assert len(text.stdout.splitlines()) == 4

    again = w.cli("retry", "--resubmit", "--json", "--provider", "modzy", "--state", "cancelled")
    assert again.returncode == 0, again.tail()
    (fresh,) = json.loads(again.stdout)["done"]
    old = cancelled["modzy"]["remote_id"]
    assert fresh["state"] == "new" and fresh["remote_id"] is None
    assert fresh["remote_attempt"] == 2 and fresh["past_remote_ids"] == [old]
    resumed = w.cli("harvest", "--no-progress", "--timeout", "3", "--provider", "modzy")
    assert resumed.returncode == 3, resumed.tail()
    now = w.jobs("--provider", "modzy")["modzy"]
    assert now["state"] == "running" and now["remote_id"] not in (None, old)
    # Exactly one new remote job (Modzy files creates by request, so the same request
    # counts the first create and the resubmitted one); the old one stays cancelled.
    assert modzy_status(emu, old) == "CANCELED"
    assert modzy_status(emu, now["remote_id"]) != "CANCELED"
    creates = emu.stats()["modzy"]["creates_by_reference"]["cli-ctl-model"]
    assert list(creates.values()) == [2], creates
