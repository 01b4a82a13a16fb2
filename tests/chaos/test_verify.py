"""``harvester status --check`` finds what the crash tests rely on it to find.

One real harvest, then each case damages a copy of its folder the way a broken harvester (or
disk) would, and the check must exit 1 with a line naming the job and the file. Without this
the crash tests' "the check passes" would prove nothing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest

from harvester.clock import SystemClock
from harvester.config import load_config
from harvester.harvest import JobOutput
from harvester.jobs import JobState
from harvester.store.sqlite import SqliteStore
from harvester.verify import verify_outputs

from .harness import (
    EmulatorThread,
    case,
    scenario,
)


@pytest.fixture(scope="module")
def harvested(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder holding a config, its store and its output: 3 Playment jobs harvested."""
    folder = tmp_path_factory.mktemp("harvested")
    with EmulatorThread(scenario()) as emu:
        c = case(folder, emu.urls, "verify", playment=3, others=0, providers=("playment",))
        run = c.harvest()
        assert run.returncode == 0, run.tail()
    yield folder


def _job_dir(root: Path, n: int = 0) -> Path:
    return root / "out" / "playment" / f"verify-p{n:02d}"


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-3])


def _rewrite_manifest(root: Path, edit: Callable[[dict[str, object]], None]) -> None:
    manifest = _job_dir(root) / "MANIFEST.json"
    doc = json.loads(manifest.read_text())
    edit(doc)
    manifest.write_text(json.dumps(doc))


def _relabel(root: Path) -> None:
    """Same bytes count, different labels, and a manifest recomputed to match the sha256
    but not the min/max it states."""
    path = _job_dir(root) / "labels" / "f-000.npy"
    arr = np.load(path)
    arr[:] = 0
    np.save(path, arr)
    from harvester.fsutil import sha256_file

    def edit(doc: dict[str, object]) -> None:
        files = doc["files"]
        assert isinstance(files, dict)
        files["labels/f-000.npy"]["sha256"] = sha256_file(path)

    _rewrite_manifest(root, edit)


def _symlink_to_copy(root: Path, path: Path) -> None:
    """``path`` replaced by a symlink to an identical copy outside the output directory:
    every byte still matches the manifest, yet it is not what harvester wrote."""
    elsewhere = root / "elsewhere" / path.name
    elsewhere.parent.mkdir(parents=True, exist_ok=True)
    path.rename(elsewhere)
    path.symlink_to(elsewhere)


DAMAGE: list[tuple[str, Callable[[Path], None], str]] = [
    ("label-byte-flipped", lambda r: _flip_byte(_job_dir(r) / "labels" / "f-001.npy"),
     "labels/f-001.npy: sha256"),
    ("result-truncated", lambda r: _truncate(_job_dir(r) / "result.json"),
     "result.json is"),
    ("file-deleted", lambda r: (_job_dir(r) / "classes.json").unlink(),
     "classes.json is listed in MANIFEST.json but missing"),
    ("temporary-left", lambda r: (_job_dir(r) / "labels" / ".f-000.npy.tmp-1234abcd").write_bytes(
        b"half"), "a temporary file that MANIFEST.json does not list: labels/.f-000.npy.tmp-"),
    ("unlisted-file", lambda r: (_job_dir(r) / "extra.bin").write_bytes(b"?"),
     "a file that MANIFEST.json does not list: extra.bin"),
    ("manifest-missing", lambda r: (_job_dir(r) / "MANIFEST.json").unlink(),
     "harvested, but"),
    ("folder-missing", lambda r: shutil.rmtree(_job_dir(r)), "does not exist"),
    ("manifest-not-json", lambda r: (_job_dir(r) / "MANIFEST.json").write_text("{"),
     "MANIFEST.json is unreadable"),
    ("manifest-unsafe-path",
     lambda r: _rewrite_manifest(r, lambda d: d["files"].update(  # type: ignore[attr-defined]
         {"../../state.db": {"bytes": 1, "sha256": "0"}})), "unsafe path '../../state.db'"),
    ("manifest-wrong-job", lambda r: _rewrite_manifest(r, lambda d: d.update(job_key="other")),
     "MANIFEST.json says job_key 'other'"),
    ("labels-not-as-stated", _relabel, "labels/f-000.npy holds labels 0..0"),
    ("file-symlinked-to-a-copy",
     lambda r: _symlink_to_copy(r, _job_dir(r) / "labels" / "f-000.npy"),
     "labels/f-000.npy is a symlink"),
    ("folder-symlinked-to-a-copy", lambda r: _symlink_to_copy(r, _job_dir(r) / "labels"),
     "labels is a symlink"),
    # (one leading outside is "not inside the output directory"; this one stays inside)
    ("job-folder-symlinked-to-a-copy", lambda r: _symlink_to_copy(r / "out", _job_dir(r)),
     "playment/verify-p00 is a symlink"),
]  # fmt: skip


