"""``status --check`` for an object-store ``output.dir``: each job's objects against its
``MANIFEST.json`` (see ``harvester.verify`` for the rules; a bucket has no temporary names
nor symlinks, so what remains is: a harvested job has a true manifest listing every object
under its prefix, and any other job's manifest, if present, is true).

Every object listed is read back and hashed as it streams; label arrays go through a
temporary local file so their dtype, shape, min and max are checked like a local file's.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import orjson

from harvester.errors import OutputError
from harvester.jobs import Job, JobState
from harvester.objstore import Bucket
from harvester.verify import MANIFEST, Report, array_problem

_MAX_MANIFEST = 64 << 20


def verify_objects(bucket: Bucket, job: Job, report: Report) -> None:
    harvested = job.state == JobState.HARVESTED
    prefix = job.output if harvested and job.output else f"{job.provider}/{job.key}"
    name = f"{job.provider}/{job.key}"

    def problem(text: str) -> None:
        report.problems.append(f"{name}: {text}")

    parts = PurePosixPath(prefix).parts
    if not parts or prefix.startswith("/") or any(p in ("", ".", "..") for p in parts):
        problem(f"output folder {prefix!r} is not inside the output directory")
        return
    try:
        objects = bucket.listing(prefix)
        raw = bucket.read(f"{prefix}/{MANIFEST}", _MAX_MANIFEST) if MANIFEST in objects else None
    except OutputError as exc:
        problem(str(exc))
        return
    if harvested:
        report.jobs += 1
        if raw is None:
            problem(f"harvested, but {bucket.url(prefix)} has no {MANIFEST}")
            return
    if raw is None:
        return
    try:
        doc: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        problem(f"{MANIFEST} is unreadable: {exc}")
        return
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict):
        problem(f"{MANIFEST} has no 'files' object")
        return
    for key, expected in (("provider", job.provider), ("job_key", job.key)):
        if doc.get(key) != expected:
            problem(f"{MANIFEST} says {key} {doc.get(key)!r}, the store {expected!r}")
    for rel, entry in sorted(files.items()):
        text = _entry(bucket, prefix, rel, entry, objects, report)
        if text:
            problem(text)
    for rel in sorted(set(objects) - set(files) - {MANIFEST}):
        problem(
            f"an object that {MANIFEST} does not list: {rel}"
            if harvested
            else f"{MANIFEST} is present but does not list {rel}"
        )


def _entry(
    bucket: Bucket, prefix: str, rel: str, entry: Any, objects: dict[str, int], report: Report
) -> str | None:
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return f"{MANIFEST} lists an unsafe path {rel!r}"
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("bytes"), int)
        or not isinstance(entry.get("sha256"), str)
    ):
        return f"{MANIFEST} entry for {rel} lacks bytes or sha256"
    size = objects.get(rel)
    if size is None:
        return f"{rel} is listed in {MANIFEST} but missing"
    if size != entry["bytes"]:
        return f"{rel} is {size} bytes, {MANIFEST} says {entry['bytes']}"
    report.files += 1
    report.bytes += size
    is_array = "dtype" in entry or "shape" in entry
    h = hashlib.sha256()
    try:
        with tempfile.NamedTemporaryFile(prefix="harvester-check-", suffix=".npy") as tmp:
            for chunk in bucket.chunks(f"{prefix}/{rel}"):
                h.update(chunk)
                if is_array:
                    tmp.write(chunk)
            tmp.flush()
            if h.hexdigest() != entry["sha256"]:
                return f"{rel}: sha256 {h.hexdigest()} differs from {MANIFEST}'s {entry['sha256']}"
            return array_problem(rel, Path(tmp.name), entry) if is_array else None
    except OutputError as exc:
        return str(exc)
