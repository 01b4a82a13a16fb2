"""Playment's server-side state: projects, batches and jobs, with its validation rules.

Pure (no HTTP): handlers translate requests into calls here and ``PlaymentError`` into the
documented error envelope. Projects spring into existence on first use, because the project
id comes from the client's config and every id must work against the emulator.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from harvester.emulator.scenario import PlaymentScenario

JobKind = Literal["point_cloud", "image", "video"]
PAGE_SIZE = 100
DEFAULT_BATCH_NAME = "Default Batch"


class PlaymentError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(slots=True)
class Job:
    job_id: str
    project_id: str
    reference_id: str
    batch_id: str
    work_flow_id: str
    tag: str
    priority_weight: int
    kind: JobKind
    data: dict[str, Any]
    frame_ids: tuple[str, ...]
    created_at: float


@dataclass(slots=True)
class Batch:
    batch_id: str
    name: str
    description: str
    job_ids: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Project:
    project_id: str
    default_batch_id: str
    batches: dict[str, Batch] = field(default_factory=dict)
    job_by_reference: dict[str, str] = field(default_factory=dict)


class PlaymentModel:
    def __init__(
        self,
        scenario: PlaymentScenario,
        seed: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._scenario = scenario
        self._clock = clock
        self._ids = random.Random(f"{seed}:playment-ids")
        self._projects: dict[str, Project] = {}
        self.jobs: dict[str, Job] = {}

    # -- jobs ---------------------------------------------------------------------------

    def validate_job(self, project_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Check a create body; returns the normalised fields. Raises ``PlaymentError``."""
        ref = body.get("reference_id")
        if not isinstance(ref, str) or not ref:
            raise PlaymentError(400, "FS_0002", "reference_id must be a non-empty string")
        data = body.get("data")
        if not isinstance(data, dict):
            raise PlaymentError(400, "FS_0003", "data must be an object")
        kind, frame_ids = _classify(data)
        flow = body.get("work_flow_id") or body.get("tag")
        if not isinstance(flow, str):
            raise PlaymentError(400, "GE_0001", "work_flow_id (or tag) must be a string")
        weight = body.get("priority_weight", 5)
        if weight is None:
            weight = 5
        if not isinstance(weight, int) or isinstance(weight, bool):
            raise PlaymentError(400, "GE_0001", "priority_weight must be an integer")
        project = self._project(project_id)
        batch_id = body.get("batch_id") or project.default_batch_id
        if not isinstance(batch_id, str) or batch_id not in project.batches:
            raise PlaymentError(400, "GE_0001", f"batch_id {batch_id!r} not found in project")
        tag = body.get("tag")
        return {
            "reference_id": ref,
            "data": data,
            "kind": kind,
            "frame_ids": frame_ids,
            "work_flow_id": flow,
            "tag": tag if isinstance(tag, str) and tag else flow,
            "priority_weight": weight,
            "batch_id": batch_id,
        }

    def existing(self, project_id: str, reference_id: str) -> Job | None:
        job_id = self._project(project_id).job_by_reference.get(reference_id)
        return self.jobs[job_id] if job_id else None

    def create_job(self, project_id: str, fields: Mapping[str, Any]) -> Job:
        """Create from ``validate_job`` output; ``FS_0001`` if the reference_id is taken."""
        project = self._project(project_id)
        if fields["reference_id"] in project.job_by_reference:
            raise PlaymentError(400, "FS_0001", "reference_id already exists")
        job = Job(
            job_id=self._new_id(),
            project_id=project_id,
            created_at=self._clock(),
            **fields,
        )
        self.jobs[job.job_id] = job
        project.job_by_reference[job.reference_id] = job.job_id
        project.batches[job.batch_id].job_ids.append(job.job_id)
        return job

    def get_job(self, project_id: str, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None or job.project_id != project_id:
            raise PlaymentError(404, "GE_0001", f"job {job_id} not found")
        return job

    def duration(self, job_id: str) -> float:
        """Seconds from create to ``completed``: ``job_duration_s``, or with
        ``job_duration_max_s`` a point spread uniformly up to it, fixed by the job's id."""
        scenario = self._scenario
        return job_duration(scenario.job_duration_s, scenario.job_duration_max_s, job_id)

    def status(self, job: Job) -> str:
        """Statuses advance evenly over the job's duration; the last is ``completed``."""
        statuses = self._scenario.statuses
        duration = self.duration(job.job_id)
        elapsed = self._clock() - job.created_at
        if duration <= 0 or elapsed >= duration:
            return statuses[-1]
        step = int(elapsed * (len(statuses) - 1) / duration)
        return statuses[min(step, len(statuses) - 2)]

    def document(self, job: Job, result_url: Callable[[Job], str]) -> dict[str, Any]:
        """The job as "Get job results" shows it; ``result`` is ``result_url(job)`` once the
        job is completed, "" before."""
        status = self.status(job)
        return {
            "project_id": job.project_id,
            "reference_id": job.reference_id,
            "job_id": job.job_id,
            "batch_id": job.batch_id,
            "status": status,
            "work_flow_id": job.work_flow_id,
            "priority_weight": job.priority_weight,
            "tag": job.tag,
            "result": result_url(job) if status == "completed" else "",
        }

    def is_completed(self, job: Job) -> bool:
        return self.status(job) == "completed"

    def jobs_per_reference(self) -> dict[str, dict[str, int]]:
        """Counted from the job table itself, not from the index that prevents duplicates."""
        out: dict[str, dict[str, int]] = {}
        for job in self.jobs.values():
            per = out.setdefault(job.project_id, {})
            per[job.reference_id] = per.get(job.reference_id, 0) + 1
        return out

    # -- batches ------------------------------------------------------------------------

    def create_batch(self, project_id: str, body: Mapping[str, Any]) -> Batch:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise PlaymentError(400, "GE_0001", "name must be a non-empty string")
        description = body.get("description") or ""
        if not isinstance(description, str):
            raise PlaymentError(400, "GE_0001", "description must be a string")
        project = self._project(project_id)
        if any(b.name == name for b in project.batches.values()):
            raise PlaymentError(400, "GE_0001", f"a batch named {name!r} already exists")
        batch = Batch(self._new_id(), name, description)
        project.batches[batch.batch_id] = batch
        return batch

    def list_batch(
        self, project_id: str, batch_id: str, page_token: str | None
    ) -> tuple[list[Job], str | None]:
        batch = self._project(project_id).batches.get(batch_id)
        if batch is None:
            raise PlaymentError(404, "GE_0001", f"batch {batch_id} not found")
        start = _decode_token(batch_id, page_token) if page_token else 0
        ids = batch.job_ids[start : start + PAGE_SIZE]
        end = start + len(ids)
        token = _encode_token(batch_id, end) if end < len(batch.job_ids) else None
        return [self.jobs[i] for i in ids], token

    # -- internals ----------------------------------------------------------------------

    def _project(self, project_id: str) -> Project:
        project = self._projects.get(project_id)
        if project is None:
            default = Batch(self._new_id(), DEFAULT_BATCH_NAME, "jobs created without batch_id")
            project = Project(project_id, default.batch_id, {default.batch_id: default})
            self._projects[project_id] = project
        return project

    def _new_id(self) -> str:
        return str(uuid.UUID(int=self._ids.getrandbits(128), version=4))


def _classify(data: Mapping[str, Any]) -> tuple[JobKind, tuple[str, ...]]:
    if "sensor_data" in data:
        return "point_cloud", _frame_ids(data["sensor_data"], "data.sensor_data.frames")
    if "video_data" in data:
        return "video", _frame_ids(data["video_data"], "data.video_data.frames", src=True)
    if isinstance(data.get("image_url"), str) and data["image_url"]:
        return "image", ()
    raise PlaymentError(400, "FS_0003", "data needs sensor_data, video_data or image_url")


def _frame_ids(section: object, where: str, *, src: bool = False) -> tuple[str, ...]:
    frames = section.get("frames") if isinstance(section, dict) else None
    if not isinstance(frames, list) or not frames:
        raise PlaymentError(400, "FS_0004", f"{where} must be a non-empty list")
    ids: list[str] = []
    for i, frame in enumerate(frames):
        fid = frame.get("frame_id") if isinstance(frame, dict) else None
        if not isinstance(fid, str) or not fid:
            raise PlaymentError(400, "FS_0004", f"{where}[{i}].frame_id must be a string")
        if src and not isinstance(frame.get("src"), str):
            raise PlaymentError(400, "FS_0004", f"{where}[{i}].src must be a string")
        ids.append(fid)
    if len(set(ids)) != len(ids):
        raise PlaymentError(400, "FS_0004", f"{where} has duplicate frame_id values")
    return tuple(ids)


def _encode_token(batch_id: str, offset: int) -> str:
    return base64.urlsafe_b64encode(f"{batch_id}:{offset}".encode()).decode().rstrip("=")


def _decode_token(batch_id: str, token: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        owner, _, offset = raw.rpartition(":")
        if owner == batch_id and int(offset) >= 0:
            return int(offset)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise PlaymentError(400, "GE_0001", "invalid page_token")


def job_duration(low: float, high: float | None, job_id: str) -> float:
    """A job's duration in [low, high], uniform over job ids (the same id, the same one)."""
    if high is None or high <= low:
        return low
    u = int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big") / 2**64
    return low + (high - low) * u
