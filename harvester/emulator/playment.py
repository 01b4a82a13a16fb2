"""The Playment API, mounted under ``/playment``: documented paths and the SDK's older ones.

Every answer carries a boolean ``success`` (the official SDK reads it on 4xx too), and job
documents carry only the documented keys (the SDK turns them into namedtuples).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import unquote, urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler

from harvester.emulator.bodies import BodyError, read_json_object
from harvester.emulator.middleware import provider_middlewares
from harvester.emulator.playment_model import Job, PlaymentError, PlaymentModel
from harvester.emulator.playment_results import PREFIX, PlaymentResults
from harvester.emulator.responses import json_response
from harvester.emulator.state import EmulatorState
from harvester.emulator.storage import StorageHost

PROVIDER = "playment"
_log = logging.getLogger(__name__)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"success": False, "error": {"code": code, "message": message}}
    return json_response(body, status, headers)


def _render_error(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.StreamResponse:
    code = "GE_0001" if status < 500 and status != 429 else "api_error"
    return error_response(status, code, message, headers)


def _ok(data: dict[str, Any]) -> web.Response:
    return json_response({"data": data, "success": True})


class PlaymentApi:
    def __init__(self, state: EmulatorState, storage: StorageHost) -> None:
        self.state = state
        self.scenario = state.scenario.playment
        self.storage = storage
        self.model = PlaymentModel(self.scenario, state.scenario.seed, state.clock)
        self.results = PlaymentResults(self.model, state.scenario, storage.private_url)
        storage.objects.mount(PREFIX, self.results.resolve)
        state.add_stats_source(PROVIDER, self._stats)

    def build_app(self) -> web.Application:
        middlewares = provider_middlewares(
            PROVIDER, self.state, _render_error, rate_limit=self.scenario.rate_limit
        )
        app = web.Application(middlewares=[*middlewares, self._auth])
        r = app.router
        for path in ("/v1/projects/{project_id}/jobs", "/projectsvc/projects/{project_id}/jobs"):
            r.add_post(path, self._api(self._create_job))
        for v in ("v1", "v0"):
            r.add_get(f"/{v}/projects/{{project_id}}/jobs/{{job_id}}", self._api(self._get_job))
            r.add_get(
                f"/{v}/projects/{{project_id}}/batch/{{batch_id}}", self._api(self._list_batch)
            )
        for path in ("/v1/projects/{project_id}/batch", "/v1/project/{project_id}/batch"):
            r.add_post(path, self._api(self._create_batch))
        r.add_get("/v1/attachments", self._api(self._attachment))
        return app

    def _stats(self) -> dict[str, Any]:
        per_ref = self.model.jobs_per_reference()
        return {
            "jobs": len(self.model.jobs),
            "jobs_by_reference": per_ref,
            "max_jobs_per_reference": max(
                (n for refs in per_ref.values() for n in refs.values()), default=0
            ),
        }

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        key = request.headers.get("x-api-key", "")
        if not key:
            return error_response(401, "auth-failure", "x-api-key header is missing")
        valid = self.scenario.valid_api_keys
        if valid and key not in valid:
            return error_response(401, "unauthorized", "invalid api key")
        self.state.remember_api_key(key)
        return await handler(request)

    @staticmethod
    def _api(handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except PlaymentError as exc:
                return error_response(exc.status, exc.code, exc.message)
            except Exception:
                # An emulator bug must still answer in Playment's envelope, or it would test
                # the client's handling of a body Playment never sends.
                _log.exception("playment handler failed: %s %s", request.method, request.path)
                return error_response(500, "FS_0000", "internal error")

        return wrapped

    # -- handlers -----------------------------------------------------------------------

    async def _create_job(self, request: web.Request) -> web.StreamResponse:
        project_id = request.match_info["project_id"]
        body = await _json_object(request)
        fields = self.model.validate_job(project_id, body)
        ref = fields["reference_id"]
        try:
            job = self.model.create_job(project_id, fields)
        except PlaymentError:
            self.state.record_create(PROVIDER, project_id, ref, new=False)
            raise
        self.state.record_create(PROVIDER, project_id, ref, new=True)
        return _ok(
            {
                "job_id": job.job_id,
                "reference_id": job.reference_id,
                "work_flow_id": job.work_flow_id,
            }
        )

    async def _get_job(self, request: web.Request) -> web.StreamResponse:
        job = self.model.get_job(request.match_info["project_id"], request.match_info["job_id"])
        return _ok(self._job_doc(job))

    def _job_doc(self, job: Job) -> dict[str, Any]:
        return self.model.document(job, lambda j: self.results.url(self.results.result_path(j)))

    async def _create_batch(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        batch = self.model.create_batch(request.match_info["project_id"], body)
        return _ok({"batch_id": batch.batch_id})

    async def _list_batch(self, request: web.Request) -> web.StreamResponse:
        jobs, token = self.model.list_batch(
            request.match_info["project_id"],
            request.match_info["batch_id"],
            request.query.get("page_token") or None,
        )
        listed = [
            {"id": j.job_id, "reference_id": j.reference_id, "status": self.model.status(j)}
            for j in jobs
        ]
        return _ok({"jobs": listed, "next_page_token": token})

    async def _attachment(self, request: web.Request) -> web.StreamResponse:
        url = request.query.get("url", "")
        path = self._storage_path(url)
        if path is None or not self.storage.objects.exists(path):
            raise PlaymentError(404, "FS_0007", "attachment not found or not accessible")
        signed = self.storage.signed_url(path)
        status = self.scenario.attachments_redirect_status
        return json_response(
            {"data": {"url": signed}, "success": True}, status, {"Location": signed}
        )

    def _storage_path(self, url: str) -> str | None:
        """The storage path a URL names, if it points at our storage host. A query (an old
        signature, when a client re-resolves the URL it was redirected to) is ignored."""
        parts = urlsplit(url)
        base = urlsplit(self.storage.base_url)
        if (parts.scheme, parts.netloc) != (base.scheme, base.netloc):
            return None
        path = unquote(parts.path)
        return path if path.startswith(PREFIX) else None


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        return await read_json_object(request)
    except BodyError as exc:
        raise PlaymentError(400, "GE_0001", exc.message) from exc
