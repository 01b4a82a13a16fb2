"""Cognite Data Fusion vision segmentation: request building and answer parsing (sans-I/O).

Quirks handled here, each tested on recorded bodies:
- the API version is a header (``cdf-version``), and segmentation exists only in a beta one;
- statuses ``Queued``/``Running``/``Completed``/``Failed`` (the segmentation reference's whole
  enum); CDF's other contextualization APIs also say ``Distributing``/``Collecting``, so any
  other status is "still going", kept verbatim and marked unknown, rather than a failure;
- an item names its file by ``fileId``, ``fileExternalId`` or ``fileInstanceId {space,
  externalId}`` (a data-modeling node), exactly one of them;
- an error answer with ``cdf-is-auto-retryable: true`` says the request may be sent again,
  a create included (Cognite's SDKs retry on it): every Cognite spec names that header, and
  the transport retries such an answer;
- a ``Completed`` job whose only item landed in ``failedItems`` produced nothing: failed;
- errors come as ``{"error": {"code", "message", "missing"?, "duplicated"?}}`` with an
  ``x-request-id`` header, both kept in the error a user sees;
- 429 and 503 come without ``Retry-After``. Nothing here handles them: the transport closes
  the provider's gate with truncated exponential backoff and full jitter (``ratelimit``), for
  every request to Cognite at once;
- Cognite offers no lookup of a job by anything of ours, so a lost create answer is left to
  the engine's ``on_lost_create`` policy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from harvester.config import CogniteConfig
from harvester.errors import (
    HarvesterError,
    InvalidPayload,
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

NAME = "cognite"
#: CDF ids are positive integers that fit a JSON double exactly
MAX_ID = 2**53 - 1
#: a response header by which Cognite marks a failed request as safe to send again
AUTO_RETRY_HEADER = "cdf-is-auto-retryable"
MAX_EXTERNAL_ID = 255
_FIELDS = ("items", "points", "boundingBox")
MAX_SPACE = 43
#: every status of the segmentation reference; anything else is polled on, marked unknown
STATES = {
    "Queued": RemoteState.RUNNING,
    "Running": RemoteState.RUNNING,
    "Completed": RemoteState.SUCCEEDED,
    "Failed": RemoteState.FAILED,
}


class CogniteProvider(NoSetup, NoLookup):
    name = NAME

    def __init__(self, cfg: CogniteConfig) -> None:
        self.cfg = cfg
        self.base = cfg.base_url.rstrip("/")
        self.segment = (
            f"{self.base}/api/v1/projects/{quote(cfg.project, safe='')}/context/vision/segment"
        )
        self.headers = {"cdf-version": cfg.cdf_version}

    # -- payload -----------------------------------------------------------------------
    def validate_payload(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            raise InvalidPayload("payload must be a JSON object with items and points")
        for key in payload:
            if key not in _FIELDS:  # CDF answers 400 "Unrecognized field" to any other
                fields = ", ".join(_FIELDS)
                raise InvalidPayload(f"payload.{key[:60]} is not a field ({fields}) of a segment")
        items = payload.get("items")
        if not isinstance(items, list) or len(items) != 1:
            raise InvalidPayload("payload.items must be a list of exactly one file")
        _check_item(items[0])
        box = payload.get("boundingBox")
        if box is not None:
            _check_box(box)
        points = payload.get("points")
        # "prompt points and/or a bounding box": no point is fine when there is a box.
        if not isinstance(points, list) or (not points and box is None):
            raise InvalidPayload(
                "payload.points must be a list of {x, y, label}, non-empty without a boundingBox"
            )
        seen: dict[tuple[Any, ...], int] = {}
        for i, point in enumerate(points):
            where = f"payload.points[{i}]"
            if not isinstance(point, dict):
                raise InvalidPayload(f"{where} must be an object {{x, y, label}}")
            if set(point) - {"x", "y", "label"}:
                raise InvalidPayload(f"{where} may hold only x, y and label")
            for axis in ("x", "y"):
                if not _unit(point.get(axis)):
                    raise InvalidPayload(f"{where}.{axis} must be a number from 0 to 1")
            label = point.get("label")
            if type(label) is not int or label not in (0, 1):
                raise InvalidPayload(f"{where}.label must be 0 (background) or 1 (foreground)")
            key = (point["x"], point["y"], label)
            if key in seen:  # the reference: the points are a unique array
                raise InvalidPayload(f"{where} repeats payload.points[{seen[key]}]")
            seen[key] = i

    # -- create -------------------------------------------------------------------------
    def build_create(self, job: Job, payload: Mapping[str, Any]) -> RequestSpec:
        return RequestSpec(
            "POST",
            self.segment,
            endpoint="create",
            json=dict(payload),
            headers=self.headers,
            idempotent=False,
            retry_header=AUTO_RETRY_HEADER,
        )

    def parse_create(self, resp: Response, job: Job) -> CreateResult:
        body = self._ok(resp, job, "create")
        return Accepted(_job_id(body.get("jobId"), resp, job))

    # -- cancel: the vision segmentation API has create and retrieve only -------------
    def build_cancel(self, job: Job) -> RequestSpec | None:
        return None

    def parse_cancel(self, resp: Response, job: Job) -> None:
        return None

    # -- poll ---------------------------------------------------------------------------
    def build_poll(self, job: Job) -> RequestSpec:
        return RequestSpec(
            "GET",
            f"{self.segment}/{quote(str(job.remote_id), safe='')}",
            endpoint="poll",
            headers=self.headers,
            retry_header=AUTO_RETRY_HEADER,
        )

    def parse_poll(self, resp: Response, job: Job) -> PollResult:
        body = self._ok(resp, job, "poll")
        raw = body.get("status")
        if not isinstance(raw, str) or not raw:
            raise _protocol(resp, "job answer has no status string", job)
        state = STATES.get(raw, RemoteState.RUNNING)
        if state == RemoteState.FAILED:
            return Status(state, raw, reason=failure_reason(body), document=body)
        started = _epoch_ms(body.get("startTime"))
        if state == RemoteState.SUCCEEDED:
            items = body.get("items")
            if items is not None and not isinstance(items, list):
                raise _protocol(resp, "completed job's items is not a list", job)
            if not items and _failed_items(body):
                return Status(RemoteState.FAILED, raw, reason=failure_reason(body), document=body)
            # statusTime: when the status last changed, i.e. when it completed
            ended = _epoch_ms(body.get("statusTime"))
            return Status(
                state, raw, progress=100.0, document=body, started_at=started, ended_at=ended
            )
        # Queued jobs have not started; a startTime there would only be the create time.
        started = started if raw != "Queued" else None
        return Status(state, raw, document=body, known=raw in STATES, started_at=started)

    async def poll(self, job: Job, client: Client) -> PollResult:
        return await client.call(self.build_poll(job), functools.partial(self.parse_poll, job=job))

    def ladder(self) -> tuple[float, ...] | None:
        return None

    def job_class(self, status: Status) -> str | None:
        # A class would be the vision endpoint, and this adapter calls one (segment): the
        # provider's table is that endpoint's.
        return None

    # -- harvest ------------------------------------------------------------------------
    async def harvest(self, job: Job, status: Status, io: HarvestIO) -> None:
        document = status.document
        if not isinstance(document, dict):
            raise ProtocolError("final job document is not an object", provider=NAME, job=job.key)
        items = document.get("items")
        if not isinstance(items, list):
            raise ProtocolError("completed job has no items list", provider=NAME, job=job.key)
        await io.write_json("job.json", document)
        # Exactly as served: segment polygons are the result, and any reshaping here would
        # be a second format for users to learn.
        await io.write_json("segments.json", {"items": items})

    # -- helpers ------------------------------------------------------------------------
    def _ok(self, resp: Response, job: Job, endpoint: str) -> dict[str, Any]:
        return ok_object(NAME, resp, job, endpoint, error_from)


def error_from(resp: Response, job: Job | None, endpoint: str) -> HarvesterError:
    """The typed error for a non-2xx answer, keeping Cognite's code and request id."""
    what = "this job id" if endpoint == "poll" else "the segmentation endpoint"
    own = {404: (ProviderJobFailed, f"Cognite does not know {what} (404): {{message}}")}
    return error_from_answer(NAME, resp, job, endpoint, _read_error, own)


