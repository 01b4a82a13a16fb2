"""Cognite's vision segmentation jobs and files: validation, status progression, segments.

Pure (no HTTP). A job is Queued for the first quarter of ``job_duration_s``, Running until
the end, then Completed or (with probability ``failure_rate``) Failed. Its segments and its
fate are functions of the seed and the request itself (file + prompt), not of the order jobs
arrived in, so the ground truth of a job is known the moment it is created.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from harvester.emulator import truth
from harvester.emulator.jobmodel import JobModel
from harvester.emulator.scenario import CogniteScenario
from harvester.emulator.timefmt import Stamp, epoch_ms

Status = Literal["Queued", "Running", "Completed", "Failed"]
MAX_ID = 2**53 - 1  # Cognite ids are JSON-safe integers
MAX_EXTERNAL_ID = 255
MAX_SPACE = 43  # a data-modeling space id
MAX_DOWNLOAD_ITEMS = 100
QUEUED_FRACTION = 0.25
CONCURRENCY_MESSAGE = (
    "Too many concurrent requests: at most {n} segmentation jobs may be Queued or Running "
    "in a project at once (concurrency limit)"
)
_FAILURES = (
    "File could not be decoded as an image",
    "Segmentation model failed to produce a mask for the prompt",
    "Internal error while running the vision model",
)


class CogniteError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        missing: list[dict[str, Any]] | None = None,
        duplicated: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.missing = missing
        self.duplicated = duplicated

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.status, "message": self.message}
        if self.missing:
            error["missing"] = self.missing
        if self.duplicated:
            error["duplicated"] = self.duplicated
        return {"error": error}


@dataclass(frozen=True, slots=True)
class FileRef:
    id: int
    external_id: str | None = None
    #: ``(space, externalId)`` of the data-modeling node that names the file, if it was so named
    instance_id: tuple[str, str] | None = None

    def to_json(self, *, with_instance: bool = True) -> dict[str, Any]:
        # The reference shows fileInstanceId in the create answer's items and in
        # failedItems, but not in a job document's items (seed 001): there, it is left out.
        out: dict[str, Any] = {"fileId": self.id}
        if self.external_id is not None:
            out["fileExternalId"] = self.external_id
        if self.instance_id is not None and with_instance:
            space, xid = self.instance_id
            out["fileInstanceId"] = {"space": space, "externalId": xid}
        return out


@dataclass(slots=True)
class SegmentJob:
    job_id: int
    project: str
    file: FileRef
    prompt: dict[str, Any]
    stamp: Stamp
    key: str  # names the job's ground truth: a digest of file and prompt
    fails: bool


class CogniteModel(JobModel[CogniteScenario]):
    def _start(self) -> None:
        self._next_id = 1_000_000_000_000 + int(
            truth.rng_for(self._seed, "cognite", "job-ids").integers(0, 10**12)
        )
        self._missing_ids = {m for m in self._s.missing_files if isinstance(m, int)}
        self._missing_xids = {m for m in self._s.missing_files if isinstance(m, str)}
        self._active: dict[str, list[float]] = {}  # project -> heap of job end times
        self.jobs: dict[int, SegmentJob] = {}
        self.projects: set[str] = set()

    # -- segmentation jobs --------------------------------------------------------------

    def create(self, project: str, body: Mapping[str, Any]) -> SegmentJob:
        file, prompt = self.validate(body)
        now = self._clock()
        self._admit(project, now)
        key = truth.digest({"file": file.to_json(), "prompt": prompt})
        job = SegmentJob(
            job_id=self._next_id,
            project=project,
            file=file,
            prompt=prompt,
            stamp=self._stamp(now),
            key=key,
            fails=truth.unit_draw(self._seed, "cognite", "fails", key) < self._s.failure_rate,
        )
        self._next_id += 1
        self.jobs[job.job_id] = job
        self.projects.add(project)
        return job

    def get(self, project: str, job_id: str) -> SegmentJob:
        try:
            jid = int(job_id)
        except ValueError:
            raise CogniteError(400, f"Invalid jobId {job_id!r}: must be an integer") from None
        job = self.jobs.get(jid)
        if job is None or job.project != project:
            raise CogniteError(400, "Job not found", missing=[{"jobId": jid}])
        return job

    def status(self, job: SegmentJob) -> tuple[Status, float]:
        """The job's status now, and the monotonic time it entered it."""
        d = self._s.job_duration_s
        elapsed = self._clock() - job.stamp.mono
        if elapsed >= d:
            return ("Failed" if job.fails else "Completed"), job.stamp.mono + d
        if elapsed >= d * QUEUED_FRACTION:
            return "Running", job.stamp.mono + d * QUEUED_FRACTION
        return "Queued", job.stamp.mono

    def render(self, job: SegmentJob, *, just_created: bool = False) -> dict[str, Any]:
        # The create answer is always "Queued", even for a zero-length job: the job is
        # queued at the instant it is accepted. It echoes the prompt's points and box at
        # the top level (the POST reference); the job document nests them under "prompt".
        status, since = ("Queued", job.stamp.mono) if just_created else self.status(job)
        wall = job.stamp.wall_at
        doc: dict[str, Any] = {"status": status, "createdTime": epoch_ms(job.stamp.wall)}
        if status != "Queued":
            start = job.stamp.mono + self._s.job_duration_s * QUEUED_FRACTION
            doc["startTime"] = epoch_ms(wall(start))
        doc["statusTime"] = epoch_ms(wall(since))
        doc["jobId"] = job.job_id
        if status == "Completed":
            doc["items"] = [
                {**job.file.to_json(with_instance=False), "segments": self.segments(job)}
            ]
        elif status == "Failed":
            doc["items"] = []
        else:
            doc["items"] = [job.file.to_json(with_instance=just_created)]
        if just_created:
            doc.update(job.prompt)
        else:
            doc["prompt"] = job.prompt
        if status == "Failed":
            message = self.failure_message(job)
            doc["errorMessage"] = message
            doc["failedItems"] = [{"errorMessage": message, "items": [job.file.to_json()]}]
        return doc

    def failure_message(self, job: SegmentJob) -> str:
        pick = truth.unit_draw(self._seed, "cognite", "failure", job.key)
        return _FAILURES[int(pick * len(_FAILURES))]

    def segments(self, job: SegmentJob) -> list[dict[str, Any]]:
        # Recomputed on every read (well under a millisecond) rather than kept: benchmarks
        # hold many thousands of jobs, and memory must not grow with how often they are read.
        return self._make_segments(job)

    def truth(self, key: str) -> dict[str, Any]:
        try:
            job = self.jobs[int(key)]
        except ValueError:
            raise KeyError(key) from None
        out: dict[str, Any] = {"jobId": job.job_id, "project": job.project}
        if job.fails:
            out.update(outcome="Failed", errorMessage=self.failure_message(job), items=[])
        else:
            items = [{**job.file.to_json(with_instance=False), "segments": self.segments(job)}]
            out.update(outcome="Completed", items=items)
        return out

    def count_by_status(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for job in self.jobs.values():
            status = self.status(job)[0]
            out[status] = out.get(status, 0) + 1
        return out

    # -- validation ---------------------------------------------------------------------

    def validate(self, body: Mapping[str, Any]) -> tuple[FileRef, dict[str, Any]]:
        """Check a segmentation create body; returns the file and the normalised prompt."""
        _only_keys(body, {"items", "points", "boundingBox"}, "")
        items = body.get("items")
        if not isinstance(items, list) or len(items) != 1:
            raise CogniteError(400, "items: exactly one item is required (size 1..1)")
        file = self._file_ref(items[0], "items[0]")
        points = body.get("points", [])
        if not isinstance(points, list):
            raise CogniteError(400, "points must be a list")
        prompt: dict[str, Any] = {"points": [_point(p, i) for i, p in enumerate(points)]}
        if body.get("boundingBox") is not None:
            prompt["boundingBox"] = _bounding_box(body["boundingBox"])
        if not prompt["points"] and "boundingBox" not in prompt:
            raise CogniteError(400, "a prompt needs at least one point or a boundingBox")
        return file, prompt

    def _file_ref(self, item: object, where: str) -> FileRef:
        if not isinstance(item, dict):
            raise CogniteError(400, f"{where} must be an object")
        forms = ("fileId", "fileExternalId", "fileInstanceId")
        _only_keys(item, set(forms), where)
        if sum(form in item for form in forms) != 1:
            raise CogniteError(
                400, f"{where}: exactly one of fileId, fileExternalId and fileInstanceId"
            )
        if "fileInstanceId" in item:
            space, xid = self._node(item["fileInstanceId"], f"{where}.fileInstanceId")
            return FileRef(self.id_for_external(f"{space}:{xid}"), instance_id=(space, xid))
        if "fileId" in item:
            file_id = _identifier(item["fileId"], f"{where}.fileId")
            if file_id in self._missing_ids:
                raise CogniteError(400, "Files not found", missing=[{"fileId": file_id}])
            return FileRef(file_id)
        xid = _external_id(item["fileExternalId"], f"{where}.fileExternalId")
        if xid in self._missing_xids:
            raise CogniteError(400, "Files not found", missing=[{"fileExternalId": xid}])
        return FileRef(self.id_for_external(xid), xid)

    @staticmethod
    def _node(node: object, where: str) -> tuple[str, str]:
        """A data-modeling node id ``{space, externalId}`` (the same file, wherever named)."""
        if not isinstance(node, dict):
            raise CogniteError(400, f"{where} must be an object")
        _only_keys(node, {"space", "externalId"}, where)
        space = _external_id(node.get("space"), f"{where}.space", MAX_SPACE)
        return space, _external_id(node.get("externalId"), f"{where}.externalId")

    def id_for_external(self, external_id: str) -> int:
        return 1 + truth.derived_seed(self._seed, "cognite", "xid", external_id) % MAX_ID

    def _admit(self, project: str, now: float) -> None:
        """Enforce ``max_active_jobs``: a heap of end times per project, pruned lazily."""
        limit = self._s.max_active_jobs
        heap = self._active.setdefault(project, [])
        while heap and heap[0] <= now:
            heapq.heappop(heap)
        if limit and len(heap) >= limit:
            raise CogniteError(429, CONCURRENCY_MESSAGE.format(n=limit))
        heapq.heappush(heap, now + self._s.job_duration_s)

    # -- files --------------------------------------------------------------------------

    def download_items(self, body: Mapping[str, Any]) -> list[tuple[dict[str, Any], int]]:
        """Validate a ``files/downloadlink`` body; returns (identifier as sent, file id)."""
        _only_keys(body, {"items"}, "")
        items = body.get("items")
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_DOWNLOAD_ITEMS:
            raise CogniteError(400, f"items: size must be between 1 and {MAX_DOWNLOAD_ITEMS}")
        out: list[tuple[dict[str, Any], int]] = []
        seen: set[tuple[str, object]] = set()
        duplicated: list[dict[str, Any]] = []
        missing: list[dict[str, Any]] = []
        for i, item in enumerate(items):
            where = f"items[{i}]"
            if not isinstance(item, dict):
                raise CogniteError(400, f"{where} must be an object")
            _only_keys(item, {"id", "externalId", "instanceId"}, where)
            if sum(k in item for k in ("id", "externalId", "instanceId")) != 1:
                raise CogniteError(400, f"{where}: exactly one of id, externalId and instanceId")
            ident: dict[str, Any]
            if "instanceId" in item:
                space, node_xid = self._node(item["instanceId"], f"{where}.instanceId")
                ident = {"instanceId": {"space": space, "externalId": node_xid}}
                file_id = self.id_for_external(f"{space}:{node_xid}")
                absent = False
            elif "id" in item:
                file_id = _identifier(item["id"], f"{where}.id")
                ident = {"id": file_id}
                absent = file_id in self._missing_ids
            else:
                xid = _external_id(item["externalId"], f"{where}.externalId")
                ident = {"externalId": xid}
                file_id = self.id_for_external(xid)
                absent = xid in self._missing_xids
            kind, value = next(iter(ident.items()))
            mark = (kind, tuple(value.values()) if isinstance(value, dict) else value)
            if mark in seen:
                duplicated.append(ident)
            seen.add(mark)
            if absent:
                missing.append(ident)
            out.append((ident, file_id))
        if duplicated:
            raise CogniteError(400, "Duplicate identifiers", duplicated=duplicated)
        if missing:
            raise CogniteError(400, "Files not found", missing=missing)
        return out

    def file_exists(self, file_id: int) -> bool:
        return 1 <= file_id <= MAX_ID and file_id not in self._missing_ids

    def file_bytes(self, project: str, file_id: int) -> bytes:
        rng = truth.rng_for(self._seed, "cognite", "file", project, str(file_id))
        return bytes(rng.bytes(self._s.file_bytes))

    # -- ground truth -------------------------------------------------------------------

    def _make_segments(self, job: SegmentJob) -> list[dict[str, Any]]:
        s = self._s
        rng = truth.rng_for(self._seed, "cognite", "segments", job.key)
        box = job.prompt.get("boundingBox") or {"xMin": 0, "yMin": 0, "xMax": 1, "yMax": 1}
        anchors = [(p["x"], p["y"]) for p in job.prompt["points"] if p["label"] == 1] or [
            ((box["xMin"] + box["xMax"]) / 2, (box["yMin"] + box["yMax"]) / 2)
        ]
        segments: list[dict[str, Any]] = []
        for k in range(int(rng.integers(*s.segments_per_item, endpoint=True))):
            cx, cy = anchors[k % len(anchors)]
            polygons = []
            for j in range(int(rng.integers(*s.polygons_per_segment, endpoint=True))):
                if j:  # further polygons of a segment are nearby islands
                    cx, cy = cx + rng.normal(0, 0.08), cy + rng.normal(0, 0.08)
                polygons.append(_polygon(rng, cx, cy, box, s.vertices_per_polygon))
            segments.append({"score": _r(rng.uniform(0.5, 1.0)), "polygons": polygons})
        segments.sort(key=lambda seg: -float(seg["score"]))
        return segments


def _polygon(
    rng: np.random.Generator,
    cx: float,
    cy: float,
    box: Mapping[str, float],
    vertex_range: tuple[int, int],
) -> dict[str, Any]:
    n = int(rng.integers(*vertex_range, endpoint=True))
    angles = np.sort(rng.uniform(0.0, 2 * math.pi, n))
    radii = rng.uniform(0.02, 0.2) * rng.uniform(0.7, 1.3, n)
    xs = np.clip(cx + radii * np.cos(angles), box["xMin"], box["xMax"])
    ys = np.clip(cy + radii * np.sin(angles), box["yMin"], box["yMax"])
    conf = rng.uniform(0.5, 1.0, n)
    vertices = [
        {"x": _r(x), "y": _r(y), "confidence": _r(c)}
        for x, y, c in zip(xs.tolist(), ys.tolist(), conf.tolist(), strict=True)
    ]
    return {"vertices": vertices, "confidence": _r(float(conf.mean()))}


def _r(v: float) -> float:
    # Four decimals: exact through any JSON round trip, so truth compares with ==.
    return round(float(v), 4)


def _only_keys(doc: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in doc:
        if key not in allowed:
            name = f"{where}.{key}" if where else key
            raise CogniteError(400, f"Unrecognized field {name!r}")


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _identifier(v: object, where: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_ID:
        raise CogniteError(400, f"{where} must be an integer between 1 and {MAX_ID}")
    return v


def _external_id(v: object, where: str, limit: int = MAX_EXTERNAL_ID) -> str:
    if not isinstance(v, str) or not 1 <= len(v) <= limit:
        raise CogniteError(400, f"{where} must be a string of 1..{limit} characters")
    return v


def _point(p: object, i: int) -> dict[str, Any]:
    where = f"points[{i}]"
    if not isinstance(p, dict):
        raise CogniteError(400, f"{where} must be an object")
    _only_keys(p, {"x", "y", "label"}, where)
    for axis in ("x", "y"):
        v = p.get(axis)
        if not isinstance(v, int | float) or not _is_number(v) or not 0 <= v <= 1:
            raise CogniteError(400, f"{where}.{axis} must be a number between 0 and 1")
    label = p.get("label")
    if label not in (0, 1) or isinstance(label, bool | float):
        raise CogniteError(400, f"{where}.label must be 0 (background) or 1 (foreground)")
    return {"x": p["x"], "y": p["y"], "label": label}


def _bounding_box(box: object) -> dict[str, Any]:
    if not isinstance(box, dict):
        raise CogniteError(400, "boundingBox must be an object")
    keys = ("xMin", "yMin", "xMax", "yMax")
    _only_keys(box, set(keys), "boundingBox")
    for key in keys:
        v = box.get(key)
        if not isinstance(v, int | float) or not _is_number(v) or not 0 <= v <= 1:
            raise CogniteError(400, f"boundingBox.{key} must be a number between 0 and 1")
    if not (box["xMin"] < box["xMax"] and box["yMin"] < box["yMax"]):
        raise CogniteError(400, "boundingBox: xMin < xMax and yMin < yMax are required")
    return {k: box[k] for k in keys}
