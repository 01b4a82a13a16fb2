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
    case,
    check_final,
    child_env,
    record,
    scenario,
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
        c = case(tmp_path, emu.urls, "frames", playment=1, frames=FRAMES, others=0,
                 providers=("playment",))  # fmt: skip
        # job.json, result.json and classes.json are renamed into place first, then frames.
        first = c.harvest(env=child_env(HARVESTER_FAILPOINTS="rename.after_replace=kill@20"))
        assert first.killed, first.tail()
        folder = tmp_path / "out" / "playment" / "frames-p00"
        kept = _journaled(folder / JOURNAL)
        on_disk = len(list((folder / "labels").glob("*.npy")))
        assert 0 < kept <= on_disk < FRAMES, (kept, on_disk)
        since = len(emu.call(lambda: emu.state.requests(0)))

        second = c.harvest(jobs=False)
        assert second.returncode == 0, second.tail()
        gets = _mask_gets(emu, since)
        assert sum(gets.values()) == FRAMES - kept, (kept, gets)
        assert set(gets.values()) == {1}, gets
        assert not (folder / JOURNAL).exists()  # a complete folder holds only what it lists
        check_final(c.config, emu, c.lines, crashed=True)  # every frame equals the ground truth
    record("frames", "resume", frames=FRAMES, kept=kept, fetched_on_rerun=sum(gets.values()))


def test_frames_are_fetched_in_parallel_within_frame_concurrency(tmp_path: Path) -> None:
    slow = {"kind": "slow", "provider": "storage", "match": "/masks/", "delay_s": 0.2}
    sc = scenario({"playment": {"points_per_frame": 500}, "faults": [slow]})
    with EmulatorThread(sc) as emu:
        c = case(tmp_path, emu.urls, "par", playment=1, frames=12, others=0,
                 providers=("playment",))  # fmt: skip
        c.config.write_text(
            c.config.read_text().replace("[harvest]\n", "[harvest]\nframe_concurrency = 3\n")
        )
        run = c.harvest()
        assert run.returncode == 0, run.tail()
        at_once = emu.stats()["storage"]["max_in_flight"]
        assert at_once == 3, at_once
        check_final(c.config, emu, c.lines, crashed=False)
    record("frames", "parallel", frame_concurrency=3, max_in_flight=at_once)
