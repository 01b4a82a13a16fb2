"""Bentley Reality Analysis jobs and their output reality data: validation, states, blobs.

Pure (no HTTP). A job is Queued for the first fifth of ``job_duration_s``, Active until the
end, then Success. A failing job (probability ``failure_rate``) stops part-way through Active,
spends ``terminating_s`` Terminating, then is Failed; a cancelled one spends it Terminating,
then is Cancelled (the v2 schema's states). Progress advances in ``progress_step`` percent
steps and freezes where the job stopped.

A create body is checked against Bentley's published v2 schemas (``harvester.specs``): an
old v1-style body (inputs as a list) is a 400 like any other schema breach.

Each output of a successful job is one reality data (one blob container) holding
``<output>/labels.json`` and ``<output>/segmentation/part-NNNN.bin``; every byte is a function
of the seed and the job's own request, not of arrival order.

Jobs are found by id, or listed with a ``$filter`` (``odata``), ``$top`` and a
``continuationToken``, in creation order.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from harvester.emulator import odata, truth
from harvester.emulator.jobmodel import JobModel
from harvester.emulator.scenario import BentleyScenario
from harvester.emulator.timefmt import Stamp, iso_z
from harvester.errors import CreateProblem
from harvester.specs import bentley_v2

State = Literal["Queued", "Active", "Terminating", "Success", "Failed", "Cancelled"]
#: jobs per listing page unless ``$top`` says otherwise, and the most ``$top`` may ask for
LIST_DEFAULT_TOP = 100
LIST_MAX_TOP = 1000
TERMINAL: frozenset[str] = frozenset({"Success", "Failed", "Cancelled"})
QUEUED_FRACTION = 0.2
_CLASSES = ("background", "building", "road", "vegetation", "vehicle", "water", "pole", "sign")
_FAILURES = (
    ("InputDataError", "Input data error", "Input reality data %1 could not be read."),
    ("DetectorError", "Detector error", "The detector failed on %1 of the input photos."),
    ("InternalError", "Internal error", "An internal error occurred while processing job %1."),
)


class BentleyError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        target: str | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.target = target
        self.details = details

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.target is not None:
            error["target"] = self.target
        if self.details:
            error["details"] = self.details
        return {"error": error}


def _bad_request(code: str, message: str, target: str) -> BentleyError:
    detail: dict[str, Any] = {"code": code, "message": message}
    if target:
        detail["target"] = target
    return BentleyError(
        400,
        "InvalidRealityAnalysisRequest",
        "Provided request body is not valid.",
        details=[detail],
    )


def _invalid_change(message: str, target: str) -> BentleyError:
    return BentleyError(422, "InvalidChange", message, target=target)


@dataclass(frozen=True, slots=True)
class Blob:
    name: str  # path inside the container
    size: int


@dataclass(slots=True)
class AnalysisJob:
    id: str
    name: str | None
    type: str
    itwin_id: str
    inputs: dict[str, str]  # input name -> reality data id
    outputs: dict[str, str]  # output name -> reality data id (or bkt: path)
    options: dict[str, Any] | None  # None: the create body had none
    user_id: str
    stamp: Stamp
    key: str  # names the job's ground truth: a digest of its request
    fails: bool
    fail_fraction: float  # how far through Active a failing job gets
    estimated_units: float
    cancel_at: float | None = None


class BentleyModel(JobModel[BentleyScenario]):
    def _start(self) -> None:
        self._ids = truth.rng_for(self._seed, "bentley", "ids")
        self.jobs: dict[str, AnalysisJob] = {}
        self._reality_data: dict[str, tuple[AnalysisJob, str]] = {}

    # -- jobs ---------------------------------------------------------------------------

    def create(self, body: Mapping[str, Any], client_id: str) -> AnalysisJob:
        fields = validate(body)
        key = truth.digest(fields)
        now = self._stamp()
        specs = fields["specifications"]
        job = AnalysisJob(
            id=self._new_id(),
            name=fields.get("name"),
            type=fields["type"],
            itwin_id=fields["iTwinId"],
            inputs=dict(specs["inputs"]),
            outputs={name: self._output_id(fields["type"], name) for name in specs["outputs"]},
            options=specs.get("options"),
            user_id=self.user_id(client_id),
            stamp=now,
            key=key,
            fails=truth.unit_draw(self._seed, "bentley", "fails", key) < self._s.failure_rate,
            fail_fraction=0.3 + 0.6 * truth.unit_draw(self._seed, "bentley", "fail-at", key),
            estimated_units=round(1 + 20 * truth.unit_draw(self._seed, "bentley", "units", key), 2),
        )
        self.jobs[job.id] = job
        for name, rd_id in job.outputs.items():
            self._reality_data[rd_id] = (job, name)
        return job

    @staticmethod
    def user_id(client_id: str) -> str:
        return str(uuid.UUID(int=truth.derived_seed(0, "bentley-user", client_id), version=4))

    def _output_id(self, job_type: str, name: str) -> str:
        # Reports and metrics are paths in the job's bucket (pattern ^bkt:.+), not reality data.
        if name in bentley_v2.TYPES[job_type].bucket_outputs:
            return f"bkt:{name}/{self._new_id()}.json"
        return self._new_id()

    def list_jobs(
        self, where: str | None, top: str | None, token: str | None, client_id: str
    ) -> tuple[list[AnalysisJob], str | None]:
        """One page of the jobs ``where`` selects, and the token of the next page (if any).
        Without ``iTwinId`` in the filter, only the caller's own jobs, as Bentley documents."""
        if where is None:
            raise _bad_request(
                "InvalidProperty", "$filter is required: at least one criterion", "$filter"
            )
        try:
            keep = odata.parse(where)
        except odata.FilterError as exc:
            raise _bad_request("InvalidProperty", str(exc), "$filter") from None
        size = LIST_DEFAULT_TOP
        if top is not None:
            if not top.isdigit() or not 1 <= int(top) <= LIST_MAX_TOP:
                raise _bad_request(
                    "InvalidProperty", f"$top must be an integer 1..{LIST_MAX_TOP}", "$top"
                )
            size = int(top)
        start = 0
        if token is not None:
            start = _read_token(token, where)
        mine = None if re.search(r"\biTwinId\b", where) else self.user_id(client_id)
        chosen = [
            j
            for j in self.jobs.values()
            if (mine is None or j.user_id == mine) and keep(self._filter_values(j))
        ]
        page = chosen[start : start + size]
        more = start + size < len(chosen)
        return page, _make_token(start + size, where) if more else None

    def _filter_values(self, job: AnalysisJob) -> dict[str, tuple[str, ...]]:
        return {
            "id": (job.id,),
            "iTwinId": (job.itwin_id,),
            "name": (job.name,) if job.name is not None else (),
            "type": (job.type,),
            "state": (self.state(job)[0],),
            "createdDateTime": (iso_z(job.stamp.wall),),
            "inputId": tuple(job.inputs.values()),
            "outputId": tuple(job.outputs.values()),
        }

    def get(self, job_id: str) -> AnalysisJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise BentleyError(404, "JobNotFound", "Requested job is not available.")
        return job

    def cancel(self, job: AnalysisJob) -> None:
        state = self.state(job)[0]
        if self._cancelled(job):
            return  # a retried cancel changes nothing
        if state in TERMINAL or state == "Terminating":
            raise _invalid_change(f"Job cannot be cancelled in state {state}.", "state")
        job.cancel_at = self._clock()

    def _cancelled(self, job: AnalysisJob) -> bool:
        """Whether a cancel stopped (or is stopping) the job before it ended by itself."""
        if job.cancel_at is None or job.cancel_at > self._clock():
            return False
        _, end, fail_at = self._times(job)
        return job.cancel_at < (fail_at if job.fails else end)

    def _times(self, job: AnalysisJob) -> tuple[float, float, float]:
        """(start of Active, natural end, moment a failing job stops)."""
        d = self._s.job_duration_s
        start = job.stamp.mono + d * QUEUED_FRACTION
        end = job.stamp.mono + d
        return start, end, start + (end - start) * job.fail_fraction

    def state(self, job: AnalysisJob) -> tuple[State, float]:
        """The job's state now, and the monotonic time it entered it."""
        now = self._clock()
        start, end, fail_at = self._times(job)
        grace = self._s.terminating_s
        stop = fail_at if job.fails else end
        if job.cancel_at is not None and job.cancel_at < stop:
            if now >= job.cancel_at + grace:
                return "Cancelled", job.cancel_at + grace
            if now >= job.cancel_at:
                return "Terminating", job.cancel_at
        elif job.fails:
            if now >= fail_at + grace:
                return "Failed", fail_at + grace
            if now >= fail_at:
                return "Terminating", fail_at
        elif now >= end:
            return "Success", end
        if now >= start:
            return "Active", start
        return "Queued", job.stamp.mono

    def percentage(self, job: AnalysisJob) -> int:
        state = self.state(job)[0]
        if state == "Success":
            return 100
        start, end, fail_at = self._times(job)
        frozen = min(
            self._clock(),
            job.cancel_at if job.cancel_at is not None else math.inf,
            fail_at if job.fails else math.inf,
        )
        if frozen <= start or end <= start:
            return 0
        step = self._s.progress_step
        return int(min(1.0, (frozen - start) / (end - start)) * 100) // step * step

    def render(self, job: AnalysisJob) -> dict[str, Any]:
        state, since = self.state(job)
        start = self._times(job)[0]
        wall = job.stamp.wall_at
        info: dict[str, Any] = {"createdDateTime": iso_z(job.stamp.wall)}
        started = self._clock() >= start and (job.cancel_at is None or job.cancel_at > start)
        if started:
            info["startedDateTime"] = iso_z(wall(start))
        if state in TERMINAL:
            info["endedDateTime"] = iso_z(wall(since))
        info["estimatedUnits"] = job.estimated_units
        doc: dict[str, Any] = {
            "id": job.id,
            "state": state,
            "userId": job.user_id,
            "executionInfo": info,
            "specifications": {"inputs": dict(job.inputs), "outputs": dict(job.outputs)},
            "name": job.name,
            "type": job.type,
            "iTwinId": job.itwin_id,
        }
        if job.options is not None:
            doc["specifications"]["options"] = job.options
        if job.name is None:
            del doc["name"]
        return doc

    def messages(self, job: AnalysisJob) -> dict[str, list[dict[str, Any]]]:
        state = self.state(job)[0]
        errors: list[dict[str, Any]] = []
        warnings: list[dict[str, Any]] = []
        if state in ("Terminating", "Cancelled") and self._cancelled(job):
            warnings.append(
                {
                    "code": "JobCancelled",
                    "title": "Job cancelled",
                    "message": "The job was cancelled by user %1.",
                    "params": [job.user_id],
                }
            )
        elif state in ("Terminating", "Failed"):
            errors.append(self.failure(job))
        return {"errors": errors, "warnings": warnings}

    def failure(self, job: AnalysisJob) -> dict[str, Any]:
        pick = truth.unit_draw(self._seed, "bentley", "failure", job.key)
        code, title, message = _FAILURES[int(pick * len(_FAILURES))]
        first_input = next(iter(job.inputs.values()), "")
        params = {
            "InputDataError": [first_input],
            "DetectorError": [str(1 + int(pick * 97))],
            "InternalError": [job.id],
        }[code]
        return {"code": code, "title": title, "message": message, "params": params}

    def count_by_state(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for job in self.jobs.values():
            state = self.state(job)[0]
            out[state] = out.get(state, 0) + 1
        return out

    # -- outputs ------------------------------------------------------------------------

    def reality_data(self, rd_id: str) -> tuple[AnalysisJob, str] | None:
        """The (job, output name) behind a reality data id, once that job has succeeded:
        before, its container holds nothing worth reading."""
        found = self._reality_data.get(rd_id)
        if found is None or self.state(found[0])[0] != "Success":
            return None
        return found

    def blobs(self, job: AnalysisJob, output: str) -> list[Blob]:
        parts = [
            Blob(_part_name(output, i), self._s.blob_bytes)
            for i in range(1, self._s.parts_per_output + 1)
        ]
        labels = Blob(f"{output}/labels.json", len(self._labels_json(job, output)))
        return sorted([labels, *parts], key=lambda b: b.name)

    def blob_bytes(self, job: AnalysisJob, output: str, name: str) -> bytes | None:
        if name == f"{output}/labels.json":
            return self._labels_json(job, output)
        prefix = f"{output}/segmentation/part-"
        if not (name.startswith(prefix) and name.endswith(".bin")):
            return None
        digits = name[len(prefix) : -len(".bin")]
        if not digits.isdigit() or not 1 <= int(digits) <= self._s.parts_per_output:
            return None
        if name != _part_name(output, int(digits)):
            return None
        rng = truth.rng_for(self._seed, "bentley", "blob", job.key, output, digits)
        return bytes(rng.bytes(self._s.blob_bytes))

    def _labels_json(self, job: AnalysisJob, output: str) -> bytes:
        doc = {
            "jobId": job.id,
            "jobType": job.type,
            "output": output,
            "classes": [{"id": i, "name": n} for i, n in enumerate(_CLASSES)],
            "parts": [
                {"path": _part_name(output, i), "size": self._s.blob_bytes}
                for i in range(1, self._s.parts_per_output + 1)
            ],
        }
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2)

    def truth(self, job_id: str) -> dict[str, Any]:
        job = self.jobs[job_id]
        outputs: dict[str, Any] = {}
        if not job.fails:
            for name, rd_id in job.outputs.items():
                if name in bentley_v2.TYPES[job.type].bucket_outputs:
                    continue  # a path in the job's bucket, not a reality data to download
                blobs = {}
                for blob in self.blobs(job, name):
                    body = self.blob_bytes(job, name, blob.name)
                    assert body is not None
                    blobs[blob.name] = {
                        "size": len(body),
                        "sha256": hashlib.sha256(body).hexdigest(),
                    }
                outputs[name] = {"realityDataId": rd_id, "blobs": blobs}
        return {
            "jobId": job.id,
            "state": self.state(job)[0],
            "outcome": "Failed" if job.fails else "Success",
            "outputs": outputs,
        }

    def _new_id(self) -> str:
        return str(uuid.UUID(int=int.from_bytes(self._ids.bytes(16), "big"), version=4))


def _part_name(output: str, index: int) -> str:
    return f"{output}/segmentation/part-{index:04d}.bin"


def _make_token(offset: int, where: str) -> str:
    raw = orjson.dumps({"o": offset, "f": hashlib.sha256(where.encode()).hexdigest()[:16]})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _read_token(token: str, where: str) -> int:
    try:
        doc = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        offset = doc["o"]
        same = doc["f"] == hashlib.sha256(where.encode()).hexdigest()[:16]
    except (ValueError, TypeError, KeyError):
        same, offset = False, None
    if not same or not isinstance(offset, int) or offset < 0:
        raise _bad_request(
            "InvalidProperty",
            "continuationToken is not one this listing (with this $filter) handed out",
            "continuationToken",
        )
    return offset


def validate(body: Mapping[str, Any]) -> dict[str, Any]:
    """Check a create body against Bentley's v2 schemas; returns it normalised. Any breach
    is a 400 ``InvalidRealityAnalysisRequest`` whose detail names the property."""
    try:
        return bentley_v2.check_create(body)
    except CreateProblem as problem:
        raise _bad_request(
            "InvalidProperty",
            f"Invalid value for property '{problem.target or 'body'}': {problem.message}",
            problem.target,
        ) from None