@pytest.mark.parametrize(("damage", "says"), [pytest.param(d, s, id=name) for name, d, s in DAMAGE])
def test_check_finds_damage(
    harvested: Path, tmp_path: Path, damage: Callable[[Path], None], says: str
) -> None:
    from tests.badinput.helpers import cli

    root = tmp_path / "copy"
    shutil.copytree(harvested, root)
    assert cli("status", "-c", str(root / "harvester.toml"), "--check").code == 0
    damage(root)
    done = cli("status", "-c", str(root / "harvester.toml"), "--json", "--check")
    assert done.code == 1, done.out
    problems = json.loads(done.out)["check"]
    assert any("playment/verify-p00: " in p and says in p for p in problems), problems


def test_partial_array_of_an_unfinished_job_is_found(harvested: Path, tmp_path: Path) -> None:
    """No manifest to compare with (the job is still harvesting), yet a half-written array
    under its final name is found."""
    root = tmp_path / "copy"
    shutil.copytree(harvested, root)
    folder = _job_dir(root, 1)
    (folder / "MANIFEST.json").unlink()
    _truncate(folder / "labels" / "f-000.npy")
    config = load_config(root / "harvester.toml")
    assert config.store.path is not None
    jobs = [
        dataclasses.replace(j, state=JobState.HARVESTING, output=None)
        if j.key == "verify-p01"
        else j
        for j in _jobs(config.store.path)
    ]
    problems = verify_outputs(config.output.dir, jobs).problems
    assert len(problems) == 1 and "labels/f-000.npy is partial" in problems[0], problems


def test_a_reharvest_never_leaves_a_stale_manifest(harvested: Path, tmp_path: Path) -> None:
    """A harvest cut off after its MANIFEST.json was renamed into place but before the store
    said "harvested" is done again. Real providers' job documents change between polls (times,
    counters): the new job.json differs. Cut off again mid-way, the folder must not hold the
    old manifest vouching for files that have changed since."""
    root = tmp_path / "copy"
    shutil.copytree(harvested, root)
    config = load_config(root / "harvester.toml")
    assert config.store.path is not None
    job = next(j for j in _jobs(config.store.path) if j.key == "verify-p02")
    again = dataclasses.replace(job, state=JobState.HARVESTING, output=None)
    out = JobOutput(
        config.output.dir,
        again,
        transport=None,  # type: ignore[arg-type]  # nothing is downloaded here
        clock=SystemClock(),
        label_dtype="auto",
        chunk_bytes=4096,
    )
    anyio.run(out.write_json, "job.json", {"status": "completed", "updated_at": "a second later"})
    # ... and the process dies here, before write_manifest.
    assert verify_outputs(config.output.dir, [again]).problems == []


def _jobs(db: Path) -> list:  # type: ignore[type-arg]

    async def read() -> list:  # type: ignore[type-arg]
        async with SqliteStore(db) as store:
            return await store.jobs()

    return anyio.run(read)
