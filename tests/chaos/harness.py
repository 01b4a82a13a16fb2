"""Shared machinery of the chaos tests.

- ``EmulatorThread``: the emulator on its own event loop in a background thread, so the test
  can block on harvester subprocesses (``subprocess.run``) while the emulator keeps serving.
- ``write_config`` / ``job_lines``: a config for all four providers and a job set whose every
  remote job can be told apart in the emulator's counters (unique project, iTwin, model and
  payload per case).
- ``harvester`` / ``status_check``: the CLI as a subprocess (the thing that gets killed) and
  ``harvester status --check`` in this process (cheap: no interpreter start-up).
- ``case``: a config and a jobs file written together; ``Case.harvest`` / ``Case.cli`` run the
  CLI on them. ``module_emulator``: the ``emu`` fixture (``conftest``), one per test module.
- ``check_crash_state`` / ``check_final``: the invariants after a kill and after a run.
- ``record``: figures appended to ``$CHAOS_REPORT`` (JSON lines) for the README's numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from harvester.cli import main as cli_main
from harvester.config import Config, load_config
from harvester.emulator.scenario import Scenario, parse_scenario
from harvester.emulator.server import Emulator
from harvester.fsutil import sha256_file
from harvester.jobs import job_key
from harvester.store.base import NewJob
from tests.emulated import merged
from tests.integration.helpers import FAST_LANE, check_outputs, config_toml, payload

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
PROVIDERS = ("playment", "cognite", "bentley", "modzy")
#: every secret is a marker string that must never show up anywhere
SECRETS = {
    "CHAOS_PLAYMENT_KEY": "chaos-playment-key-MARK-91f3",
    # Modzy keys are "<access key>.<secret>": the access part is public (Modzy echoes it).
    "CHAOS_MODZY_KEY": "chaosaccess.chaos-modzy-secret-MARK-27c8",
    "CHAOS_COGNITE_SECRET": "chaos-cognite-secret-MARK-5d02",
    "CHAOS_BENTLEY_SECRET": "chaos-bentley-secret-MARK-e6a4",
}
#: a cut-off create answer: the reason every provider without a lookup gives (on_lost_create)
LOST_CREATE = "was lost and"
#: providers that find a job whose create answer was cut off (batch listing, jobs by name)
LOOKUP = frozenset({"playment", "bentley"})
FAST_SCENARIO: dict[str, Any] = {
    "seed": 17,
    "playment": {"job_duration_s": 0.5, "points_per_frame": [2000, 4000]},
    "cognite": {"job_duration_s": 0.5},
    "bentley": {
        "job_duration_s": 0.6,
        "terminating_s": 0.1,
        "list_page_size": 2,
        "parts_per_output": 3,
        "blob_bytes": 6000,
    },
    "modzy": {"job_duration_s": 0.5, "results_404_s": 0.3},
}


def scenario(overrides: dict[str, Any] | None = None) -> Scenario:
    return parse_scenario(merged(FAST_SCENARIO, overrides or {}))


class EmulatorThread:
    """``with EmulatorThread(scenario) as emu:`` serves until the block ends.

    ``emu.call(fn)`` runs ``fn`` on the emulator's loop and returns its result: read or change
    the emulator's state that way while requests may be in flight.
    """

    def __init__(self, sc: Scenario) -> None:
        self.emulator = Emulator(sc)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="emulator", daemon=True)

    @property
    def urls(self) -> dict[str, str]:
        return self.emulator.urls

    @property
    def state(self) -> Any:
        return self.emulator.state

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("the emulator did not start within 15 s")
        if self._error is not None:
            raise RuntimeError(f"the emulator did not start: {self._error}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with self.emulator:
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def call(self, fn: Callable[[], T]) -> T:
        assert self._loop is not None

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def stats(self) -> dict[str, Any]:
        return self.call(self.emulator.state.stats)


# -- config and jobs -----------------------------------------------------------------------


def write_config(
    folder: Path,
    urls: dict[str, str],
    project: str,
    *,
    listen_port: int = 0,
    provider: dict[str, Any] | None = None,
    per_provider: dict[str, dict[str, Any]] | None = None,
    log_level: str = "info",
    label_dtype: str = "auto",
    providers: tuple[str, ...] = PROVIDERS,
) -> Path:
    """A config for ``providers`` at the emulator, polling fast; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    common: dict[str, Any] = {**FAST_LANE, **(provider or {})}
    sections: dict[str, dict[str, Any]] = {
        "playment": {
            "base_url": urls["playment"],
            "api_key_env": "CHAOS_PLAYMENT_KEY",
            "project_id": project,
        },
        "cognite": {
            "base_url": urls["cognite"],
            "project": project,
            "token_url": urls["token"],
            "client_id": "chaos-cognite",
            "client_secret_env": "CHAOS_COGNITE_SECRET",
        },
        "bentley": {
            "base_url": urls["bentley"],
            "token_url": urls["token"],
            "client_id": "chaos-bentley",
            "client_secret_env": "CHAOS_BENTLEY_SECRET",
        },
        "modzy": {"base_url": urls["modzy"], "api_key_env": "CHAOS_MODZY_KEY"},
    }
    text = config_toml(
        output={"dir": "out", "label_dtype": label_dtype},
        harvest={"concurrency": 4, "chunk_bytes": 4096, "max_attempts": 8},
        log={"level": log_level, "format": "json"},
        server={"listen": f"127.0.0.1:{listen_port}", "drain_grace_s": 5},
        providers={
            name: {**common, **sections[name], **(per_provider or {}).get(name, {})}
            for name in providers
        },
    )
    path = folder / "harvester.toml"
    path.write_text(text)
    return path


