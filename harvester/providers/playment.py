"""Playment / TELUS annotation: request building and answer parsing (sans-I/O).

Quirks handled here, each tested on recorded bodies:
- a 200 answer with ``success: false`` is an error; every error carries a code;
- ``FS_0001`` on create means the reference id exists: the job is there, find it;
- ``completed`` is the only documented status, anything else is "still going", kept verbatim
  and marked unknown (``Status.known``) so the user is told;
- a point-cloud frame can carry one mask per sensor (``sensor_id``): a frame with one mask
  lands in ``labels/<frame>.npy``, a frame with several in ``labels/<frame>@<sensor>.npy``;
- results and masks are private: they are fetched through ``/v1/attachments?url=``, which
  redirects to a short-lived signed URL on another host (no API key may follow it).
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import orjson

from harvester.config import PlaymentConfig
from harvester.errors import (
    CredentialsError,
    InvalidPayload,
    ProtocolError,
    ProviderJobFailed,
    ProviderUnavailable,
)
from harvester.jobs import Job, job_key
from harvester.providers.base import (
    Accepted,
    AlreadyExists,
    Client,
    CreateResult,
    FindResult,
    Found,
    HarvestIO,
    LabelFrame,
    NextPage,
    NotFound,
    PollResult,
    RemoteFile,
    RemoteState,
    Status,
    protocol_error,
)
from harvester.statuses import Rule, error_for_status, is_transient
from harvester.wire import RequestSpec, Resolver, Response, snippet

NAME = "playment"
#: Playment's error codes (PROVIDERS.md), whatever the status they come with
_REFUSED: Rule = (CredentialsError, "API key refused: {message}")
_CODES: Mapping[str, Rule] = {
    **dict.fromkeys(("auth-failure", "unauthorized"), _REFUSED),
    **dict.fromkeys(("FS_0000", "FS_0008", "api_error"), (ProviderUnavailable, "{message}")),
    **dict.fromkeys(
        ("FS_0001", "FS_0002", "FS_0003", "FS_0004", "FS_0005", "FS_0007", "GE_0001"),
        (InvalidPayload, "{message}"),
    ),
}
#: its statuses that mean something else than the shared table says
_OWN_STATUSES: Mapping[int, Rule] = {401: _REFUSED}
#: the job statuses Playment documents (seed "Get job results"); any other is still running
DOCUMENTED_STATUSES = frozenset({"completed"})
#: joins a frame and a sensor in a label file name; never in a ``job_key`` output, so
#: ``<frame>@<sensor>`` cannot be spelled like a single-sensor ``<frame>`` or another pair
SENSOR_SEPARATOR = "@"
#: image/video results: a walk deeper or a list of files longer than this is not a result
MAX_RESULT_DEPTH = 64
MAX_ATTACHMENTS = 100_000


class PlaymentProvider:
    name = NAME

    def __init__(self, cfg: PlaymentConfig) -> None:
        self.cfg = cfg
        self.base = cfg.base_url.rstrip("/")
        self.project = f"{self.base}/v1/projects/{cfg.project_id}"
        self.batch_id: str | None = cfg.batch_id

    # -- payload -----------------------------------------------------------------------
    def validate_payload(self, payload: Any) -> None:
        """The create body as Playment documents it, minus what the config supplies.

        A body copied whole from the docs may keep its ``reference_id`` (the jobs file makes
        sure it is the line's); ``project_id`` is the config's. The documented ``data``
        shapes (point cloud ``sensor_data``, video ``video_data`` with its optional
        ``reference_data``, image ``image_url``) are checked; other keys pass untouched.
        """
        if not isinstance(payload, dict):
            raise InvalidPayload("payload must be a JSON object with a 'data' object")
        data = payload.get("data")
        if not isinstance(data, dict) or not data:
            raise InvalidPayload("payload.data must be a non-empty JSON object")
        if "project_id" in payload:
            raise InvalidPayload("payload.project_id is not allowed: it comes from the config")
        if "reference_id" in payload and not isinstance(payload["reference_id"], str):
            raise InvalidPayload("payload.reference_id must be a string")
        for key in ("work_flow_id", "batch_id", "tag"):
            if key in payload and payload[key] is not None and not isinstance(payload[key], str):
                raise InvalidPayload(f"payload.{key} must be a string")
        if "sensor_data" in data:
            _check_sensor_data(data["sensor_data"])
        if "video_data" in data:
            _check_frames(data["video_data"], "data.video_data", url_key="src")
        if "reference_data" in data:
            _check_reference_data(data["reference_data"])
        if "image_url" in data and not _is_url(data["image_url"]):
            raise InvalidPayload("payload.data.image_url must be a URL string")
        if not (payload.get("work_flow_id") or payload.get("tag") or self.cfg.work_flow_id):
            # Required by the docs; the official SDK sends it as "tag".
            raise InvalidPayload(
                "payload.work_flow_id is missing (Playment requires one; or set"
                " providers.playment.work_flow_id in the config)"
            )

    # -- setup: a batch of our own, so a lost create answer can be found by listing it ------
    @property
    def setup_key(self) -> str:
        return f"playment.batch.{self.cfg.project_id}"

    def setup_spec(self) -> RequestSpec | None:
        if self.batch_id is not None:
            return None
        # A fresh name per attempt: if an answer is lost the orphan batch is empty and
        # harmless, and the next attempt cannot collide with it.
        name = f"harvester-{secrets.token_hex(6)}"
        return RequestSpec(
            "POST",
            f"{self.project}/batch",
            endpoint="batch",
            json={"name": name, "description": "jobs submitted by harvester"},
            idempotent=False,
        )

    def parse_setup(self, resp: Response) -> str:
        data = self._data(resp, "batch", job=None)
        batch = data.get("batch_id") if isinstance(data, dict) else None
        if not isinstance(batch, str) or not batch:
            raise self._protocol(resp, "batch answer has no data.batch_id")
        self.batch_id = batch
        return batch

    def restore_setup(self, value: str) -> None:
        if self.batch_id is None:
            self.batch_id = value

    # -- create -------------------------------------------------------------------------
    def build_create(self, job: Job, payload: Mapping[str, Any]) -> RequestSpec:
        body: dict[str, Any] = {"reference_id": job.remote_reference, "data": payload["data"]}
        flow = payload.get("work_flow_id") or self.cfg.work_flow_id
        if flow:
            body["work_flow_id"] = flow
        batch = payload.get("batch_id") or self.batch_id
        if batch:
            body["batch_id"] = batch
        for key, value in payload.items():
            body.setdefault(key, value)
        return RequestSpec(
            "POST", f"{self.project}/jobs", endpoint="create", json=body, idempotent=False
        )

    def parse_create(self, resp: Response, job: Job) -> CreateResult:
        try:
            data = self._data(resp, "create", job=job)
        except InvalidPayload as exc:
            if exc.code == "FS_0001":
                return AlreadyExists(exc.message)
            raise
        job_id = data.get("job_id") if isinstance(data, dict) else None
        if not isinstance(job_id, str) or not job_id:
            raise self._protocol(resp, "create answer has no data.job_id", job)
        return Accepted(job_id)

    # -- cancel: Playment's API documents none -----------------------------------------
    def build_cancel(self, job: Job) -> RequestSpec | None:
        return None

    def parse_cancel(self, resp: Response, job: Job) -> None:
        return None

    # -- reconciliation -----------------------------------------------------------------
    def build_find(self, job: Job, cursor: str | None) -> RequestSpec | None:
        if self.batch_id is None:
            return None
        params = {"page_token": cursor} if cursor else {}
        return RequestSpec(
            "GET", f"{self.project}/batch/{self.batch_id}", endpoint="find", params=params
        )

    def parse_find(self, resp: Response, job: Job) -> FindResult:
        data = self._data(resp, "find", job=job)
        jobs = data.get("jobs") if isinstance(data, dict) else None
        if not isinstance(jobs, list):
            raise self._protocol(resp, "batch listing has no data.jobs list", job)
        for item in jobs:
            if isinstance(item, dict) and item.get("reference_id") == job.remote_reference:
                remote = item.get("id") or item.get("job_id")
                if isinstance(remote, str) and remote:
                    return Found(remote)
        token = data.get("next_page_token")
        if isinstance(token, str) and token:
            return NextPage(token)
        return NotFound()

    # -- poll ---------------------------------------------------------------------------
    def build_poll(self, job: Job) -> RequestSpec:
        return RequestSpec("GET", f"{self.project}/jobs/{job.remote_id}", endpoint="poll")

    def parse_poll(self, resp: Response, job: Job) -> PollResult:
        if resp.status == 404:
            raise ProviderJobFailed(
                "Playment does not know this job id (404)",
                provider=NAME,
                job=job.key,
                status=404,
                request_id=resp.request_id,
            )
        data = self._data(resp, "poll", job=job)
        if not isinstance(data, dict):
            raise self._protocol(resp, "job answer has no data object", job)
        raw = data.get("status")
        if not isinstance(raw, str):
            raise self._protocol(resp, "job answer has no status string", job)
        result = data.get("result")
        if raw == "completed" and isinstance(result, str) and result:
            return Status(RemoteState.SUCCEEDED, raw, progress=100.0, document=data)
        # Only "completed" is documented; anything else (or "completed" before its result URL
        # is filled in) is still in progress, and the raw value is kept for `status`.
        return Status(RemoteState.RUNNING, raw, document=data, known=raw in DOCUMENTED_STATUSES)

    async def poll(self, job: Job, client: Client) -> PollResult:
        return await client.call(self.build_poll(job), functools.partial(self.parse_poll, job=job))

    def ladder(self) -> tuple[float, ...] | None:
        return None

    def job_class(self, status: Status) -> str | None:
        # the workflow (work_flow_id): the annotation pipeline a job goes through, which
        # sets how long it takes; the project is the adapter's one, a batch only a grouping
        doc = status.document
        flow = doc.get("work_flow_id") if isinstance(doc, dict) else None
        return flow if isinstance(flow, str) and flow else None

    # -- attachments --------------------------------------------------------------------
    def build_attachment(self, url: str) -> RequestSpec:
        return RequestSpec(
            "GET", f"{self.base}/v1/attachments", endpoint="attachment", params={"url": url}
        )

    def parse_attachment(self, resp: Response, url: str) -> str:
        if resp.status in (301, 302, 303, 307, 308):
            location = resp.headers.get("Location")
            if not location:
                raise self._protocol(resp, "attachment redirect without a Location")
            signed = urljoin(resp.url, location)
            if urlsplit(signed).scheme not in ("http", "https"):
                raise self._protocol(resp, "attachment redirect to a non-HTTP URL")
            return signed
        data = self._data(resp, "attachment", job=None)
        # Not documented, but a JSON answer naming the signed URL is the obvious variant.
        found = data.get("url") if isinstance(data, dict) else None
        if isinstance(found, str) and found.startswith(("http://", "https://")):
            return found
        raise self._protocol(resp, f"attachment answer for {_path_of(url)} has no signed URL")

    def resolver(self, io: HarvestIO, url: str) -> Resolver:
        async def resolve() -> str:
            return self.parse_attachment(await io.request(self.build_attachment(url)), url)

        return resolve

    # -- harvest ------------------------------------------------------------------------
    async def harvest(self, job: Job, status: Status, io: HarvestIO) -> None:
        document = status.document
        await io.write_json("job.json", document)
        result_url = document["result"]
        body = await io.fetch(self.resolver(io, result_url), what="result.json")
        await io.write_bytes("result.json", body)
        try:
            result = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError("result.json is not JSON", provider=NAME, job=job.key) from exc
        if not isinstance(result, dict):
            raise ProtocolError("result.json is not a JSON object", provider=NAME, job=job.key)
        annotation_data = result.get("annotation_data")
        if isinstance(annotation_data, dict) and "masks" in annotation_data:
            await self._harvest_masks(job, annotation_data, io)
        elif "legend" in result and "url" in result:
            await self._harvest_pcd(job, result, io)
        else:
            await self._harvest_attachments(job, result, io)

    async def _harvest_masks(self, job: Job, annotation_data: Any, io: HarvestIO) -> None:
        if not isinstance(annotation_data, dict):
            raise ProtocolError("annotation_data is not an object", provider=NAME, job=job.key)
        masks = annotation_data.get("masks")
        if not isinstance(masks, list):
            raise ProtocolError("annotation_data.masks is not a list", provider=NAME, job=job.key)
        await io.write_json("classes.json", classes_from_annotations(annotation_data, job))
        frames = [
            # label_url names the attachment, not a signed URL: stable across attempts
            LabelFrame(
                name, self.resolver(io, url), "mask", source=url, frame_id=frame, sensor_id=sensor
            )
            for name, frame, sensor, url in mask_files(masks, job)
        ]
        await io.label_frames(frames)

    async def _harvest_pcd(self, job: Job, result: dict[str, Any], io: HarvestIO) -> None:
        url = result["url"]
        if not isinstance(url, str) or not url:
            raise ProtocolError("result url is not a string", provider=NAME, job=job.key)
        await io.write_json("classes.json", classes_from_legend(result.get("legend"), job))
        stem = PurePosixPath(urlsplit(url).path).name
        stem = stem.removesuffix(".pcd").removesuffix("_data") or "frame"
        await io.labels(frame_file_name(stem), self.resolver(io, url), "pcd", source=url)

    async def _harvest_attachments(self, job: Job, result: dict[str, Any], io: HarvestIO) -> None:
        """Image and video results: every file the result links to, filed by frame."""
        if "legend" in result:
            await io.write_json("classes.json", classes_from_legend(result["legend"], job))
        try:
            found = find_attachments(result)
        except ValueError as exc:
            raise ProtocolError(str(exc), provider=NAME, job=job.key) from exc
        # the job's own input echoed back (image_url, src) is not a result
        wanted = [att for att in found if att.url not in io.input_urls]
        # Several at a time, like frames; the index stays in document order whatever order
        # the files finish in (the manifest is sorted by path).
        await io.download_files([RemoteFile(a.relpath, self.resolver(io, a.url)) for a in wanted])
        index = [
            {
                "file": att.relpath,
                "frame": att.frame,
                "json_path": att.json_path,
                "url_path": _path_of(att.url),
            }
            for att in wanted
        ]
        if index:
            # The folder says which frame a file belongs to; this says where in the result
            # it was referenced, for the files whose names alone are ambiguous.
            await io.write_json("attachments.json", index)

    # -- helpers ------------------------------------------------------------------------
    def _data(self, resp: Response, endpoint: str, *, job: Job | None) -> Any:
        """The ``data`` of a success envelope, or the shared table's error, Playment's error
        codes first (an error can come with any status, a 200 included)."""
        kw: dict[str, Any] = {"provider": NAME, "job": job.key if job else None}
        kw["request_id"] = resp.request_id
        if is_transient(resp.status):  # the transport raised these already; not for tests
            raise error_for_status(resp.status, snippet(resp.body), endpoint=endpoint, **kw)
        body = resp.json(provider=NAME, job=kw["job"])
        if not isinstance(body, dict) or not isinstance(body.get("success"), bool):
            raise self._protocol(resp, "answer has no boolean 'success'", job)
        if body["success"] and resp.status < 300:
            return body.get("data")
        error = body.get("error")
        code = message = None
        if isinstance(error, dict):
            code, message = error.get("code"), error.get("message")
        kw["code"] = str(code) if code is not None else None
        text = str(message) if message else "request failed"
        raise error_for_status(
            resp.status, text, endpoint=endpoint, own=_OWN_STATUSES, codes=_CODES, **kw
        )

    def _protocol(self, resp: Response, message: str, job: Job | None = None) -> ProtocolError:
        return protocol_error(NAME, resp, message, job)


def _is_url(value: Any) -> bool:
    # Not stricter than Playment's SDK: buckets and signed links come in many schemes.
    return isinstance(value, str) and bool(value.strip())


def _object_list(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        raise InvalidPayload(f"payload.{where} must be a non-empty list of objects")
    return value


def _check_frames(section: Any, where: str, *, url_key: str | None) -> list[dict[str, Any]]:
    """``<where>.frames``: objects with a unique non-empty string ``frame_id``."""
    if not isinstance(section, dict):
        raise InvalidPayload(f"payload.{where} must be an object")
    frames = _object_list(section.get("frames"), f"{where}.frames")
    seen: set[str] = set()
    for i, frame in enumerate(frames):
        fid = frame.get("frame_id")
        if not isinstance(fid, str) or not fid:
            raise InvalidPayload(f"payload.{where}.frames[{i}].frame_id must be a string")
        if fid in seen:
            raise InvalidPayload(f"payload.{where}.frames[{i}].frame_id {fid!r} is repeated")
        seen.add(fid)
        if url_key is not None and not _is_url(frame.get(url_key)):
            raise InvalidPayload(f"payload.{where}.frames[{i}].{url_key} must be a URL string")
    return frames


def _check_sensor_data(section: Any) -> None:
    """Point clouds: frames (each ``sensors[]`` naming a ``sensor_id``) and ``sensor_meta``."""
    if not isinstance(section, dict):
        raise InvalidPayload("payload.data.sensor_data must be an object")
    if "frames" in section:
        frames = _check_frames(section, "data.sensor_data", url_key=None)
        for i, frame in enumerate(frames):
            sensors = frame.get("sensors", [])
            if not isinstance(sensors, list) or not all(
                isinstance(s, dict) and isinstance(s.get("sensor_id"), str) for s in sensors
            ):
                raise InvalidPayload(
                    f"payload.data.sensor_data.frames[{i}].sensors must be a list of objects"
                    " with a string sensor_id"
                )
    meta = section.get("sensor_meta", [])
    if not isinstance(meta, list) or not all(
        isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"] for m in meta
    ):
        raise InvalidPayload(
            "payload.data.sensor_data.sensor_meta must be a list of objects with a string id"
        )


def _check_reference_data(section: Any) -> None:
    """Video: optional reference images per frame, ``raster.images[{frame_id, data[]}]``."""
    raster = section.get("raster") if isinstance(section, dict) else None
    if not isinstance(raster, dict):
        raise InvalidPayload("payload.data.reference_data must be an object with 'raster'")
    images = _object_list(raster.get("images"), "data.reference_data.raster.images")
    for i, image in enumerate(images):
        where = f"data.reference_data.raster.images[{i}]"
        if not isinstance(image.get("frame_id"), str) or not image["frame_id"]:
            raise InvalidPayload(f"payload.{where}.frame_id must be a string")
        for j, item in enumerate(_object_list(image.get("data"), f"{where}.data")):
            if not _is_url(item.get("image_url")):
                raise InvalidPayload(f"payload.{where}.data[{j}].image_url must be a URL string")


def mask_files(masks: list[Any], job: Job) -> list[tuple[str, str, str | None, str]]:
    """(file name, frame_id, sensor_id, label_url) for every mask, in document order.

    A frame with one mask is named after the frame alone (the layout single-sensor results
    always had); a frame with several, one per sensor, gets ``<frame>@<sensor>`` for each
    (``<frame>@`` for the one without a sensor id). Both parts are made safe like job keys,
    which never contain ``@``, so no two masks share a name. Two masks of one frame and one
    sensor are ambiguous: a ``ProtocolError``.
    """
    entries: list[tuple[str, str | None, str]] = []
    per_frame: dict[str, set[str | None]] = {}
    for mask in masks:
        if not isinstance(mask, dict):
            raise ProtocolError("a mask entry is not an object", provider=NAME, job=job.key)
        frame, url, sensor = mask.get("frame_id"), mask.get("label_url"), mask.get("sensor_id")
        if not isinstance(frame, str) or not frame or not isinstance(url, str) or not url:
            raise ProtocolError(
                "a mask entry lacks frame_id or label_url", provider=NAME, job=job.key
            )
        if sensor is not None and not isinstance(sensor, str):
            raise ProtocolError(
                f"mask of frame {frame!r} has a sensor_id that is not a string",
                provider=NAME,
                job=job.key,
            )
        sensor = sensor or None  # "" (as in the seed's annotations) is no sensor, like null
        sensors = per_frame.setdefault(frame, set())
        if sensor in sensors:
            raise ProtocolError(
                f"two masks for frame {frame!r} and sensor {sensor!r}", provider=NAME, job=job.key
            )
        sensors.add(sensor)
        entries.append((frame, sensor, url))
    out: list[tuple[str, str, str | None, str]] = []
    for frame, sensor, url in entries:
        name = frame_file_name(frame)
        if len(per_frame[frame]) > 1:
            name += SENSOR_SEPARATOR + (frame_file_name(sensor) if sensor else "")
        out.append((name, frame, sensor, url))
    return out


def classes_from_annotations(annotation_data: dict[str, Any], job: Job) -> dict[str, Any]:
    """label_key -> {label, class_id, color}, one entry per label key (first one wins)."""
    annotations = annotation_data.get("annotations", [])
    if not isinstance(annotations, list):
        raise ProtocolError("annotations is not a list", provider=NAME, job=job.key)
    classes: dict[str, Any] = {}
    for ann in annotations:
        if not isinstance(ann, dict) or "label_key" not in ann:
            continue
        key = str(ann["label_key"])
        if key not in classes:
            classes[key] = {
                "label": ann.get("label"),
                "class_id": ann.get("class_id"),
                "color": ann.get("color"),
            }
    return dict(sorted(classes.items(), key=lambda kv: _num_key(kv[0])))


def classes_from_legend(legend: Any, job: Job) -> dict[str, Any]:
    if not isinstance(legend, list):
        raise ProtocolError("legend is not a list", provider=NAME, job=job.key)
    classes: dict[str, Any] = {}
    for item in legend:
        if isinstance(item, dict) and "label_key" in item:
            classes.setdefault(
                str(item["label_key"]),
                {
                    "label": item.get("text"),
                    "class_id": item.get("id"),
                    "color": item.get("color"),
                    "value": item.get("value"),
                },
            )
    return dict(sorted(classes.items(), key=lambda kv: _num_key(kv[0])))


@dataclass(frozen=True, slots=True)
class Attachment:
    url: str
    frame: str  #: the frame it belongs to: its frame_id, else a list index, else "0"
    relpath: str  #: ``outputs/<frame>/<file name>``
    json_path: str  #: where the result references it, e.g. ``$.frames[2].label_url``


def is_attachment_key(key: str) -> bool:
    """``url``/``urls`` or a name ending ``_url``/``_urls``/``Url``/``Urls``."""
    return key in ("url", "urls") or key.endswith(("_url", "_urls", "Url", "Urls"))


def find_attachments(result: Any) -> list[Attachment]:
    """Every file an image/video result links to, in document order, each once.

    The rule: a string is an attachment when it starts with ``http://`` or ``https://``
    and its key (the object key it is the value of; for a string in a list, the key of
    that list) passes ``is_attachment_key`` (``label_url``, ``image_url``, ``mask_url``,
    ``url``, ``maskUrl``, ``urls``, ...). Its frame is the ``frame_id`` of the nearest
    enclosing object that has one, else its index in the outermost list of objects
    (``frames[i]``), else ``"0"`` (a single image). It is saved as
    ``outputs/<frame>/<last URL path segment>``, both made safe like job keys, with a short
    hash of the URL added when two files of one frame share a name. Raises ``ValueError``
    for results nested absurdly deep or linking absurdly many files.
    """
    found: list[Attachment] = []
    urls: set[str] = set()
    used: set[str] = set()
    # (value, key, json path, frame, outer index, depth), walked without recursion
    stack: list[tuple[Any, str | None, str, str | None, int | None, int]] = [
        (result, None, "$", None, None, 0)
    ]
    while stack:
        value, key, path, frame, outer, depth = stack.pop()
        if depth > MAX_RESULT_DEPTH:
            raise ValueError(f"result.json is nested deeper than {MAX_RESULT_DEPTH} levels")
        if isinstance(value, dict):
            fid = value.get("frame_id")
            if isinstance(fid, str | int) and not isinstance(fid, bool) and str(fid):
                frame = str(fid)
            stack.extend(
                (v, str(k), f"{path}.{k}", frame, outer, depth + 1)
                for k, v in reversed(value.items())
            )
        elif isinstance(value, list):
            stack.extend(
                (
                    v,
                    key,
                    f"{path}[{i}]",
                    frame,
                    i if outer is None and isinstance(v, dict) else outer,
                    depth + 1,
                )
                for i, v in reversed(list(enumerate(value)))
            )
        elif (
            isinstance(value, str)
            and key is not None
            and is_attachment_key(key)
            and value[:8].lower().startswith(("http://", "https://"))
            and value not in urls
        ):
            urls.add(value)
            if len(urls) > MAX_ATTACHMENTS:
                raise ValueError(f"result.json links more than {MAX_ATTACHMENTS} files")
            where = frame if frame is not None else str(outer if outer is not None else 0)
            relpath = f"outputs/{frame_file_name(where)}/{_file_name(value)}"
            if relpath in used:
                stem, dot, ext = relpath.rpartition(".")
                tag = hashlib.sha256(value.encode()).hexdigest()[:8]
                relpath = f"{stem}+{tag}.{ext}" if dot and "/" not in ext else f"{relpath}+{tag}"
            used.add(relpath)
            found.append(Attachment(value, where, relpath, path))
    return found


def _file_name(url: str) -> str:
    name = unquote(PurePosixPath(urlsplit(url).path).name)
    return job_key(name) if name else "file"


def frame_file_name(frame: str) -> str:
    """Frame ids come from payloads: make them a safe file name (same rule as job keys)."""
    return job_key(frame)


def _num_key(text: str) -> tuple[int, int | str]:
    return (0, int(text)) if text.isdigit() else (1, text)


def _path_of(url: str) -> str:
    return urlsplit(url).path
