"""Jobs with many frames (issue 13, item 16).

- Killed mid-job (a real SIGKILL at a failpoint), a rerun fetches only the frames that were
  not yet on disk: the frames journal names each finished frame with its sha256, and every
  such frame is checked against the disk and kept. Before, a rerun started again from the
  first frame.
- A job's frames are fetched several at a time, never more than
  ``harvest.frame_concurrency`` (the emulator's storage host counts requests in flight).
"""

from __future__ import annotations

import json
from pathlib import Path

from harvester.harvest import JOURNAL

from .harness import (
    EmulatorThread,
    check_final,
    child_env,
    harvester,
    job_lines,
    record,
    scenario,
    write_config,
    write_jobs,
)

FRAMES = 40


def _mask_gets(emu: EmulatorThread, since: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in emu.call(lambda: emu.state.requests(since)):
        if r["method"] == "GET" and "/masks/" in r["path"]:
            counts[r["path"]] = counts.get(r["path"], 0) + 1
    return counts


def _journaled(path: Path) -> int:
    n = 0
    for line in path.read_bytes().splitlines():
        try:
            json.loads(line)
        except ValueError:
            continue  # torn by the kill: that frame does not count as kept
        n += 1
    return n


def test_a_rerun_after_a_kill_fetches_only_the_missing_frames(tmp_path: Path) -> None:
    with EmulatorThread(scenario({"playment": {"points_per_frame": [1000, 2000]}})) as emu:
        lines = job_lines("frames", playment=1, frames=FRAMES, others=0)
        config = write_config(tmp_path, emu.urls, "frames", providers=("playment",))
        jobs = write_jobs(tmp_path / "jobs.jsonl", lines)
        # job.json, result.json and classes.json are renamed into place first, then frames.
        kill = "rename.after_replace=kill@20"
        first = harvester(
            "harvest", "-c", str(config), str(jobs), "--no-progress",
            env=child_env(HARVESTER_FAILPOINTS=kill),
        )  # fmt: skip
        assert first.killed, first.tail()
        folder = tmp_path / "out" / "playment" / "frames-p00"
        kept = _journaled(folder / JOURNAL)
        on_disk = len(list((folder / "labels").glob("*.npy")))
        assert 0 < kept <= on_disk < FRAMES, (kept, on_disk)
        since = len(emu.call(lambda: emu.state.requests(0)))

        second = harvester("harvest", "-c", str(config), "--no-progress", env=child_env())
        assert second.returncode == 0, second.tail()
        gets = _mask_gets(emu, since)
        assert sum(gets.values()) == FRAMES - kept, (kept, gets)
        assert set(gets.values()) == {1}, gets
        assert not (folder / JOURNAL).exists()  # a complete folder holds only what it lists
        check_final(config, emu, lines, crashed=True)  # every frame equals the ground truth
    record("frames", "resume", frames=FRAMES, kept=kept, fetched_on_rerun=sum(gets.values()))


def test_frames_are_fetched_in_parallel_within_frame_concurrency(tmp_path: Path) -> None:
    slow = {"kind": "slow", "provider": "storage", "match": "/masks/", "delay_s": 0.2}
    sc = scenario({"playment": {"points_per_frame": 500}, "faults": [slow]})
    with EmulatorThread(sc) as emu:
        lines = job_lines("par", playment=1, frames=12, others=0)
        config = write_config(tmp_path, emu.urls, "par", providers=("playment",))
        config.write_text(
            config.read_text().replace("[harvest]\n", "[harvest]\nframe_concurrency = 3\n")
        )
        jobs = write_jobs(tmp_path / "jobs.jsonl", lines)
        run = harvester("harvest", "-c", str(config), str(jobs), "--no-progress", env=child_env())
        assert run.returncode == 0, run.tail()
        at_once = emu.stats()["storage"]["max_in_flight"]
        assert at_once == 3, at_once
        check_final(config, emu, lines, crashed=False)
    record("frames", "parallel", frame_concurrency=3, max_in_flight=at_once)