def job_lines(
    prefix: str, *, playment: int = 12, frames: int = 2, others: int = 2
) -> list[dict[str, Any]]:
    """Jobs-file lines; every remote job they create is unique to ``prefix``."""
    lines: list[dict[str, Any]] = [
        {"provider": "playment", "reference_id": f"{prefix}-p{i:02d}", "payload": payload(frames)}
        for i in range(playment)
    ]
    for i in range(others):
        lines.append(
            {
                "provider": "cognite",
                "reference_id": f"{prefix}-c{i}",
                "payload": {
                    "items": [{"fileId": 1000 + i}],
                    "points": [{"x": 0.5, "y": 0.5, "label": 1}],
                },
            }
        )
        lines.append(
            {
                "provider": "bentley",
                "reference_id": f"{prefix}-b{i}",
                "payload": {
                    "type": "Segmentation2D",
                    "iTwinId": f"{prefix}-itwin",
                    "specifications": {
                        "inputs": {"photos": f"rd-{i}"},
                        "outputs": ["segmentation2D"],
                        "options": {},
                    },
                },
            }
        )
        lines.append(
            {
                "provider": "modzy",
                "reference_id": f"{prefix}-m{i}",
                "payload": {
                    "model": {"identifier": f"{prefix}-model", "version": "1.0.1"},
                    "input": {
                        "type": "text",
                        "sources": {"item-1": {"input.txt": f"{prefix} job {i}"}},
                    },
                },
            }
        )
    return lines