def _read_error(body: Any) -> tuple[str | None, str] | None:
    """``{"error": {"code", "message", "missing"?, "duplicated"?}}``: code and message."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None
    code = str(error["code"])[:40] if error.get("code") is not None else None
    message = str(error["message"])[:300] if error.get("message") is not None else ""
    for key in ("missing", "duplicated"):
        if isinstance(error.get(key), list) and error[key]:
            message += f"; {key}: {_ids(error[key])}"
    return code, message


def failure_reason(body: Mapping[str, Any]) -> str:
    """``errorMessage`` and every ``failedItems[].errorMessage``, de-duplicated, in order."""
    texts: list[str] = []
    top = body.get("errorMessage")
    if isinstance(top, str) and top.strip():
        texts.append(top.strip())
    for failed in _failed_items(body):
        text = failed.get("errorMessage")
        if isinstance(text, str) and text.strip() and text.strip() not in texts:
            texts.append(text.strip())
    reason = "; ".join(texts) or f"Cognite job {body.get('status')} without an error message"
    return clip_reason(reason)


def _failed_items(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    failed = body.get("failedItems")
    if not isinstance(failed, list):
        return []
    return [f for f in failed if isinstance(f, dict)]


def _job_id(value: Any, resp: Response, job: Job) -> str:
    # orjson turns an integer beyond 64 bits into a float: that is rejected here too.
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 2**63 - 1:
        return str(value)
    if isinstance(value, str) and value.isdigit() and len(value) <= 19:
        return value
    raise _protocol(resp, "create answer has no integer jobId", job)


_ITEM_FORMS = "{fileId}, {fileExternalId} or {fileInstanceId: {space, externalId}}"


def _check_item(item: Any) -> None:
    where = "payload.items[0]"
    if not isinstance(item, dict):
        raise InvalidPayload(f"{where} must be an object {_ITEM_FORMS}")
    keys = set(item)
    if keys == {"fileId"}:
        value = item["fileId"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID:
            raise InvalidPayload(f"{where}.fileId must be an integer from 1 to {MAX_ID}")
    elif keys == {"fileExternalId"}:
        _check_text(item["fileExternalId"], f"{where}.fileExternalId", MAX_EXTERNAL_ID)
    elif keys == {"fileInstanceId"}:
        node = item["fileInstanceId"]
        if not isinstance(node, dict) or set(node) != {"space", "externalId"}:
            raise InvalidPayload(
                f"{where}.fileInstanceId must be an object {{space, externalId}}, nothing else"
            )
        _check_text(node["space"], f"{where}.fileInstanceId.space", MAX_SPACE)
        _check_text(node["externalId"], f"{where}.fileInstanceId.externalId", MAX_EXTERNAL_ID)
    else:
        raise InvalidPayload(f"{where} must be exactly one of {_ITEM_FORMS}, nothing else")


def _check_text(value: Any, where: str, limit: int) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= limit:
        raise InvalidPayload(f"{where} must be a string of 1 to {limit} characters")


def _check_box(box: Any) -> None:
    names = ("xMin", "yMin", "xMax", "yMax")
    if not isinstance(box, dict):
        raise InvalidPayload("payload.boundingBox must be an object {xMin, yMin, xMax, yMax}")
    if set(box) - set(names):
        raise InvalidPayload("payload.boundingBox may hold only xMin, yMin, xMax and yMax")
    for name in names:
        if not _unit(box.get(name)):
            raise InvalidPayload(f"payload.boundingBox.{name} must be a number from 0 to 1")
    if not box["xMin"] < box["xMax"] or not box["yMin"] < box["yMax"]:
        raise InvalidPayload("payload.boundingBox needs xMin < xMax and yMin < yMax")


def _unit(value: Any) -> bool:
    """A coordinate normalised to the image: a finite number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and 0 <= value <= 1


def _ids(entries: list[Any]) -> str:
    shown = ", ".join(str(e)[:80] for e in entries[:5])
    return shown + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")


def _protocol(resp: Response, message: str, job: Job | None = None) -> ProtocolError:
    return protocol_error(NAME, resp, message, job)


def _epoch_ms(value: Any) -> float | None:
    """Cognite's epoch-milliseconds timestamps, as Unix seconds; None if absent or odd (a
    time is a scheduling hint here, never a reason to fail a job)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    seconds = value / 1000.0
    return seconds if math.isfinite(seconds) and seconds > 0 else None
