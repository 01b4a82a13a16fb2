"""Bentley iTwin Reality Analysis: request building and answer parsing (sans-I/O).

Quirks handled here, each tested on recorded bodies:
- a create answers **201** ``{"job": {...}}``; every request names the API version in its
  ``Accept`` header (v2 for Reality Analysis, v1 for Reality Management's readaccess);
- a poll is up to two requests: the job (its state) and, while it runs, its progress
  percentage; a failed job's error texts come from a third, its messages;
- Bentley asks for polls at 15, 30, 60, then 120 s, restarting whenever the percentage
  moves: ``ladder()`` hands that table to the engine, which clamps it into
  ``poll_min_s``/``poll_max_s``;
- outputs are reality-data ids; each resolves (``readaccess``) to an Azure blob container URL
  with a SAS query, which is listed and downloaded without our bearer token
  (``azure_container``), each blob checked against its listed size and MD5. An expired SAS
  is re-resolved through ``readaccess``. Blob names are provider data and are sanitised
  before they touch the file system (``harvester.azure.safe_blob_path``);
- Bentley documents no job listing, so a lost create answer cannot be looked up: the job is
  named after its reference id (findable in Bentley's console) and the engine's
  ``on_lost_create`` policy decides.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from harvester.config import BentleyConfig
from harvester.errors import (
    CredentialsError,
    HarvesterError,
    InvalidPayload,
    JobError,
    ProtocolError,
    ProviderJobFailed,
    ProviderUnavailable,
    RateLimited,
)
from harvester.jobs import Job, job_key
from harvester.providers.azure_container import harvest_container
from harvester.providers.base import (
    Accepted,
    Client,
    CreateResult,
    FindResult,
    HarvestIO,
    NoSetup,
    NotFound,
    PollResult,
    RemoteState,
    RequestSpec,
    Resolver,
    Response,
    Status,
    protocol_error,
)
from harvester.schedule import BENTLEY_LADDER

NAME = "bentley"
ACCEPT = "application/vnd.bentley.itwin-platform.v2+json"
#: Reality Management (readaccess) is a separate API still at version 1
ACCEPT_REALITY_DATA = "application/vnd.bentley.itwin-platform.v1+json"
TYPES = frozenset(
    {
        "Objects2D",
        "Segmentation2D",
        "Segmentation3D",
        "SegmentationOrthophoto",
        "ChangeDetection",
        "EvalO2D",
        "EvalO3D",
        "EvalS2D",
        "EvalS3D",
        "EvalSOrtho",
        "TrainingO2D",
        "TrainingS3D",
    }
)
_STATES = {
    "Queued": RemoteState.RUNNING,
    "Active": RemoteState.RUNNING,
    "TerminatingOnCancel": RemoteState.RUNNING,
    "TerminatingOnFailure": RemoteState.RUNNING,
    "Success": RemoteState.SUCCEEDED,
    "Failed": RemoteState.FAILED,
    "Cancelled": RemoteState.CANCELLED,
}
#: a queued job has no progress to report: asking would spend rate budget for nothing
_NO_PROGRESS = {"Queued"}
_MAX_REASON = 1000
_PLACEHOLDER = re.compile(r"%(\d+)")


class BentleyProvider(NoSetup):
    name = NAME

    def __init__(self, cfg: BentleyConfig) -> None:
        self.cfg = cfg
        self.base = cfg.base_url.rstrip("/")
        self.jobs = f"{self.base}/reality-analysis/jobs"
        self.reality_data = f"{self.base}/reality-management/reality-data"

    # -- payload -----------------------------------------------------------------------
    def validate_payload(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            raise InvalidPayload("payload must be a JSON object with type and specifications")
        name = payload.get("name")
        if name is not None and (not isinstance(name, str) or not name):
            raise InvalidPayload("payload.name must be a non-empty string when given")
        kind = payload.get("type")
        if kind not in TYPES:
            raise InvalidPayload(
                f"payload.type must be one of {', '.join(sorted(TYPES))}, got {str(kind)[:60]!r}"
            )
        twin = payload.get("iTwinId", self.cfg.itwin_id)
        if not isinstance(twin, str) or not twin:
            raise InvalidPayload(
                "payload.iTwinId must be a non-empty string (or set providers.bentley.itwin_id)"
            )
        spec = payload.get("specifications")
        if not isinstance(spec, dict):
            raise InvalidPayload("payload.specifications must be an object {inputs, outputs}")
        inputs = spec.get("inputs")
        if (
            not isinstance(inputs, list)
            or not inputs
            or not all(isinstance(i, dict) for i in inputs)
        ):
            raise InvalidPayload(
                "payload.specifications.inputs must be a non-empty list of objects"
            )
        outputs = spec.get("outputs")
        if (
            not isinstance(outputs, list)
            or not outputs
            or not all(isinstance(o, str) and o for o in outputs)
            or len(set(outputs)) != len(outputs)
        ):
            raise InvalidPayload(
                "payload.specifications.outputs must be a non-empty list of distinct output names"
            )
        if "options" in spec and not isinstance(spec["options"], dict):
            raise InvalidPayload("payload.specifications.options must be an object")

    # -- create -------------------------------------------------------------------------
    def build_create(self, job: Job, payload: Mapping[str, Any]) -> RequestSpec:
        body: dict[str, Any] = {
            # Named after the reference id, so a person can find the job in Bentley's console
            # when its create answer was lost (there is no API to look it up).
            "name": payload.get("name") or job.reference_id or job.key,
            "type": payload["type"],
            "iTwinId": payload.get("iTwinId") or self.cfg.itwin_id,
            "specifications": payload["specifications"],
        }
        for key, value in payload.items():
            body.setdefault(key, value)
        return RequestSpec(
            "POST",
            self.jobs,
            endpoint="create",
            json=body,
            headers={"Accept": ACCEPT},
            idempotent=False,
        )

    def parse_create(self, resp: Response, job: Job) -> CreateResult:
        body = self._ok(resp, job, "create")
        remote = _job_object(body, resp, job).get("id")
        if not isinstance(remote, str) or not remote:
            raise _protocol(resp, "create answer has no job.id string", job)
        return Accepted(remote)

    # -- reconciliation: impossible ----------------------------------------------------
    def build_find(self, job: Job, cursor: str | None) -> RequestSpec | None:
        return None

    def parse_find(self, resp: Response, job: Job) -> FindResult:
        return NotFound()

    # -- poll ---------------------------------------------------------------------------
    def _job_url(self, job: Job) -> str:
        return f"{self.jobs}/{quote(str(job.remote_id), safe='')}"

    def build_get(self, job: Job) -> RequestSpec:
        return RequestSpec("GET", self._job_url(job), endpoint="poll", headers={"Accept": ACCEPT})

    def build_progress(self, job: Job) -> RequestSpec:
        return RequestSpec(
            "GET", f"{self._job_url(job)}/progress", endpoint="progress", headers={"Accept": ACCEPT}
        )

    def build_messages(self, job: Job) -> RequestSpec:
        return RequestSpec(
            "GET", f"{self._job_url(job)}/messages", endpoint="messages", headers={"Accept": ACCEPT}
        )

    def parse_get(self, resp: Response, job: Job) -> Status:
        body = self._ok(resp, job, "poll")
        raw = _job_object(body, resp, job).get("state")
        if not isinstance(raw, str) or not raw:
            raise _protocol(resp, "job answer has no job.state string", job)
        # An undocumented state is "still going", kept verbatim, rather than a failure.
        state = _STATES.get(raw, RemoteState.RUNNING)
        progress = 100.0 if state == RemoteState.SUCCEEDED else None
        return Status(state, raw, progress=progress, document=body)

    def parse_progress(self, resp: Response, job: Job) -> float:
        body = self._ok(resp, job, "progress")
        progress = body.get("progress")
        value = progress.get("percentage") if isinstance(progress, dict) else None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _protocol(resp, "progress answer has no progress.percentage number", job)
        if not math.isfinite(value):
            raise _protocol(resp, "progress percentage is not finite", job)
        return float(min(max(value, 0), 100))

    def parse_messages(self, resp: Response, job: Job) -> list[str]:
        """The error texts of a job, each with its code, de-duplicated, in order."""
        body = self._ok(resp, job, "messages")
        messages = body.get("messages")
        errors = messages.get("errors") if isinstance(messages, dict) else None
        if not isinstance(errors, list):
            raise _protocol(resp, "messages answer has no messages.errors list", job)
        texts: list[str] = []
        for entry in errors:
            text = _message_text(entry)
            if text and text not in texts:
                texts.append(text)
        return texts

    async def poll(self, job: Job, client: Client) -> PollResult:
        status = await client.call(self.build_get(job), functools.partial(self.parse_get, job=job))
        if status.state == RemoteState.RUNNING and status.raw not in _NO_PROGRESS:
            try:
                progress: float | None = await client.call(
                    self.build_progress(job), functools.partial(self.parse_progress, job=job)
                )
            except JobError:
                # The state came from the job itself; a percentage is only a cadence hint,
                # and an odd progress answer must not end a running job.
                progress = None
            return dataclasses.replace(status, progress=progress)
        if status.state == RemoteState.FAILED:
            try:
                texts = await client.call(
                    self.build_messages(job), functools.partial(self.parse_messages, job=job)
                )
                reason = _join(texts) or "Bentley reports the job Failed without error messages"
            except JobError as exc:
                reason = f"Bentley reports the job Failed; its messages are unreadable: {exc}"
            return dataclasses.replace(status, reason=reason)
        return status

    def ladder(self) -> tuple[float, ...] | None:
        return BENTLEY_LADDER

    # -- outputs ------------------------------------------------------------------------
    def build_readaccess(self, reality_data_id: str) -> RequestSpec:
        return RequestSpec(
            "GET",
            f"{self.reality_data}/{quote(reality_data_id, safe='')}/readaccess",
            endpoint="readaccess",
            headers={"Accept": ACCEPT_REALITY_DATA},
        )

    def parse_readaccess(self, resp: Response, job: Job | None = None) -> str:
        """The container URL (with its SAS query) that a reality data's files live in."""
        body = self._ok(resp, job, "readaccess")
        links = body.get("_links")
        container = links.get("containerUrl") if isinstance(links, dict) else None
        href = container.get("href") if isinstance(container, dict) else None
        if not isinstance(href, str) or urlsplit(href).scheme not in ("http", "https"):
            raise _protocol(resp, "readaccess answer has no _links.containerUrl.href URL", job)
        return href

    async def harvest(self, job: Job, status: Status, io: HarvestIO) -> None:
        document = status.document
        if not isinstance(document, dict) or not isinstance(document.get("job"), dict):
            raise ProtocolError("final job document has no job object", provider=NAME, job=job.key)
        io.write_json("job.json", document)
        specs = document["job"].get("specifications")
        outputs = specs.get("outputs") if isinstance(specs, dict) else None
        if not isinstance(outputs, dict):
            raise ProtocolError(
                "finished job's specifications.outputs is not a {name: realityDataId} object",
                provider=NAME,
                job=job.key,
            )
        try:
            for name, reality_data_id in outputs.items():
                if not name:
                    raise ProtocolError("an output has an empty name")
                if not isinstance(reality_data_id, str) or not reality_data_id:
                    raise ProtocolError(f"output {name!r} has no reality data id")
                await self._harvest_output(job, name, reality_data_id, io)
        except HarvesterError as exc:
            exc.provider = exc.provider or NAME
            exc.job = exc.job or job.key
            raise

    async def _harvest_output(
        self, job: Job, name: str, reality_data_id: str, io: HarvestIO
    ) -> None:
        container = _Container(self, io, job, reality_data_id)
        await harvest_container(io, container, f"outputs/{job_key(name)}")

    # -- helpers ------------------------------------------------------------------------
    def _ok(self, resp: Response, job: Job | None, endpoint: str) -> dict[str, Any]:
        if not 200 <= resp.status < 300:
            raise error_from(resp, job, endpoint)
        body = resp.json(provider=NAME, job=job.key if job else None)
        if not isinstance(body, dict):
            raise _protocol(resp, f"{endpoint} answer is not a JSON object", job)
        return body


