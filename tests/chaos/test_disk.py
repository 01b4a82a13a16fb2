"""An output disk that is not there, read-only or full (issue 13, items 7 and 8).

- ``harvest`` finds an unwritable ``output.dir`` before anything is sent or stored: one
  ``harvester: ...`` line, exit 2, no request, no job added.
- A disk that fills up mid-harvest is one line and exit 2 as well. The job it hit is not
  charged: it is back in ``succeeded`` waiting for the disk, no mask was fetched again as if
  the network had failed, no temporary file is left, and a rerun once there is room harvests
  everything.
- The daemon stays up: not ready (``/readyz`` 503 with the reason) while the disk cannot be
  written, sending no create before the first probe passed, and it resumes by itself when
  the disk can be written again.

The disks are real: tmpfs mounts of a few hundred KiB (``tests/chaos/disk.py``).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from harvester.cli import main as cli_main
from harvester.config import load_config
from harvester.store.binding import MARKER
from tests.daemon.helpers import free_port

from .disk import fill, remount, temporaries, tmpfs
from .harness import (
    Case,
    EmulatorThread,
    Run,
    case,
    check_final,
    child_env,
    daemon,
    read_jobs,
    record,
    status_check,
    wait_until,
)

#: masks of this many points need a 200 KB staging file each: more than the room left
SCENARIO = {"playment": {"points_per_frame": [50_000, 60_000]}}
#: what the "nearly full" disk leaves: both jobs' job.json, result.json and classes.json fit
#: (64 KiB of tmpfs pages each, with the store file's page), their masks (32 KiB or more of
#: staging) do not. Room for one job's small files only made the test depend on which job's
#: result.json reached the disk first, now that writes run in worker threads.
ROOM = 152 * 1024


def _two_jobs(folder: Path, emu: EmulatorThread, project: str, **config: Any) -> Case:
    """Two Playment jobs of ``project`` and a config for Playment alone."""
    return case(folder, emu.urls, project, playment=2, others=0, providers=("playment",), **config)


def _creates(emu: EmulatorThread, project: str) -> int:
    by_ref = emu.stats()["playment"].get("creates_by_reference", {}).get(project, {})
    return sum(by_ref.values())


def _error_lines(run: Run) -> list[str]:
    return [ln for ln in run.log.splitlines() if ln.startswith("harvester: ")]


def _one_clear_line(run: Run, *says: str) -> str:
    assert run.returncode == 2, run.tail()
    assert "Traceback" not in run.log, run.log
    lines = _error_lines(run)
    assert len(lines) == 1, run.log
    for text in says:
        assert text in lines[0], lines[0]
    return lines[0]


def _mask_gets(emu: EmulatorThread, project: str) -> dict[str, int]:
    """Signed-URL GETs of each mask file of ``project``, by path."""
    counts: dict[str, int] = {}
    for r in emu.call(lambda: emu.state.requests(0)):
        if r["method"] == "GET" and "/masks/" in r["path"] and project in r["path"]:
            counts[r["path"]] = counts.get(r["path"], 0) + 1
    return counts


def test_output_dir_that_is_a_file_stops_harvest_before_anything(
    emu: EmulatorThread, tmp_path: Path
) -> None:
    c = _two_jobs(tmp_path, emu, "disk-file")
    (tmp_path / "out").write_text("not a folder")
    run = c.harvest()
    _one_clear_line(run, "output.dir", "is not a folder")
    assert _creates(emu, "disk-file") == 0
    assert read_jobs(load_config(c.config)) == {}  # nothing added either
    assert (tmp_path / "out").read_text() == "not a folder"


def test_read_only_output_stops_harvest_before_anything(
    emu: EmulatorThread, tmp_path: Path
) -> None:
    c = _two_jobs(tmp_path, emu, "disk-ro")
    with tmpfs(tmp_path / "out", "1m") as out:
        remount(out, "ro")
        run = c.harvest()
        _one_clear_line(run, "output.dir", "Read-only file system")
        assert list(out.iterdir()) == []
    assert _creates(emu, "disk-ro") == 0
    assert read_jobs(load_config(c.config)) == {}


def test_disk_full_mid_harvest_is_one_line_charges_nothing_and_resumes(
    emu: EmulatorThread, tmp_path: Path
) -> None:
    """The disk fills while masks stream in: before, the ENOSPC was a "network error", each
    mask was downloaded again and again, and the job ended in error for good."""
    project = "disk-full"
    c = _two_jobs(tmp_path, emu, project)
    config, lines = c.config, c.lines
    with tmpfs(tmp_path / "out", "2m") as out:
        filler, spare = fill(out, reserve=ROOM)
        spare.unlink()
        run = c.harvest()
        _one_clear_line(run, "No space left on device")
        assert "network" not in _error_lines(run)[0]
        assert temporaries(out) == []
        rows = read_jobs(load_config(config)).values()
        assert [r["state"] for r in rows if r["state"] == "error"] == []
        waiting = [r for r in rows if "waiting for the output directory" in (r["reason"] or "")]
        assert waiting, [(r["state"], r["reason"]) for r in rows]
        assert all(r["state"] == "succeeded" for r in waiting)
        assert all("No space left on device" in r["reason"] for r in waiting)
        # Fetched once, then the disk error stopped the harvest: no network-style retry.
        gets = _mask_gets(emu, project)
        assert gets and max(gets.values()) == 1, gets
        status_check(config)

        filler.unlink()
        again = c.harvest(jobs=False)
        assert again.returncode == 0, again.tail()
        assert temporaries(out) == []
        check_final(config, emu, lines, crashed=False)
    record("disk", "full-mid-harvest", mask_gets=sum(gets.values()), masks=len(gets))


def _readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def test_daemon_waits_for_its_disk_not_ready_and_resumes(
    emu: EmulatorThread, tmp_path: Path
) -> None:
    project = "disk-daemon"
    port = free_port()
    c = _two_jobs(tmp_path, emu, project, listen_port=port, jobs_file=tmp_path / "j.jsonl")
    config, lines = c.config, c.lines
    assert cli_main(["submit", "-c", str(config), str(c.jobs)]) == 0
    log = tmp_path / "daemon.log"
    started = time.monotonic()
    with tmpfs(tmp_path / "out", "2m") as out:
        remount(out, "ro")
        with daemon(config, child_env(), log) as proc:
            _daemon_phases(emu, config, out, proc, port, project, lines, log)
    record("disk", "daemon", seconds=round(time.monotonic() - started, 2))


def _daemon_phases(
    emu: EmulatorThread,
    config: Path,
    out: Path,
    proc: Any,
    port: int,
    project: str,
    lines: list[dict[str, Any]],
    log: Path,
) -> None:
    def not_ready(says: str) -> bool:
        code, doc = _readyz(port)
        return code == 503 and says in doc.get("reason", "")

    # Read-only from the start: up, not ready, and nothing sent.
    wait_until(lambda: not_ready("Read-only file system"), within=30, what="503 read-only")
    assert proc.poll() is None
    assert _creates(emu, project) == 0

    # Writable but nearly full: the jobs are created and finish, their masks do not fit.
    remount(out, "rw")
    filler, spare = fill(out, reserve=ROOM)
    spare.unlink()
    wait_until(lambda: not_ready("No space left on device"), within=30, what="503 full")

    def parked() -> bool:
        rows = read_jobs(load_config(config)).values()
        return any("No space left" in (r["reason"] or "") for r in rows)

    wait_until(parked, within=30, what="a job waiting for the disk")
    rows = read_jobs(load_config(config)).values()
    assert [r for r in rows if r["state"] in ("error", "failed")] == []
    assert all("network" not in (r["reason"] or "") for r in rows)
    assert proc.poll() is None, log.read_text()[-3000:]

    # Room again: ready, and every job harvested without a restart.
    filler.unlink()
    wait_until(lambda: _readyz(port)[0] == 200, within=40, what="ready again")

    def all_harvested() -> bool:
        rows = read_jobs(load_config(config)).values()
        return len(rows) == len(lines) and all(r["state"] == "harvested" for r in rows)

    wait_until(all_harvested, within=40, what="every job harvested")
    assert proc.poll() is None
    # started read-only, the output learns its store once it can be written
    assert (out / MARKER).is_file()
    assert "Traceback" not in log.read_text()
    assert temporaries(out) == []
    check_final(config, emu, lines, crashed=False)
    proc.terminate()
    assert proc.wait(30) == 0
