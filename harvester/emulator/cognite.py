"""Cognite Data Fusion's vision segmentation API, mounted under ``/cognite``.

Paths follow the cluster base unchanged (``/api/v1/projects/{project}/...``). Every answer,
errors and injected faults included, carries an ``x-request-id`` header and errors use the
``{"error": {"code", "message", "missing"?, "duplicated"?}}`` envelope. Cognite documents its
429s (rate or concurrency) and 503s as carrying no Retry-After, so none is ever sent here. Error
answers whose status the scenario lists in ``auto_retryable_statuses`` carry
``cdf-is-auto-retryable: true`` (Cognite's mark of a request that may be sent again).
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from harvester.emulator.bodies import BodyError, read_json_object
from harvester.emulator.cognite_model import CogniteError, CogniteModel
from harvester.emulator.middleware import provider_middlewares
from harvester.emulator.oauth import REFUSAL_MESSAGES, check_bearer
from harvester.emulator.objects import ObjectSource
from harvester.emulator.responses import json_response
from harvester.emulator.state import EmulatorState
from harvester.emulator.storage import StorageHost

PROVIDER = "cognite"
FILES_PREFIX = "/cognite-files/"
_FILE_PATH = re.compile(r"^/cognite-files/(?P<project>[^/]+)/(?P<id>[1-9][0-9]{0,15})$")
LINK_TTL_S = 30.0
EXTENDED_LINK_TTL_S = 3600.0
RATE_MESSAGE = "Too many requests: rate limit exceeded (rate). Back off and retry."
_log = logging.getLogger(__name__)


def error_response(status: int, message: str, **extra: Any) -> web.Response:
    return json_response(CogniteError(status, message, **extra).body(), status)


def _render_error(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.StreamResponse:
    # ``headers`` is dropped on purpose: it can only hold a Retry-After, which Cognite never
    # sends, whatever the scenario's fault asked for.
    if status == 429:
        message = RATE_MESSAGE
    return error_response(status, message)


AUTO_RETRY_HEADER = "cdf-is-auto-retryable"


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("x-request-id", uuid.uuid4().hex)


class CogniteApi:
    def __init__(self, state: EmulatorState, storage: StorageHost) -> None:
        self.state = state
        self.scenario = state.scenario.cognite
        self.storage = storage
        self.model = CogniteModel(self.scenario, state.scenario.seed, state.clock)
        storage.objects.mount(FILES_PREFIX, self._resolve_file)
        state.add_stats_source(PROVIDER, self._stats)
        state.add_truth_source(PROVIDER, self.model.truth)

    def build_app(self) -> web.Application:
        rl = self.scenario.rate_limit
        middlewares = provider_middlewares(
            PROVIDER, self.state, _render_error, rate_limit=rl, retry_after="none"
        )
        app = web.Application(middlewares=[*middlewares, self._auth])
        app.on_response_prepare.append(_add_request_id)
        app.on_response_prepare.append(self._mark_retryable)
        r = app.router
        base = "/api/v1/projects/{project}"
        r.add_post(f"{base}/context/vision/segment", self._api(self._create, vision=True))
        r.add_get(f"{base}/context/vision/segment/{{job_id}}", self._api(self._get, vision=True))
        r.add_post(f"{base}/files/downloadlink", self._api(self._download_link))
        r.add_get("/api/v1/token/inspect", self._api(self._inspect))
        return app

    async def _mark_retryable(self, request: web.Request, response: web.StreamResponse) -> None:
        if response.status in self.scenario.auto_retryable_statuses:
            response.headers[AUTO_RETRY_HEADER] = "true"

    def _stats(self) -> dict[str, Any]:
        return {"jobs": len(self.model.jobs), "jobs_by_status": self.model.count_by_status()}

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        reason = check_bearer(self.state, PROVIDER, request, self.scenario.required_scope)
        if reason is not None:
            return error_response(401, f"Unauthorized: {REFUSAL_MESSAGES[reason]}")
        return await handler(request)

    def _api(self, handler: Handler, *, vision: bool = False) -> Handler:
        required = self.scenario.required_cdf_version

        async def wrapped(request: web.Request) -> web.StreamResponse:
            if vision and required and request.headers.get("cdf-version") != required:
                return error_response(
                    400, f"This endpoint requires the header 'cdf-version: {required}'"
                )
            try:
                return await handler(request)
            except CogniteError as exc:
                return json_response(exc.body(), exc.status)
            except BodyError as exc:
                return error_response(400, exc.message)
            except Exception:
                # An emulator bug must still answer in Cognite's envelope, or it would test
                # the client's handling of a body Cognite never sends.
                _log.exception("cognite handler failed: %s %s", request.method, request.path)
                return error_response(500, "Internal server error")

        return wrapped

    # -- handlers -----------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.StreamResponse:
        project = request.match_info["project"]
        body = await read_json_object(request)
        job = self.model.create(project, body)
        # No idempotency key exists: identical bodies are grouped so a test can spot a
        # blindly retried create.
        self.state.record_create(PROVIDER, project, job.key, new=True)
        return json_response(self.model.render(job, just_created=True))

    async def _get(self, request: web.Request) -> web.StreamResponse:
        m = request.match_info
        return json_response(self.model.render(self.model.get(m["project"], m["job_id"])))

    async def _download_link(self, request: web.Request) -> web.StreamResponse:
        project = request.match_info["project"]
        extended = request.query.get("extendedExpiration", "false").lower() == "true"
        ttl = EXTENDED_LINK_TTL_S if extended else LINK_TTL_S
        items = self.model.download_items(await read_json_object(request))
        out = [
            {**ident, "downloadUrl": self.storage.signed_url(_file_path(project, fid), ttl)}
            for ident, fid in items
        ]
        return json_response({"items": out})

    async def _inspect(self, request: web.Request) -> web.StreamResponse:
        check = self.state.tokens.check_header(request.headers.get("Authorization"))
        subject = check.token.client_id if check.token else ""
        projects = [{"projectUrlName": p, "groups": []} for p in sorted(self.model.projects)]
        return json_response({"subject": subject, "projects": projects, "capabilities": []})

    # -- storage ------------------------------------------------------------------------

    def _resolve_file(self, path: str) -> ObjectSource | None:
        m = _FILE_PATH.match(path)
        if m is None or not self.model.file_exists(int(m["id"])):
            return None
        project, file_id = m["project"], int(m["id"])
        return ObjectSource(
            lambda: self.model.file_bytes(project, file_id), "application/octet-stream"
        )


def _file_path(project: str, file_id: int) -> str:
    return f"{FILES_PREFIX}{project}/{file_id}"