def write_jobs(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@dataclass
class Case:
    """One job set at the emulator: its config, its jobs file and the lines in it."""

    config: Path
    jobs: Path
    lines: list[dict[str, Any]]

    def cli(
        self, command: str, *args: str, env: dict[str, str] | None = None, timeout: float = 90.0
    ) -> Run:
        """``harvester COMMAND -c CONFIG ARGS`` to its end; ``env`` defaults to ``child_env()``."""
        env = child_env() if env is None else env
        return harvester(command, "-c", str(self.config), *args, env=env, timeout=timeout)

    def harvest(
        self,
        *extra: str,
        env: dict[str, str] | None = None,
        jobs: bool = True,
        timeout: float = 90.0,
    ) -> Run:
        """``harvester harvest -c CONFIG [JOBS] --no-progress EXTRA``; ``jobs=False`` resumes
        the store without adding to it."""
        args = [*([str(self.jobs)] if jobs else []), "--no-progress", *extra]
        return self.cli("harvest", *args, env=env, timeout=timeout)


def case(
    folder: Path,
    urls: dict[str, str],
    project: str,
    *,
    playment: int = 12,
    frames: int = 2,
    others: int = 2,
    lines: list[dict[str, Any]] | None = None,
    jobs_file: Path | None = None,
    **config: Any,
) -> Case:
    """``write_config(folder, urls, project, **config)`` and a jobs file (``folder/jobs.jsonl``
    unless ``jobs_file``) of ``lines``, by default ``job_lines(project, ...)``."""
    if lines is None:
        lines = job_lines(project, playment=playment, frames=frames, others=others)
    path = write_config(folder, urls, project, **config)
    jobs = write_jobs(jobs_file or folder / "jobs.jsonl", lines)
    return Case(path, jobs, lines)


def module_emulator(request: pytest.FixtureRequest) -> Iterator[EmulatorThread]:
    """A test module's ``emu`` fixture: ``FAST_SCENARIO`` with the module's ``SCENARIO``
    overrides, if it has any, served for the whole module."""
    with EmulatorThread(scenario(getattr(request.module, "SCENARIO", None))) as emu:
        yield emu


def child_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HARVESTER_CONFIG", "HARVESTER_FAILPOINTS", "HARVESTER_FAILPOINTS_COUNTS")
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(SECRETS)
    env.update(extra)
    return env


# -- running harvester ---------------------------------------------------------------------


@dataclass
class Run:
    returncode: int
    stdout: str
    log: str  #: stderr
    seconds: float

    @property
    def killed(self) -> bool:
        return self.returncode == -9 and "failpoint " in self.log

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.splitlines()[-n:])


def harvester(*args: str, env: dict[str, str], timeout: float = 90.0, cwd: Path = REPO) -> Run:
    """``python -m harvester.cli ARGS`` to its end (killed on timeout)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "harvester.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        raise AssertionError(
            f"harvester {args[0]} still running after {timeout} s:\n{err}"
        ) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return Run(proc.returncode, out, err, time.monotonic() - started)


@contextlib.contextmanager
def daemon(config: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``harvester run`` in a subprocess; killed when the block ends if still running."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "harvester.cli", "run", "-c", str(config)],
            stdout=fh,
            stderr=fh,
            env=env,
            cwd=config.parent,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def status_check(config: Path) -> dict[str, Any]:
    """``harvester status --json --check`` (in this process); asserts it exits 0."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(["status", "-c", str(config), "--json", "--check"])
    doc: dict[str, Any] = json.loads(out.getvalue()) if out.getvalue() else {}
    assert code == 0, f"status --check exited {code}: {doc.get('check')} {err.getvalue()}"
    assert doc["check"] == [], doc["check"]
    return doc


def read_jobs(config: Config) -> dict[tuple[str, str], dict[str, Any]]:
    """The store's rows, read-only (safe while a harvester process writes)."""
    assert config.store.path is not None
    if not config.store.path.exists():
        return {}
    conn = sqlite3.connect(f"file:{config.store.path}?mode=ro", uri=True, timeout=10)
    try:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM jobs").fetchall()
    finally:
        conn.close()
    return {(r["provider"], r["key"]): dict(r) for r in rows}


# -- invariants ----------------------------------------------------------------------------


@dataclass
class Outcome:
    harvested: int = 0
    lost_creates: int = 0  #: non-Playment jobs in error because a crash cut their create
    files_checked: int = 0
    requests: int = 0


def _per_reference(stats: dict[str, Any], provider: str, scope: str) -> dict[str, int]:
    counts: dict[str, int] = stats.get(provider, {}).get("creates_by_reference", {}).get(scope, {})
    return counts


def scopes(lines: list[dict[str, Any]], project: str) -> dict[str, str]:
    """Where the emulator files each provider's creates of this job set."""
    out = {"playment": project, "cognite": project}
    for line in lines:
        if line["provider"] == "bentley":
            out["bentley"] = line["payload"]["iTwinId"]
        if line["provider"] == "modzy":
            out["modzy"] = line["payload"]["model"]["identifier"]
    return out


def check_no_duplicates(emu: EmulatorThread, lines: list[dict[str, Any]], project: str) -> None:
    """No remote job was created twice: every reference (or request) at most once."""
    stats = emu.stats()
    where = scopes(lines, project)
    for provider, scope in where.items():
        counts = _per_reference(stats, provider, scope)
        assert all(n <= 1 for n in counts.values()), (provider, counts)
    per_ref = stats["playment"].get("jobs_by_reference", {}).get(project, {})
    assert all(n == 1 for n in per_ref.values()), per_ref
    assert stats["playment"]["duplicate_creates"] == 0
    assert stats["credential_hits"] == []


