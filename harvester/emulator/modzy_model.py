"""Modzy inference jobs: validation, statuses, per-input results and failures.

Pure (no HTTP). A job is SUBMITTED for the first quarter of ``job_duration_s``, IN_PROGRESS
while its inputs finish one by one, then COMPLETED (each input failing with probability
``item_failure_rate``), or, for the whole job, ERROR (``failure_rate``: every input fails) or
TIMEDOUT (``timeout_rate``: the second half of the inputs never finish). A cancelled job is
CANCELED at once; inputs that had not finished are listed under ``failures`` with status
``CANCELED``. Outputs and fates are functions of the seed and the request, not of arrival order.
"""

from __future__ import annotations

import http
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from harvester.emulator import truth
from harvester.emulator.jobmodel import JobModel
from harvester.emulator.scenario import ModzyScenario
from harvester.emulator.timefmt import Stamp, iso_offset

# Modzy's documented job statuses ("a finished job ends Completed or Error"); there is no FAILED.
Status = Literal["SUBMITTED", "IN_PROGRESS", "COMPLETED", "CANCELED", "TIMEDOUT", "ERROR"]
Outcome = Literal["COMPLETED", "ERROR", "TIMEDOUT"]
INPUT_TYPES = (
    "text", "embedded", "aws-s3", "aws-s3-folder", "azureblob", "gcp", "gcp-folder", "jdbc",
)  # fmt: skip
QUEUED_FRACTION = 0.25
REPORT_ERROR_URL = "https://support.modzy.com/report-error"
DEFAULT_MODELS = (("ed542963de", "1.0.1", "Sentiment Analysis"),)
_LABELS = ("positive", "negative", "neutral", "mixed", "unknown", "other")
_ITEM_ERRORS = (
    "Model failed to process the input: unexpected input format",
    "Model container exited with code 137 while processing the input",
    "Input could not be fetched",
)


class ModzyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message)


def error_body(status: int, message: str) -> dict[str, Any]:
    try:
        name = http.HTTPStatus(status).name
    except ValueError:
        name = "ERROR"
    return {
        "statusCode": status,
        "status": name,
        "message": message,
        "reportErrorUrl": REPORT_ERROR_URL,
    }


@dataclass(slots=True)
class ModzyJob:
    id: str
    model_id: str
    version: str
    explain: bool
    input_type: str
    sources: dict[str, dict[str, Any]]
    access_key: str
    stamp: Stamp
    key: str  # names the job's ground truth: a digest of its request
    outcome: Outcome
    cancel_at: float | None = None

    @property
    def items(self) -> list[str]:
        return list(self.sources)


@dataclass(frozen=True, slots=True)
class ItemFate:
    ok: bool
    error: str  # "" when ok
    status: str  # SUCCESSFUL / FAILED / CANCELED


