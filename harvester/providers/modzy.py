"""Modzy: request building and answer parsing (sans-I/O).

Quirks handled here, each tested on recorded bodies:
- ``Authorization: ApiKey <key>`` (the auth is built in ``providers.make_auth``);
- statuses are exact upper case: ``SUBMITTED``, ``IN_PROGRESS``, ``COMPLETED``, ``CANCELED``
  (one L), ``TIMEDOUT`` and ``ERROR`` (Modzy's jobs reference; its SDK lists all but
  ``ERROR``). The job document says nothing about why a job ended ``ERROR``/``TIMEDOUT``: the
  failed inputs' messages are in the results document (``failures.<item>.error``, where the
  SDK reads them), so a failed job's poll asks for those too;
- right after a job finishes, ``/api/results/{id}`` may answer 404 or ``finished: false``
  for a while: that is "not yet" (``NotYetAvailable``, retried later), not a failure;
- a job's inputs can fail one by one: results that partly failed are still harvested, with
  the failures kept next to them; only a job whose every input failed is a failed job;
- errors come as ``{statusCode, status, message, reportErrorUrl}``;
- Modzy offers no lookup of a job by anything of ours, so a lost create answer is left to
  the engine's ``on_lost_create`` policy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from harvester.config import ModzyConfig
from harvester.errors import (
    CredentialsError,
    HarvesterError,
    InvalidPayload,
    JobError,
    NotYetAvailable,
    ProtocolError,
    ProviderJobFailed,
)
from harvester.jobs import Job
from harvester.providers.base import (
    Accepted,
    Client,
    CreateResult,
    HarvestIO,
    NoLookup,
    NoSetup,
    PollResult,
    RemoteState,
    Status,
    clip_reason,
    ok_object,
    protocol_error,
)
from harvester.statuses import error_from_answer
from harvester.wire import RequestSpec, Response

NAME = "modzy"
#: every documented job status; anything else is polled on as running, marked unknown
STATES = {
    "SUBMITTED": RemoteState.RUNNING,
    "IN_PROGRESS": RemoteState.RUNNING,
    "COMPLETED": RemoteState.SUCCEEDED,
    "CANCELED": RemoteState.CANCELLED,
    "TIMEDOUT": RemoteState.FAILED,
    "ERROR": RemoteState.FAILED,
}
#: how soon, at most, to ask again for results that are not there yet (sooner when the
#: provider's poll_min_s is shorter: results are polled like a status)
RESULTS_RETRY_S = 10.0


class ModzyProvider(NoSetup, NoLookup):
    name = NAME

    def __init__(self, cfg: ModzyConfig) -> None:
        self.cfg = cfg
        self.base = cfg.base_url.rstrip("/")
        self.jobs = f"{self.base}/api/jobs"
        self.results = f"{self.base}/api/results"
        self.results_retry_s = min(RESULTS_RETRY_S, cfg.poll_min_s)

    # -- payload -----------------------------------------------------------------------
    def validate_payload(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            raise InvalidPayload("payload must be a JSON object with model and input")
        model = payload.get("model")
        if not isinstance(model, dict):
            raise InvalidPayload("payload.model must be an object {identifier, version}")
        for key in ("identifier", "version"):
            if not isinstance(model.get(key), str) or not model[key]:
                raise InvalidPayload(f"payload.model.{key} must be a non-empty string")
        data = payload.get("input")
        if not isinstance(data, dict):
            raise InvalidPayload("payload.input must be an object {type, sources}")
        if not isinstance(data.get("type"), str) or not data["type"]:
            raise InvalidPayload("payload.input.type must be a non-empty string such as 'text'")
        sources = data.get("sources")
        if not isinstance(sources, dict) or not sources:
            raise InvalidPayload("payload.input.sources must be a non-empty object of items")
        for item, inputs in sources.items():
            if not isinstance(inputs, dict) or not inputs:
                raise InvalidPayload(
                    f"payload.input.sources[{item[:60]!r}] must be a non-empty object"
                    " {input name: value}"
                )
        if "explain" in payload and not isinstance(payload["explain"], bool):
            raise InvalidPayload("payload.explain must be true or false")

    # -- create -------------------------------------------------------------------------
    def build_create(self, job: Job, payload: Mapping[str, Any]) -> RequestSpec:
        return RequestSpec(
            "POST", self.jobs, endpoint="create", json=dict(payload), idempotent=False
        )

    def parse_create(self, resp: Response, job: Job) -> CreateResult:
        body = self._ok(resp, job, "create")
        remote = body.get("jobIdentifier")
        if not isinstance(remote, str) or not remote:
            raise _protocol(resp, "create answer has no jobIdentifier string", job)
        return Accepted(remote)

    # -- cancel: DELETE /api/jobs/{id} answers the job (the SDK's ``jobs.cancel``) -------
    def build_cancel(self, job: Job) -> RequestSpec | None:
        return RequestSpec(
            "DELETE", f"{self.jobs}/{quote(str(job.remote_id), safe='')}", endpoint="cancel"
        )

    def parse_cancel(self, resp: Response, job: Job) -> None:
        self._ok(resp, job, "cancel")

    # -- poll ---------------------------------------------------------------------------
    def build_poll(self, job: Job) -> RequestSpec:
        return RequestSpec(
            "GET", f"{self.jobs}/{quote(str(job.remote_id), safe='')}", endpoint="poll"
        )

    def parse_poll(self, resp: Response, job: Job) -> PollResult:
        body = self._ok(resp, job, "poll")
        raw = body.get("status")
        if not isinstance(raw, str) or not raw:
            raise _protocol(resp, "job answer has no status string", job)
        known = raw in STATES
        # An undocumented status is "still going", kept verbatim, rather than a failure.
        state = STATES.get(raw, RemoteState.RUNNING)
        progress = _progress(body)
        if state == RemoteState.SUCCEEDED:
            progress = 100.0
        reason = None
        if state in (RemoteState.FAILED, RemoteState.CANCELLED):
            reason = f"Modzy reports the job {raw}"
            failed, total = body.get("failed"), body.get("total")
            if _count(failed) and _count(total) is not None:
                reason += f" ({failed} of {total} inputs failed)"
        return Status(state, raw, progress=progress, reason=reason, document=body, known=known)

    def parse_failures(self, resp: Response, job: Job) -> Mapping[str, Any]:
        """The ``failures`` of a results document; empty while (or if) there is none."""
        if resp.status == 404:
            return {}  # a failed job need not have published results
        failures = self._ok(resp, job, "results").get("failures")
        return failures if isinstance(failures, dict) else {}

    async def poll(self, job: Job, client: Client) -> PollResult:
        status = await client.call(
            self.build_poll(job), functools.partial(self.parse_poll, job=job)
        )
        if not isinstance(status, Status) or status.state != RemoteState.FAILED:
            return status
        try:
            failures = await client.call(
                self.build_results(job), functools.partial(self.parse_failures, job=job)
            )
        except JobError:
            failures = {}  # the verdict stands without the messages
        if not failures:
            return status
        return dataclasses.replace(status, reason=f"{status.reason}: {failure_reason(failures)}")

    def ladder(self) -> tuple[float, ...] | None:
        return None

    def job_class(self, status: Status) -> str | None:
        # the model and its version (JobDetails.model): one version runs alike long
        doc = status.document
        model = doc.get("model") if isinstance(doc, dict) else None
        if not isinstance(model, dict):
            return None
        identifier, version = model.get("identifier"), model.get("version")
        if not isinstance(identifier, str) or not identifier:
            return None
        return f"{identifier}@{version}" if isinstance(version, str) and version else identifier

    # -- results ------------------------------------------------------------------------
    def build_results(self, job: Job) -> RequestSpec:
        return RequestSpec(
            "GET", f"{self.results}/{quote(str(job.remote_id), safe='')}", endpoint="results"
        )

    def parse_results(self, resp: Response, job: Job) -> dict[str, Any]:
        """The finished results document, or ``NotYetAvailable`` while Modzy catches up."""
        if resp.status == 404:
            # Modzy's own SDK reads a 404 here as "not yet" once the job is known to exist;
            # a finished job certainly exists.
            raise NotYetAvailable(
                "results are not published yet (404)",
                retry_after=self.results_retry_s,
                provider=NAME,
                job=job.key,
                status=404,
                request_id=resp.request_id,
            )
        body = self._ok(resp, job, "results")
        finished = body.get("finished")
        if not isinstance(finished, bool):
            raise _protocol(resp, "results answer has no boolean 'finished'", job)
        if not finished:
            raise NotYetAvailable(
                "results are not finished yet",
                retry_after=self.results_retry_s,
                provider=NAME,
                job=job.key,
                status=resp.status,
                request_id=resp.request_id,
            )
        for key in ("results", "failures"):
            if body.get(key) is not None and not isinstance(body[key], dict):
                raise _protocol(resp, f"results answer's {key} is not an object", job)
        return body

    async def harvest(self, job: Job, status: Status, io: HarvestIO) -> None:
        resp = await io.request(self.build_results(job))
        document = self.parse_results(resp, job)
        results = document.get("results") or {}
        failures = document.get("failures") or {}
        await io.write_json("job.json", status.document)
        # As served, byte for byte: the per-item "results.json" entries are model outputs
        # whose exact form is the user's business.
        await io.write_bytes("results.json", resp.body)
        if failures:
            await io.write_json("failures.json", failures)
            if not results:
                raise ProviderJobFailed(
                    f"every input failed: {failure_reason(failures)}",
                    provider=NAME,
                    job=job.key,
                    request_id=resp.request_id,
                )

    # -- helpers ------------------------------------------------------------------------
    def _ok(self, resp: Response, job: Job | None, endpoint: str) -> dict[str, Any]:
        return ok_object(NAME, resp, job, endpoint, error_from)


def error_from(resp: Response, job: Job | None, endpoint: str) -> HarvesterError:
    """The typed error for a non-2xx answer, keeping Modzy's status text and request id."""
    # A create 404 names an unknown model or version: the payload's doing.
    not_found = (
        (InvalidPayload, "not found: {message}")
        if endpoint == "create"
        else (ProviderJobFailed, "Modzy does not know this job (404): {message}")
    )
    own = {
        401: (CredentialsError, "API key refused: {message}"),
        403: (CredentialsError, "API key refused: {message}"),
        404: not_found,
    }
    return error_from_answer(NAME, resp, job, endpoint, _read_error, own)