class _Container:
    """One reality data's container URL, resolved once and again only when refused.

    ``stream_into`` calls a resolver once per download and again only after the storage
    host refused the URL (an expired SAS), so each resolver serves the shared, cached URL on
    its first call and re-fetches ``readaccess`` on later ones: one readaccess request per
    output instead of one per blob, and a fresh SAS whenever one expires.
    """

    def __init__(self, provider: BentleyProvider, io: HarvestIO, job: Job, rid: str) -> None:
        self.provider = provider
        self.io = io
        self.job = job
        self.rid = rid
        self.url: str | None = None

    async def refresh(self) -> str:
        resp = await self.io.request(self.provider.build_readaccess(self.rid))
        self.url = self.provider.parse_readaccess(resp, self.job)
        return self.url

    def resolver(self, build: Callable[[str], str]) -> Resolver:
        first = True

        async def resolve() -> str:
            nonlocal first
            if first and self.url is not None:
                first = False
                return build(self.url)
            first = False
            return build(await self.refresh())

        return resolve


def error_from(resp: Response, job: Job | None, endpoint: str) -> HarvesterError:
    """The typed error for a non-2xx answer, keeping Bentley's code and request id."""
    status = resp.status
    code: str | None = None
    try:
        body = resp.json(provider=NAME)
    except ProtocolError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        if error.get("code") is not None:
            code = str(error["code"])[:60]
        message = str(error.get("message") or "")[:300]
        if isinstance(error.get("target"), str):
            message += f" (target {error['target'][:80]})"
        details = error.get("details")
        if isinstance(details, list):
            texts = [_message_text(d) for d in details[:5]]
            message += "".join(f"; {t}" for t in texts if t)
    else:
        message = resp.body[:200].decode("utf-8", "replace").strip()
    message = message or f"HTTP {status} without a message"
    kw: dict[str, Any] = {
        "provider": NAME,
        "job": job.key if job else None,
        "status": status,
        "code": code,
        "request_id": resp.request_id,
    }
    if status in (401, 403):
        return CredentialsError(f"credentials refused: {message}", **kw)
    if status == 404:
        what = "this job" if endpoint != "readaccess" else "this output's reality data"
        return ProviderJobFailed(f"Bentley does not know {what} (404): {message}", **kw)
    if status in (400, 409, 422):
        return InvalidPayload(message, **kw)
    if status == 429:
        return RateLimited(
            f"rate limited: {message}", retry_after=_seconds(resp.headers.get("Retry-After")), **kw
        )
    if status >= 500:
        return ProviderUnavailable(f"server error: {message}", **kw)
    return ProtocolError(f"unexpected answer to {endpoint}: {message}", **kw)