class ModzyModel(JobModel[ModzyScenario]):
    def _start(self) -> None:
        self._ids = truth.rng_for(self._seed, "modzy", "ids")
        self.jobs: dict[str, ModzyJob] = {}
        self.models: dict[tuple[str, str], str] = {(m, v): n for m, v, n in DEFAULT_MODELS}

    # -- jobs ---------------------------------------------------------------------------

    def create(self, body: Mapping[str, Any], api_key: str) -> ModzyJob:
        model_id, version, explain, input_type, sources = validate(body)
        key = truth.digest({"model": [model_id, version], "type": input_type, "src": sources})
        draw = truth.unit_draw(self._seed, "modzy", "outcome", key)
        outcome: Outcome = "COMPLETED"
        if draw < self._s.failure_rate:
            outcome = "ERROR"
        elif draw < self._s.failure_rate + self._s.timeout_rate:
            outcome = "TIMEDOUT"
        job = ModzyJob(
            id=str(uuid.UUID(int=int.from_bytes(self._ids.bytes(16), "big"), version=4)),
            model_id=model_id,
            version=version,
            explain=explain,
            input_type=input_type,
            sources=sources,
            access_key=api_key.split(".", 1)[0],
            stamp=self._stamp(),
            key=key,
            outcome=outcome,
        )
        self.jobs[job.id] = job
        self.models.setdefault((model_id, version), f"Model {model_id}")
        return job

    def get(self, job_id: str) -> ModzyJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise ModzyError(404, f"The job {job_id} was not found")
        return job

    def cancel(self, job: ModzyJob) -> None:
        status = self.status(job)
        if status == "CANCELED":
            return  # a retried cancel changes nothing
        if status not in ("SUBMITTED", "IN_PROGRESS"):
            raise ModzyError(400, f"The job {job.id} is {status} and cannot be canceled")
        job.cancel_at = self._clock()

    def _start_end(self, job: ModzyJob) -> tuple[float, float]:
        d = self._s.job_duration_s
        return job.stamp.mono + d * QUEUED_FRACTION, job.stamp.mono + d

    def status(self, job: ModzyJob) -> Status:
        now = self._clock()
        start, end = self._start_end(job)
        if job.cancel_at is not None and job.cancel_at < end and now >= job.cancel_at:
            return "CANCELED"
        if now >= end:
            return job.outcome
        return "IN_PROGRESS" if now >= start else "SUBMITTED"

    def item_times(self, job: ModzyJob, index: int) -> tuple[float, float]:
        """When input ``index`` starts and finishes (monotonic), inputs running in turn."""
        start, end = self._start_end(job)
        step = (end - start) / len(job.sources)
        return start + index * step, start + (index + 1) * step

    def fate(self, job: ModzyJob, index: int) -> ItemFate:
        """How input ``index`` ends if the job is left to run (cancellation aside)."""
        name = job.items[index]
        if job.outcome == "ERROR":
            return ItemFate(False, self._item_error(job, name), "FAILED")
        if job.outcome == "TIMEDOUT" and index >= (len(job.sources) + 1) // 2:
            return ItemFate(False, "Job timed out before this input was processed", "FAILED")
        draw = truth.unit_draw(self._seed, "modzy", "item-fails", job.key, name)
        if draw < self._s.item_failure_rate:
            return ItemFate(False, self._item_error(job, name), "FAILED")
        return ItemFate(True, "", "SUCCESSFUL")

    def finished_items(self, job: ModzyJob) -> list[tuple[int, ItemFate, float]]:
        """Inputs finished by now: (index, fate, monotonic end time)."""
        now = self._clock()
        _, end = self._start_end(job)
        out = []
        for i in range(len(job.sources)):
            fate = self.fate(job, i)
            # A timed-out input is given up on at the job's deadline, not at its own turn.
            timed_out = job.outcome == "TIMEDOUT" and not fate.ok
            done_at = end if timed_out else self.item_times(job, i)[1]
            if job.cancel_at is not None and job.cancel_at < done_at:
                if now >= job.cancel_at:
                    canceled = "Job was canceled before this input was processed"
                    out.append((i, ItemFate(False, canceled, "CANCELED"), job.cancel_at))
            elif now >= done_at:
                out.append((i, fate, done_at))
        return out

    def results_visible(self, job: ModzyJob) -> bool:
        return self._clock() - job.stamp.mono >= self._s.results_404_s

    def counts(self, job: ModzyJob) -> tuple[int, int, int]:
        """(pending, completed, failed) now."""
        done = self.finished_items(job)
        completed = sum(f.ok for _, f, _ in done)
        failed = len(done) - completed
        return len(job.sources) - len(done), completed, failed

    def output(self, job: ModzyJob, item: str) -> dict[str, Any]:
        """The ``results.json`` of one input: a function of model, input and seed only."""
        inputs = job.sources[item]
        rng = truth.rng_for(
            self._seed, "modzy", "output", job.model_id, job.version, truth.digest(inputs)
        )
        n = 2 + int(truth.unit_draw(self._seed, "modzy", "classes", job.model_id) * 3)
        raw = rng.dirichlet([1.0] * n)
        scores = sorted(
            ({"class": _LABELS[i], "score": round(float(raw[i]), 4)} for i in range(n)),
            key=lambda c: -float(c["score"]),  # type: ignore[arg-type]
        )
        explanation = None
        if job.explain:
            weights = rng.uniform(-1, 1, len(inputs))
            explanation = {
                "method": "integrated-gradients",
                "importances": [
                    {"input": name, "weight": round(float(w), 4)}
                    for name, w in zip(sorted(inputs), weights.tolist(), strict=True)
                ],
            }
        return {
            "data": {
                "result": {"classPredictions": scores},
                "explanation": explanation,
                "drift": None,
            }
        }

    def truth(self, job_id: str) -> dict[str, Any]:
        job = self.jobs[job_id]
        results: dict[str, Any] = {}
        failures: dict[str, str] = {}
        for i, item in enumerate(job.items):
            fate = self.fate(job, i)
            if fate.ok:
                results[item] = self.output(job, item)
            else:
                failures[item] = fate.error
        return {
            "jobIdentifier": job.id,
            "outcome": job.outcome,
            "canceled": job.cancel_at is not None,
            "results": results,
            "failures": failures,
        }

    def count_by_status(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for job in self.jobs.values():
            status = self.status(job)
            out[status] = out.get(status, 0) + 1
        return out

    # -- rendering ----------------------------------------------------------------------

    def model_doc(self, job: ModzyJob) -> dict[str, Any]:
        name = self.models.get((job.model_id, job.version), job.model_id)
        return {"identifier": job.model_id, "version": job.version, "name": name}

    def render_created(self, job: ModzyJob) -> dict[str, Any]:
        return {
            "model": self.model_doc(job),
            "status": "SUBMITTED",
            "totalInputs": len(job.sources),
            "jobIdentifier": job.id,
            "accessKey": job.access_key,
            "explain": job.explain,
            "jobType": "batch",
            "jobInputs": {"identifier": job.items},
            "submittedAt": iso_offset(job.stamp.wall),
            "hoursDeleteInput": 24,
        }

    def render_job(self, job: ModzyJob) -> dict[str, Any]:
        now = self._clock()
        status = self.status(job)
        pending, completed, failed = self.counts(job)
        start, end = self._start_end(job)
        finished_at = min(now, end if job.cancel_at is None else min(end, job.cancel_at))
        return {
            "jobIdentifier": job.id,
            # the jobs reference's job object: "submittedBy", the key that submitted it
            "submittedBy": job.access_key,
            "accountIdentifier": account_of(job.access_key),
            "status": status,
            "total": len(job.sources),
            "pending": pending,
            "completed": completed,
            "failed": failed,
            "explain": job.explain,
            "model": self.model_doc(job),
            # A job document lists its inputs one object each (the jobs reference's
            # "jobInputs": [], the SDK's JobDetails); only the create answer groups them.
            "jobInputs": [{"identifier": item} for item in job.items],
            "submittedAt": iso_offset(job.stamp.wall),
            "updatedAt": iso_offset(job.stamp.wall_at(finished_at)),
            "queueTime": _ms(min(now, start) - job.stamp.mono),
            "elapsedTime": _ms(finished_at - job.stamp.mono),
        }

    def render_results(self, job: ModzyJob) -> dict[str, Any]:
        done = self.finished_items(job)
        status = self.status(job)
        start = self._start_end(job)[0]
        wall = job.stamp.wall_at
        results: dict[str, Any] = {}
        failures: dict[str, Any] = {}
        latencies: list[int] = []
        last_done = max((t for _, _, t in done), default=job.stamp.mono)
        for index, fate, done_at in done:
            item = job.items[index]
            t0 = min(self.item_times(job, index)[0], done_at)
            timing = {
                "engine": f"model-batch-{job.model_id}-{job.version}-{index % 3}",
                "startTime": iso_offset(wall(t0)),
                "updateTime": iso_offset(wall(done_at)),
                "endTime": iso_offset(wall(done_at)),
                "elapsedTime": _ms(done_at - t0),
            }
            if fate.ok:
                latency = _ms((done_at - t0) * 0.8)
                latencies.append(latency)
                results[item] = {
                    "status": fate.status,
                    **timing,
                    "inputFetching": _ms((done_at - t0) * 0.1),
                    "outputUploading": _ms((done_at - t0) * 0.1),
                    "modelLatency": latency,
                    "queueTime": _ms(start - job.stamp.mono),
                    "results.json": self.output(job, item),
                    "voting": {"up": 0, "down": 0},
                }
            else:
                failures[item] = {"status": fate.status, **timing, "error": fate.error}
        return {
            "jobIdentifier": job.id,
            "total": len(job.sources),
            "completed": len(results),
            "failed": len(failures),
            "finished": status not in ("SUBMITTED", "IN_PROGRESS"),
            "accountIdentifier": account_of(job.access_key),
            "team": {"identifier": f"team-{account_of(job.access_key)}"},
            "submittedByKey": job.access_key,
            "explained": job.explain,
            "submittedAt": iso_offset(job.stamp.wall),
            "initialQueueTime": _ms(start - job.stamp.mono),
            "totalQueueTime": _ms(start - job.stamp.mono),
            "averageModelLatency": (sum(latencies) // len(latencies)) if latencies else 0,
            "totalModelLatency": sum(latencies),
            "elapsedTime": _ms(last_done - job.stamp.mono),
            "results": results,
            "failures": failures,
        }

    def _item_error(self, job: ModzyJob, item: str) -> str:
        pick = truth.unit_draw(self._seed, "modzy", "item-error", job.key, item)
        return _ITEM_ERRORS[int(pick * len(_ITEM_ERRORS))]


def account_of(access_key: str) -> str:
    """The (made-up, stable) account an access key belongs to."""
    return truth.digest({"account": access_key})[:16]


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def validate(body: Mapping[str, Any]) -> tuple[str, str, bool, str, dict[str, dict[str, Any]]]:
    """Check a create body: (model id, version, explain, input type, sources)."""
    model = body.get("model")
    if not isinstance(model, dict):
        raise ModzyError(400, "model is required: {identifier, version}")
    model_id, version = model.get("identifier"), model.get("version")
    if not isinstance(model_id, str) or not model_id:
        raise ModzyError(400, "model.identifier must be a non-empty string")
    if not isinstance(version, str) or not version:
        raise ModzyError(400, "model.version must be a non-empty string")
    explain = body.get("explain", False)
    if explain is None:
        explain = False
    if not isinstance(explain, bool):
        raise ModzyError(400, "explain must be a boolean")
    job_input = body.get("input")
    if not isinstance(job_input, dict):
        # The SDK's file upload opens a job without input and appends multipart chunks;
        # that flow is not emulated.
        raise ModzyError(400, "input is required: {type, sources}")
    input_type = job_input.get("type")
    if input_type not in INPUT_TYPES:
        raise ModzyError(400, f"input.type must be one of {list(INPUT_TYPES)}")
    sources = job_input.get("sources")
    if not isinstance(sources, dict) or not sources:
        raise ModzyError(400, "input.sources must be a non-empty object")
    for item, inputs in sources.items():
        if not item or not isinstance(inputs, dict) or not inputs:
            raise ModzyError(400, f"input.sources[{item!r}] must be a non-empty object")
        for name, value in inputs.items():
            _check_value(input_type, f"input.sources[{item!r}][{name!r}]", value)
    return model_id, version, explain, input_type, sources


def _check_value(input_type: str, where: str, value: object) -> None:
    if input_type == "text":
        if not isinstance(value, str):
            raise ModzyError(400, f"{where} must be a string for text input")
    elif input_type == "embedded":
        if not isinstance(value, str) or not value.startswith("data:") or "," not in value:
            raise ModzyError(400, f"{where} must be a data URI for embedded input")
    elif not isinstance(value, dict) or not value:
        raise ModzyError(400, f"{where} must be an object for {input_type} input")
