"""Bentley's Reality Analysis API (``/reality-analysis``) and the read-access part of Reality
Management (``/reality-management``), mounted under ``/bentley``; output containers are
served Azure-style by the storage host (see ``azure``).

Every call needs ``Authorization: Bearer <token>`` whose token carries the ``itwin-platform``
scope. v2: create bodies are checked against Bentley's published schemas, jobs are listed with
``$filter``/``$top``/``continuationToken``, states are the v2 enum. Errors are
``{"error": {"code", "message", "target"?, "details"?}}``, and a 429 always
carries ``Retry-After`` in seconds, as Bentley documents. Any ``Accept`` header is taken
(the documented one is ``application/vnd.bentley.itwin-platform.v2+json``).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from harvester.emulator.azure import AzureContainers, BlobEntry, SasSigner, content_type
from harvester.emulator.bentley_model import AnalysisJob, BentleyError, BentleyModel
from harvester.emulator.bodies import BodyError, read_json_object
from harvester.emulator.middleware import provider_middlewares
from harvester.emulator.oauth import REFUSAL_MESSAGES, check_bearer
from harvester.emulator.objects import ObjectSource
from harvester.emulator.responses import json_response
from harvester.emulator.scenario import BentleyScenario
from harvester.emulator.state import EmulatorState
from harvester.emulator.storage import StorageHost

PROVIDER = "bentley"
STORAGE_PREFIX = "/bentley/"
_BLOB_PATH = re.compile(r"^/bentley/(?P<container>[^/]+)/(?P<blob>.+)$")
_log = logging.getLogger(__name__)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status, headers)


def _render_error(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.StreamResponse:
    if status == 429:
        wait = (headers or {}).get("Retry-After")
        after = f" Retry after {wait} seconds." if wait and wait.isdigit() else ""
        return error_response(429, "RateLimitExceeded", f"Rate limit exceeded.{after}", headers)
    code = {
        404: "NotFound",
        405: "MethodNotAllowed",
        503: "ServiceUnavailable",
    }.get(status, "InternalServerError" if status >= 500 else "InvalidRequest")
    return error_response(status, code, message, headers)


def container_blobs(
    model: BentleyModel, scenario: BentleyScenario, container: str
) -> list[BlobEntry] | None:
    """The blobs of an output's container (a reality data id), or None until its job has
    succeeded; each last modified when the job ended."""
    found = model.reality_data(container)
    if found is None:
        return None
    job, output = found
    modified = job.stamp.wall_at(job.stamp.mono + scenario.job_duration_s)
    return [BlobEntry(b.name, b.size, modified) for b in model.blobs(job, output)]


class BentleyApi:
    def __init__(self, state: EmulatorState, storage: StorageHost) -> None:
        self.state = state
        self.scenario = state.scenario.bentley
        self.model = BentleyModel(self.scenario, state.scenario.seed, state.clock)
        signer = SasSigner(ttl_s=self.scenario.sas_ttl_s)
        self.containers = AzureContainers(
            storage, STORAGE_PREFIX, signer, self._list_container, self._corrupt
        )
        self.containers.page_size = self.scenario.list_page_size
        storage.mount_handler(STORAGE_PREFIX, self.containers.handle)
        storage.objects.mount(STORAGE_PREFIX, self._resolve_blob)
        self._read_access_issued = 0
        self._expired_issued = 0
        self._corrupted = 0
        state.add_stats_source(PROVIDER, self._stats)
        state.add_truth_source(PROVIDER, self.model.truth)

    def build_app(self) -> web.Application:
        rl = self.scenario.rate_limit
        middlewares = provider_middlewares(
            PROVIDER, self.state, _render_error, rate_limit=rl, retry_after="seconds"
        )
        app = web.Application(middlewares=[*middlewares, self._auth])
        r = app.router
        jobs = "/reality-analysis/jobs"
        r.add_post(jobs, self._api(self._create))
        r.add_get(jobs, self._api(self._list))
        r.add_get(f"{jobs}/{{job_id}}", self._api(self._get))
        r.add_delete(f"{jobs}/{{job_id}}", self._api(self._cancel))
        r.add_get(f"{jobs}/{{job_id}}/progress", self._api(self._progress))
        r.add_get(f"{jobs}/{{job_id}}/messages", self._api(self._messages))
        r.add_get(
            "/reality-management/reality-data/{rd_id}/readaccess", self._api(self._read_access)
        )
        return app

    def _stats(self) -> dict[str, Any]:
        return {
            "jobs": len(self.model.jobs),
            "jobs_by_state": self.model.count_by_state(),
            "read_access_issued": self._read_access_issued,
            "expired_sas_issued": self._expired_issued,
            "expired_sas_rejected": self.containers.rejected_expired,
            "container_listings": self.containers.listings,
            "corrupted_reads": self._corrupted,
        }

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        reason = check_bearer(self.state, PROVIDER, request, self.scenario.required_scope)
        if reason == "missing":
            return error_response(
                401,
                "HeaderNotFound",
                "Header Authorization was not found in the request. Access denied.",
            )
        if reason is not None:
            return error_response(
                401, "InvalidToken", f"Access denied: {REFUSAL_MESSAGES[reason]}."
            )
        return await handler(request)

    @staticmethod
    def _api(handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except BentleyError as exc:
                return json_response(exc.body(), exc.status)
            except BodyError as exc:
                return error_response(400, "InvalidRealityAnalysisRequest", exc.message)
            except Exception:
                # An emulator bug must still answer in Bentley's envelope, or it would test
                # the client's handling of a body Bentley never sends.
                _log.exception("bentley handler failed: %s %s", request.method, request.path)
                return error_response(500, "InternalServerError", "Internal server error.")

        return wrapped

    # -- handlers -----------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request)
        job = self.model.create(body, self._client_id(request))
        # No idempotency key exists; the job name is the closest thing clients control, so
        # creates are grouped by (iTwin, name) for a test to spot a blindly retried create.
        self.state.record_create(PROVIDER, job.itwin_id, job.name or job.key, new=True)
        return json_response({"job": self.model.render(job)}, 201)

    async def _list(self, request: web.Request) -> web.StreamResponse:
        if not self.scenario.job_listing:
            raise BentleyError(404, "NotFound", "Resource not found.")
        q = request.query
        page, token = self.model.list_jobs(
            q.get("$filter"), q.get("$top"), q.get("continuationToken"), self._client_id(request)
        )
        doc: dict[str, Any] = {"jobs": [self.model.render(j) for j in page]}
        if token is not None:
            query = {k: v for k, v in q.items() if k != "continuationToken"}
            href = request.url.with_query({**query, "continuationToken": token})
            doc["_links"] = {"next": {"href": str(href)}}
        return json_response(doc)

    def _client_id(self, request: web.Request) -> str:
        check = self.state.tokens.check_header(request.headers.get("Authorization"))
        return check.token.client_id if check.token else ""

    async def _get(self, request: web.Request) -> web.StreamResponse:
        return json_response({"job": self.model.render(self._job(request))})

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        job = self._job(request)
        self.model.cancel(job)
        return json_response({"job": self.model.render(job)})

    async def _progress(self, request: web.Request) -> web.StreamResponse:
        job = self._job(request)
        progress = {"percentage": self.model.percentage(job), "state": self.model.state(job)[0]}
        return json_response({"progress": progress})

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        return json_response({"messages": self.model.messages(self._job(request))})

    async def _read_access(self, request: web.Request) -> web.StreamResponse:
        rd_id = request.match_info["rd_id"]
        found = self.model.reality_data(rd_id)
        itwin = request.query.get("iTwinId")
        if found is None or (itwin is not None and itwin != found[0].itwin_id):
            raise BentleyError(
                404, "RealityDataNotFound", "Requested reality data is not available."
            )
        self._read_access_issued += 1
        expired = self._read_access_issued <= self.scenario.expire_first_n
        self._expired_issued += expired
        href = self.containers.container_url(rd_id, expired=expired)
        return json_response({"_links": {"containerUrl": {"href": href}}})

    def _job(self, request: web.Request) -> AnalysisJob:
        return self.model.get(request.match_info["job_id"])

    # -- storage ------------------------------------------------------------------------

    def _list_container(self, container: str) -> list[BlobEntry] | None:
        return container_blobs(self.model, self.scenario, container)

    def _corrupt(self, path: str, body: bytes) -> bytes:
        if not body or self._corrupted >= self.scenario.corrupt_first_n:
            return body
        self._corrupted += 1
        return bytes([body[0] ^ 0xFF]) + body[1:]

    def _resolve_blob(self, path: str) -> ObjectSource | None:
        m = _BLOB_PATH.match(path)
        found = self.model.reality_data(m["container"]) if m else None
        if m is None or found is None:
            return None
        job, output = found
        name = m["blob"]
        if name not in {b.name for b in self.model.blobs(job, output)}:
            return None

        def produce() -> bytes:
            body = self.model.blob_bytes(job, output, name)
            assert body is not None
            return body

        return ObjectSource(produce, content_type(name))