def _message_text(entry: Any) -> str:
    """One Bentley message (a string, or ``{code, title?, message, params?}``) as text."""
    if isinstance(entry, str):
        return entry.strip()[:300]
    if not isinstance(entry, dict):
        return ""
    text = entry.get("message") or entry.get("title") or ""
    text = str(text)
    params = entry.get("params")
    if isinstance(params, list) and params:
        # Messages are templates: "%1" is the first parameter.
        def fill(m: re.Match[str]) -> str:
            i = int(m.group(1)) - 1
            return str(params[i]) if 0 <= i < len(params) else m.group(0)

        text = _PLACEHOLDER.sub(fill, text)
    code = entry.get("code")
    if code is not None and str(code) not in text:
        text = f"{code}: {text}" if text else str(code)
    return text.strip()[:300]


def _join(texts: list[str]) -> str:
    reason = "; ".join(texts)
    return reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 1] + "…"


def _job_object(body: dict[str, Any], resp: Response, job: Job | None) -> dict[str, Any]:
    inner = body.get("job")
    if not isinstance(inner, dict):
        raise _protocol(resp, "answer has no job object", job)
    return inner


def _seconds(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def _protocol(resp: Response, message: str, job: Job | None = None) -> ProtocolError:
    return protocol_error(NAME, resp, message, job)
