"""Crash anywhere: ``harvester harvest`` (and ``harvester run``) killed with SIGKILL at a
seeded failpoint, then run again to completion.

After every kill: ``harvester status --check`` passes (store rows consistent, nothing partial
under a final name) and the emulator has seen no duplicate create. After the final run: every
job harvested exactly once (a Cognite/Bentley/Modzy job whose create answer the kill cut off
may instead end in error saying so: those providers offer no lookup), every label array equal
to the ground truth, every MANIFEST true, no temporary file left.

``make test`` runs six seeded kills (``kill-*``); ``make chaos`` adds the full sweep
(``sweep-*``: 60 cases over every failpoint, some with two or three kills in a row) and the
daemon (``daemon-*``).
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest

from harvester.cli import main as cli_main
from harvester.config import load_config
from harvester.failpoints import COUNTS_ENV, OBJECT_STORE_POINTS, POINTS
from harvester.jobs import TERMINAL, JobState
from tests.daemon.helpers import free_port

from .harness import (
    EmulatorThread,
    Run,
    case,
    check_crash_state,
    check_final,
    child_env,
    daemon,
    read_jobs,
    record,
    wait_until,
)

SEED = 20250131
FAST_POINTS = random.Random(SEED).sample(POINTS, 6)
SWEEP = 60
DAEMONS = 10
RUN_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def calibration(emu: EmulatorThread, tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """A clean run counting every failpoint's hits: where a kill can land."""
    folder = tmp_path_factory.mktemp("calibration")
    c = case(folder, emu.urls, "calib")
    counts_file = folder / "counts.json"
    run = c.harvest(env=child_env(**{COUNTS_ENV: str(counts_file)}))
    assert run.returncode == 0, run.tail()
    counts: dict[str, int] = json.loads(counts_file.read_text())
    check_final(c.config, emu, c.lines, crashed=False)
    record("calibration", "clean-run", seconds=round(run.seconds, 2), jobs=len(c.lines), **counts)
    missing = [p for p in POINTS if not counts.get(p)]
    assert not missing, f"failpoints never reached in a clean run: {missing}"
    return counts


