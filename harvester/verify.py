"""Checking output folders against their manifests (``harvester status --check``).

The store's own ``check()`` looks at rows; this looks at files. Read-only, and each problem
is one line naming the job and the file.

- A **harvested** job's folder must exist under ``output.dir`` and hold a ``MANIFEST.json``
  that lists every file in the folder, each with the size and sha256 it has on disk (label
  arrays also with their dtype, shape, min and max). A temporary file left behind, or a file
  the manifest does not list, is a problem: the harvest that wrote the manifest swept the
  folder first and renamed everything into place.
- Any other job's folder may hold what a cut-off harvest left (temporary files, some final
  files, no manifest). Still, nothing under a final name may be partial: a ``MANIFEST.json``
  there must be true (its presence promises a complete folder) and every ``.npy`` must be as
  long as its header says. (Other files hold what the provider served, byte for byte: a
  job that ended in error may well keep a result document that is not valid JSON.)
- No symlink anywhere in a job's folder, nor in place of the folder itself: harvester never
  writes one (it replaces those it meets), so one there was planted, and a file it points to
  is not the file harvester wrote, however equal its bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import orjson

from harvester.fsutil import TMP_MARK, sha256_file
from harvester.jobs import Job, JobState
from harvester.objstore import Bucket

MANIFEST = "MANIFEST.json"
_MIN_MAX_BLOCK = 1 << 22  # elements per step when checking an array's min and max


@dataclass(slots=True)
class Report:
    problems: list[str] = field(default_factory=list)
    jobs: int = 0  #: harvested jobs whose folders were checked
    files: int = 0  #: files whose sha256 was compared with a manifest
    bytes: int = 0  #: bytes hashed

    def as_json(self) -> dict[str, int]:
        return {"harvested_jobs": self.jobs, "files": self.files, "bytes": self.bytes}


def verify_outputs(root: Path | Bucket, jobs: Iterable[Job]) -> Report:
    """Check the output folder of every job in ``jobs`` under ``root`` (``output.dir``)."""
    report = Report()
    if isinstance(root, Bucket):
        from harvester.verify_objects import verify_objects

        for job in jobs:
            verify_objects(root, job, report)
        return report
    base = root.resolve()
    for job in jobs:
        _Job(job, root, base, report).check()
    return report


class _Job:
    def __init__(self, job: Job, root: Path, base: Path, report: Report) -> None:
        self.job = job
        self.root = root
        self.base = base
        self.report = report
        self.harvested = job.state == JobState.HARVESTED
        relative = job.output if self.harvested and job.output else f"{job.provider}/{job.key}"
        self.relative = relative
        self.dir = root / relative

    def problem(self, text: str) -> None:
        self.report.problems.append(f"{self.job.provider}/{self.job.key}: {text}")

    def check(self) -> None:
        resolved = self.dir.resolve()
        if resolved == self.base or not resolved.is_relative_to(self.base):
            self.problem(f"output folder {self.relative!r} is not inside the output directory")
            return
        parts = PurePosixPath(self.relative).parts
        for i in range(1, len(parts) + 1):
            if self.root.joinpath(*parts[:i]).is_symlink():
                self.problem(f"{'/'.join(parts[:i])} is a symlink (output folders never are)")
                return
        if not self.dir.is_dir():
            if self.harvested:
                self.problem(f"harvested, but its output folder {self.dir} does not exist")
            return
        on_disk, links = _files(self.dir)
        for rel in links:
            self.problem(f"{rel} is a symlink (harvester never writes one)")
        manifest = self.dir / MANIFEST
        if self.harvested:
            self.report.jobs += 1
            if not manifest.is_file():
                self.problem(f"harvested, but {self.dir} has no {MANIFEST}")
                self._whole(on_disk)
                return
        if manifest.is_file():
            listed = self._manifest(manifest)
            if listed is None:
                return
            for rel in sorted(set(on_disk) - listed - {MANIFEST}):
                temporary = TMP_MARK in PurePosixPath(rel).name
                if self.harvested:
                    kind = "a temporary file" if temporary else "a file"
                    self.problem(f"{kind} that {MANIFEST} does not list: {rel}")
                elif not temporary:
                    self.problem(f"{MANIFEST} is present but does not list {rel}")
        else:
            self._whole(on_disk)

    def _manifest(self, path: Path) -> set[str] | None:
        """Compare every entry with the disk; the relative paths listed (None: unreadable)."""
        try:
            doc: Any = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            self.problem(f"{MANIFEST} is unreadable: {exc}")
            return None
        files = doc.get("files") if isinstance(doc, dict) else None
        if not isinstance(files, dict):
            self.problem(f"{MANIFEST} has no 'files' object")
            return None
        for name, expected in (("provider", self.job.provider), ("job_key", self.job.key)):
            if doc.get(name) != expected:
                self.problem(f"{MANIFEST} says {name} {doc.get(name)!r}, the store {expected!r}")
        for rel, entry in sorted(files.items()):
            self._entry(rel, entry)
        return set(files)

    def _entry(self, rel: str, entry: Any) -> None:
        parts = PurePosixPath(rel).parts
        if not parts or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            self.problem(f"{MANIFEST} lists an unsafe path {rel!r}")
            return
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("bytes"), int)
            or not isinstance(entry.get("sha256"), str)
        ):
            self.problem(f"{MANIFEST} entry for {rel} lacks bytes or sha256")
            return
        path = self.dir / rel
        if path.is_symlink():
            return  # reported as a symlink already
        if not path.is_file():
            self.problem(f"{rel} is listed in {MANIFEST} but missing")
            return
        size = path.stat().st_size
        if size != entry["bytes"]:
            self.problem(f"{rel} is {size} bytes, {MANIFEST} says {entry['bytes']}")
            return
        self.report.files += 1
        self.report.bytes += size
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            self.problem(f"{rel}: sha256 {digest} differs from {MANIFEST}'s {entry['sha256']}")
            return
        if "dtype" in entry or "shape" in entry:
            self._array(rel, path, entry)

    def _array(self, rel: str, path: Path, entry: dict[str, Any]) -> None:
        problem = array_problem(rel, path, entry)
        if problem:
            self.problem(problem)

    def _whole(self, on_disk: Iterable[str]) -> None:
        """No manifest to compare with: files under final names must at least be whole."""
        for rel in sorted(on_disk):
            name = PurePosixPath(rel).name
            if TMP_MARK in name:
                if self.harvested:
                    self.problem(f"a temporary file was left behind: {rel}")
                continue
            path = self.dir / rel
            if name.endswith(".npy"):
                problem = _npy_problem(path)
                if problem:
                    self.problem(f"{rel} is partial: {problem}")


def _files(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """The regular files under ``folder`` by relative path, and every symlink there (to a
    file or a folder; never followed)."""
    out: dict[str, Path] = {}
    links: list[str] = []
    for dirpath, dirs, names in os.walk(folder):
        for name in sorted(dirs + names):
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                links.append(rel)
            elif name in names:
                out[rel] = path
    return out, links


def _npy_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole ``.npy`` file (None when it is)."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            header = fh.tell()
    except (OSError, ValueError) as exc:
        return f"unreadable header ({exc})"
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    return None if size == expected else f"{size} bytes, its header promises {expected}"


def array_problem(rel: str, path: Path, entry: dict[str, Any]) -> str | None:
    """Why the ``.npy`` at ``path`` is not the array its manifest ``entry`` describes."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        return f"{rel} is not a loadable .npy: {exc}"
    if str(arr.dtype) != entry.get("dtype") or list(arr.shape) != entry.get("shape"):
        return (
            f"{rel} is {arr.dtype}{list(arr.shape)}, {MANIFEST} says"
            f" {entry.get('dtype')}{entry.get('shape')}"
        )
    low = high = None
    for start in range(0, arr.size, _MIN_MAX_BLOCK):
        block = arr.reshape(-1)[start : start + _MIN_MAX_BLOCK]
        lo, hi = int(block.min()), int(block.max())
        low = lo if low is None else min(low, lo)
        high = hi if high is None else max(high, hi)
    if (low, high) != (entry.get("min"), entry.get("max")):
        return (
            f"{rel} holds labels {low}..{high}, {MANIFEST} says"
            f" {entry.get('min')}..{entry.get('max')}"
        )
    return None