def _read_error(body: Any) -> tuple[str | None, str] | None:
    """``{statusCode, status, message, reportErrorUrl}``: the status text (else the numeric
    code) and the message."""
    if not isinstance(body, dict) or ("message" not in body and "status" not in body):
        return None
    code: str | None = None
    if isinstance(body.get("status"), str) and body["status"]:
        code = body["status"][:60]
    elif body.get("statusCode") is not None:
        code = str(body["statusCode"])[:20]
    return code, str(body.get("message") or "")[:300]


def failure_reason(failures: Mapping[str, Any]) -> str:
    """``item: error`` for each failed input, de-duplicated by error text, in order."""
    seen: set[str] = set()
    parts: list[str] = []
    for item, failure in failures.items():
        error = failure.get("error") if isinstance(failure, dict) else failure
        if isinstance(error, dict):
            error = error.get("message") or error.get("error") or error
        text = str(error).strip() if error is not None else "no error text"
        if text in seen:
            continue
        seen.add(text)
        parts.append(f"{item}: {text[:200]}")
    reason = "; ".join(parts)
    if len(failures) > len(parts):
        reason += f" ({len(failures)} inputs in all)"
    return clip_reason(reason)


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _progress(body: Mapping[str, Any]) -> float | None:
    total, completed, failed = (_count(body.get(k)) for k in ("total", "completed", "failed"))
    if not total or completed is None:
        return None
    done = completed + (failed or 0)
    percent = 100.0 * done / total
    return min(percent, 100.0) if math.isfinite(percent) else None


def _protocol(resp: Response, message: str, job: Job | None = None) -> ProtocolError:
    return protocol_error(NAME, resp, message, job)