def check_crash_state(config_path: Path, emu: EmulatorThread, lines: list[dict[str, Any]]) -> None:
    """After a kill: the store passes its check, no file under a final name is partial, no
    duplicate create."""
    config = load_config(config_path)
    status_check(config_path)
    check_no_duplicates(emu, lines, _project(config))


def _project(config: Config) -> str:
    return str(getattr(config.providers["playment"], "project_id", ""))


def check_final(
    config_path: Path, emu: EmulatorThread, lines: list[dict[str, Any]], *, crashed: bool
) -> Outcome:
    """After the run to completion: each job harvested exactly once (or, where a crash cut a
    create answer that the provider cannot look up, in error saying so), every file true."""
    config = load_config(config_path)
    project = _project(config)
    rows = read_jobs(config)
    expected = {(line["provider"], job_key(line["reference_id"])) for line in lines}
    assert set(rows) == expected
    outcome = Outcome()
    stats = emu.stats()
    where = scopes(lines, project)
    by_provider: dict[str, list[dict[str, Any]]] = {}
    for row in rows.values():
        by_provider.setdefault(row["provider"], []).append(row)
    for provider, group in by_provider.items():
        creates = _per_reference(stats, provider, where[provider])
        for row in group:
            if row["state"] == "harvested":
                outcome.harvested += 1
                continue
            lost = (
                provider not in LOOKUP
                and crashed
                and row["state"] == "error"
                and LOST_CREATE in (row["reason"] or "")
            )
            assert lost, f"{provider}/{row['key']} ended {row['state']}: {row['reason']}"
            outcome.lost_creates += 1
        harvested = sum(r["state"] == "harvested" for r in group)
        # Each harvested job was created exactly once; a lost one at most once.
        assert sum(creates.values()) <= len(group), (provider, creates)
        assert sum(creates.values()) >= harvested, (provider, creates)
        assert all(n <= 1 for n in creates.values()), (provider, creates)
    check_no_duplicates(emu, lines, project)
    # Every label array equals the ground truth, every manifest entry is true.
    frames = len(lines[0]["payload"]["data"]["sensor_data"]["frames"])
    playment = [
        NewJob("playment", job_key(ln["reference_id"]), ln["reference_id"], None, None, "chaos")
        for ln in lines
        if ln["provider"] == "playment"
    ]
    check_outputs(config, emu, playment, frames=frames)
    for row in rows.values():
        if row["provider"] != "playment" and row["state"] == "harvested":
            check_other_truth(config, emu, row)
    doc = status_check(config_path)
    outcome.files_checked = doc["checked"]["files"]
    outcome.requests = stats["requests"]
    return outcome


def check_other_truth(config: Config, emu: EmulatorThread, row: dict[str, Any]) -> None:
    """Cognite segments, Bentley blobs and Modzy results equal the emulator's ground truth."""
    provider, out = row["provider"], config.output.dir / row["output"]
    truth = emu.call(lambda: emu.state.job_truth(provider, row["remote_id"]))
    if provider == "cognite":
        assert json.loads((out / "segments.json").read_text())["items"] == truth["items"]
    elif provider == "bentley":
        for output, meta in truth["outputs"].items():
            for path, blob in meta["blobs"].items():
                assert sha256_file(out / "outputs" / output / path) == blob["sha256"], path
    elif provider == "modzy":
        results = json.loads((out / "results.json").read_text())["results"]
        assert {k: v["results.json"] for k, v in results.items()} == truth["results"]


# -- figures -------------------------------------------------------------------------------


def record(kind: str, name: str, **values: Any) -> None:
    """Append one JSON line to ``$CHAOS_REPORT`` (when set) and print it (``pytest -s``)."""
    line = json.dumps({"kind": kind, "name": name, **values}, sort_keys=True, default=str)
    print(line)
    path = os.environ.get("CHAOS_REPORT")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def wait_until(predicate: Callable[[], bool], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {within} s")