def plan(seed: int, counts: dict[str, int], first: str, kills: int) -> list[tuple[str, int]]:
    """``kills`` (point, hit) pairs: ``first`` then seeded picks; hits drawn below the clean
    run's count so the kill lands (later kills find less work left: lower still)."""
    rng = random.Random(seed)
    out = []
    for i in range(kills):
        point = first if i == 0 else rng.choice(POINTS)
        ceiling = max(1, counts[point] // (2 if i == 0 else 4))
        out.append((point, rng.randint(1, ceiling)))
    return out


FAST = [pytest.param(i, FAST_POINTS[i], 1, id=f"kill-{i}-{FAST_POINTS[i]}") for i in range(6)]
FULL = [
    pytest.param(
        100 + i,
        POINTS[i % len(POINTS)],
        3 if i % 12 == 0 else 2 if i % 4 == 0 else 1,
        id=f"sweep-{i}-{POINTS[i % len(POINTS)]}",
        marks=pytest.mark.chaos,
    )
    for i in range(SWEEP)
]


@pytest.mark.parametrize(("seed", "point", "kills"), FAST + FULL)
def test_harvest_killed_anywhere_then_rerun(
    emu: EmulatorThread,
    calibration: dict[str, int],
    tmp_path: Path,
    seed: int,
    point: str,
    kills: int,
) -> None:
    name = f"h{seed}"
    c = case(tmp_path, emu.urls, name)
    config, lines = c.config, c.lines
    steps = plan(seed, calibration, point, kills)
    started = time.monotonic()
    runs: list[Run] = []
    for fp, hit in steps:
        failpoint = child_env(HARVESTER_FAILPOINTS=f"{fp}=kill@{hit}")
        run = c.harvest("--timeout", str(RUN_TIMEOUT_S), env=failpoint)
        runs.append(run)
        if run.killed:
            assert f"failpoint {fp} hit {hit}: SIGKILL" in run.log
        else:
            assert run.returncode in (0, 1), run.tail()
        check_crash_state(config, emu, lines)
    # The first kill is planned to land; later ones may find the work already done.
    assert runs[0].killed, f"{steps[0]} never fired: {runs[0].tail()}"
    final = c.harvest()
    outcome = check_final(config, emu, lines, crashed=True)
    assert final.returncode == (1 if outcome.lost_creates else 0), final.tail()
    record(
        "crash",
        name,
        mode="harvest",
        kills=[f"{fp}=kill@{hit}" for fp, hit in steps],
        fired=sum(r.killed for r in runs),
        runs=len(runs) + 1,
        jobs=len(lines),
        harvested=outcome.harvested,
        lost_creates=outcome.lost_creates,
        files_checked=outcome.files_checked,
        seconds=round(time.monotonic() - started, 2),
    )


def _all_terminal(config_path: Path) -> bool:
    rows = read_jobs(load_config(config_path))
    return bool(rows) and all(JobState(r["state"]) in TERMINAL for r in rows.values())


def _daemon_until_done_or_dead(config: Path, env: dict[str, str], log: Path) -> int | None:
    """Run the daemon until it dies (returns its exit code) or every job is terminal (it is
    sent SIGTERM and must drain and exit 0: returns None)."""
    with daemon(config, env, log) as proc:
        wait_until(
            lambda: proc.poll() is not None or _all_terminal(config),
            within=RUN_TIMEOUT_S,
            what=f"daemon neither died nor finished (log {log})",
        )
        code = proc.poll()
        if code is not None:
            return code
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        return None


DAEMON_CASES = [
    pytest.param(
        200 + i,
        POINTS[(3 * i) % len(POINTS)],
        id=f"daemon-{i}-{POINTS[(3 * i) % len(POINTS)]}",
        marks=pytest.mark.chaos,
    )
    for i in range(DAEMONS)
]


@pytest.mark.parametrize(("seed", "point"), DAEMON_CASES)
def test_daemon_killed_anywhere_then_restarted(
    emu: EmulatorThread, calibration: dict[str, int], tmp_path: Path, seed: int, point: str
) -> None:
    name = f"d{seed}"
    c = case(tmp_path, emu.urls, name, listen_port=free_port())
    config, lines = c.config, c.lines
    assert cli_main(["submit", "-c", str(config), str(c.jobs)]) == 0
    (fp, hit) = plan(seed, calibration, point, 1)[0]
    started = time.monotonic()
    log = tmp_path / "daemon.log"
    code = _daemon_until_done_or_dead(
        config, child_env(HARVESTER_FAILPOINTS=f"{fp}=kill@{hit}"), log
    )
    killed = code == -signal.SIGKILL
    assert killed, f"{fp}=kill@{hit} never fired (exit {code}): {log.read_text()[-3000:]}"
    assert f"failpoint {fp} hit {hit}: SIGKILL" in log.read_text()
    check_crash_state(config, emu, lines)
    assert _daemon_until_done_or_dead(config, child_env(), log) is None
    outcome = check_final(config, emu, lines, crashed=True)
    record(
        "crash",
        name,
        mode="daemon",
        kills=[f"{fp}=kill@{hit}"],
        fired=1,
        runs=2,
        jobs=len(lines),
        harvested=outcome.harvested,
        lost_creates=outcome.lost_creates,
        files_checked=outcome.files_checked,
        seconds=round(time.monotonic() - started, 2),
    )


def test_failpoints_are_documented_and_placed() -> None:
    """Every point is named in the module docstring and called exactly where it is said to be;
    no call names a point that does not exist."""
    import re

    import harvester.failpoints as fp

    root = Path(fp.__file__).parent
    calls: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for name in re.findall(r'failpoint\("([^"]+)"\)', path.read_text()):
            calls.setdefault(name, []).append(path.name)
    assert set(calls) == set(POINTS + OBJECT_STORE_POINTS), calls
    doc = fp.__doc__ or ""
    for name in POINTS + OBJECT_STORE_POINTS:
        assert f"``{name}" in doc, name


def test_failpoint_spec_is_validated() -> None:
    from harvester.failpoints import FailpointSpecError, parse

    assert parse("download.chunk=kill@17, harvest.before_manifest=kill") == {
        "download.chunk": 17,
        "harvest.before_manifest": 1,
    }
    for bad in ("nope=kill", "download.chunk=stop", "download.chunk=kill@0", "download.chunk"):
        with pytest.raises(FailpointSpecError):
            parse(bad)
