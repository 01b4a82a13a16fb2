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
- a create body is Bentley's v2 job creation, checked against Bentley's published schemas
  (``harvester.specs.bentley_v2``): ``specifications.inputs`` maps the type's input names to
  reality-data ids, ``outputs`` lists output names, and the answer maps each output name to a
  reality-data id (or, for reports and metrics, to a ``bkt:`` path in the job's bucket);
- the job's ``name`` is derived from its reference id (``job_name``): unchanged when it is a
  valid v2 name, else sanitised with a hash of the original. A lost create answer is looked
  up by that name in v2's job listing (``$filter=name eq '...'``); a listing that refuses the
  lookup leaves it to the engine's ``on_lost_create`` policy.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from harvester.config import BentleyConfig
from harvester.errors import (
    CreateProblem,
    HarvesterError,
    InvalidPayload,
    JobError,
    ProtocolError,
    ProviderJobFailed,
    RateLimited,
)
from harvester.jobs import Job, job_key
from harvester.providers.azure_container import harvest_container
from harvester.providers.base import (
    Accepted,
    Client,
    CreateResult,
    FindResult,
    Found,
    HarvestIO,
    NextPage,
    NoSetup,
    NotFound,
    PollResult,
    RemoteState,
    Status,
    Unsearchable,
    clip_reason,
    ok_object,
    protocol_error,
)
from harvester.schedule import BENTLEY_LADDER
from harvester.specs import bentley_v2
from harvester.statuses import error_from_answer
from harvester.wire import RequestSpec, Resolver, Response

NAME = "bentley"
ACCEPT = "application/vnd.bentley.itwin-platform.v2+json"
#: Reality Management (readaccess) is a separate API still at version 1
ACCEPT_REALITY_DATA = "application/vnd.bentley.itwin-platform.v1+json"
TYPES = frozenset(bentley_v2.JOB_TYPES)
#: the v2 schema's JobState enum; anything else is polled on as running, marked unknown
_STATES = {
    "Queued": RemoteState.RUNNING,
    "Active": RemoteState.RUNNING,
    "Terminating": RemoteState.RUNNING,
    "Success": RemoteState.SUCCEEDED,
    "Failed": RemoteState.FAILED,
    "Cancelled": RemoteState.CANCELLED,
}
#: a queued job has no progress to report: asking would spend rate budget for nothing
_NO_PROGRESS = {"Queued"}
_PLACEHOLDER = re.compile(r"%(\d+)")
#: jobs per listing page when looking a job up by name (Bentley: default 100, max 1000)
FIND_PAGE = 100
#: listing answers that mean "this lookup is not offered", not "the job is absent"
_NO_LISTING = frozenset({400, 404, 405, 501})
#: an output that is a path in the job's bucket (reports, metrics), not a reality data
BUCKET_PREFIX = "bkt:"
_UNSAFE_NAME = re.compile(r'["<>|:*?\\/\x00-\x1f]')


def job_name(reference_id: str) -> str:
    """The v2 job name for a reference id: itself when valid (3-256 characters, none of
    ``"<>|:*?\\/`` or control characters), else those replaced by ``_``, cut to fit, and
    suffixed with a hash of the original so two reference ids never share a name."""
    if bentley_v2.name_problem(reference_id) is None:
        return reference_id
    digest = hashlib.sha256(reference_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    head = _UNSAFE_NAME.sub("_", reference_id)[: bentley_v2.NAME_MAX - len(digest) - 1]
    return f"{head}-{digest}"


class BentleyProvider(NoSetup):
    name = NAME

    def __init__(self, cfg: BentleyConfig) -> None:
        self.cfg = cfg
        self.base = cfg.base_url.rstrip("/")
        self.jobs = f"{self.base}/reality-analysis/jobs"
        self.reality_data = f"{self.base}/reality-management/reality-data"

    # -- payload ----------------------------------------------------------------------
    def validate_payload(self, payload: Any) -> None:
        self._create_body(payload)

    def _create_body(self, payload: Any) -> dict[str, Any]:
        """The payload as Bentley's v2 create body (config's ``itwin_id`` filled in), or
        ``InvalidPayload`` naming the field and what Bentley's schema expects there."""
        if not isinstance(payload, Mapping):
            raise InvalidPayload(
                "payload must be a JSON object {type, iTwinId, specifications}"
                " (Bentley's v2 job creation)"
            )
        body = dict(payload)
        if "iTwinId" not in body and self.cfg.itwin_id:
            body["iTwinId"] = self.cfg.itwin_id
        try:
            return bentley_v2.check_create(body)
        except CreateProblem as problem:
            hint = " (or set providers.bentley.itwin_id)" if problem.target == "iTwinId" else ""
            where = f"payload.{problem.target}" if problem.target else "payload:"
            raise InvalidPayload(f"{where} {problem.message}{hint}") from problem

    # -- create -------------------------------------------------------------------------
    def build_create(self, job: Job, payload: Mapping[str, Any]) -> RequestSpec:
        # Checked again here: a payload stored before v2 (inputs as a list) is refused with
        # the reason rather than sent.
        body = self._create_body(payload)
        # Named after the reference id (a payload's own name is replaced): the name is how a
        # lost create answer is found again.
        body["name"] = job_name(job.remote_reference or job.key)
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

    # -- reconciliation: the job listing, by name ---------------------------------------
    def build_find(self, job: Job, cursor: str | None) -> RequestSpec | None:
        name = job_name(job.remote_reference or job.key).replace("'", "''")  # an OData literal
        params = {"$filter": f"name eq '{name}'", "$top": str(FIND_PAGE)}
        if cursor:
            params["continuationToken"] = cursor
        return RequestSpec(
            "GET", self.jobs, endpoint="find", params=params, headers={"Accept": ACCEPT}
        )

    def parse_find(self, resp: Response, job: Job) -> FindResult:
        if resp.status in _NO_LISTING:
            err = error_from(resp, job, "find")
            return Unsearchable(f"Bentley refused to list jobs by name (HTTP {resp.status}: {err})")
        body = self._ok(resp, job, "find")
        jobs = body.get("jobs")
        if not isinstance(jobs, list):
            raise _protocol(resp, "job listing has no jobs list", job)
        name = job_name(job.remote_reference or job.key)
        ids = [j.get("id") for j in jobs if isinstance(j, dict) and j.get("name") == name]
        if len(ids) > 1 or (ids and (not isinstance(ids[0], str) or not ids[0])):
            raise ProviderJobFailed(
                f"{len(ids)} Bentley jobs are named {name!r} ({', '.join(map(str, ids[:5]))});"
                " track the right one with a job_id line",
                provider=NAME,
                job=job.key,
            )
        if ids:
            return Found(str(ids[0]))
        links = body.get("_links")
        nxt = links.get("next") if isinstance(links, dict) else None
        href = nxt.get("href") if isinstance(nxt, dict) else None
        if isinstance(href, str) and href:
            token = parse_qs(urlsplit(href).query).get("continuationToken")
            if not token or not token[0]:
                raise _protocol(resp, "job listing's next link has no continuationToken", job)
            return NextPage(token[0])
        return NotFound()

    # -- poll ---------------------------------------------------------------------------
    def _job_url(self, job: Job) -> str:
        return f"{self.jobs}/{quote(str(job.remote_id), safe='')}"

    # -- cancel: DELETE /jobs/{id} (200 with the job, 422 when it cannot be cancelled) ----
    def build_cancel(self, job: Job) -> RequestSpec | None:
        return RequestSpec(
            "DELETE", self._job_url(job), endpoint="cancel", headers={"Accept": ACCEPT}
        )

    def parse_cancel(self, resp: Response, job: Job) -> None:
        _job_object(self._ok(resp, job, "cancel"), resp, job)

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
        return Status(state, raw, progress=progress, document=body, known=raw in _STATES)

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

    def job_class(self, status: Status) -> str | None:
        # the job's "type" (Objects2D, Segmentation3D...): one detector run or another
        job = status.document.get("job") if isinstance(status.document, dict) else None
        kind = job.get("type") if isinstance(job, dict) else None
        return kind if isinstance(kind, str) and kind else None

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
        await io.write_json("job.json", document)
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
                if reality_data_id.startswith(BUCKET_PREFIX):
                    continue  # a report in the job's bucket, not a reality data: in job.json
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
        return ok_object(NAME, resp, job, endpoint, error_from)


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
    what = "this job" if endpoint != "readaccess" else "this output's reality data"
    own = {404: (ProviderJobFailed, f"Bentley does not know {what} (404): {{message}}")}
    err = error_from_answer(NAME, resp, job, endpoint, _read_error, own)
    if isinstance(err, RateLimited):
        err.retry_after = _seconds(resp.headers.get("Retry-After"))
    return err


def _read_error(body: Any) -> tuple[str | None, str] | None:
    """``{"error": {code, message, target?, details?}}``: the code, and the message with its
    target and the details' texts."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None
    code = str(error["code"])[:60] if error.get("code") is not None else None
    message = str(error.get("message") or "")[:300]
    if isinstance(error.get("target"), str):
        message += f" (target {error['target'][:80]})"
    details = error.get("details")
    if isinstance(details, list):
        texts = [_message_text(d) for d in details[:5]]
        message += "".join(f"; {t}" for t in texts if t)
    return code, message


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
    return clip_reason("; ".join(texts))


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
