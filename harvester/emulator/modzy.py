"""The Modzy API, mounted under ``/modzy``; its documented paths live under ``<base>/api``.

Every call needs ``Authorization: ApiKey <key>``. Errors are
``{"statusCode", "status", "message", "reportErrorUrl"}``. The SDK's construction probes work
as it expects: ``GET <base>/models`` is a 404 (so the SDK appends ``/api``), ``GET
<base>/api/models`` and ``GET <base>/api/models/requirements/account`` answer JSON lists.
``GET /api/results/{id}`` is a 404 for ``results_404_s`` after submission, exactly like an
unknown job: only ``GET /api/jobs/{id}`` tells the two apart, as on the real service. Modzy
documents no rate limiting; a scenario that adds one gets a 429 without Retry-After.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from harvester.emulator.bodies import BodyError, read_json_object
from harvester.emulator.middleware import provider_middlewares
from harvester.emulator.modzy_model import ModzyError, ModzyModel, error_body
from harvester.emulator.responses import json_response
from harvester.emulator.state import EmulatorState

PROVIDER = "modzy"
API_KEY = web.RequestKey("modzy_api_key", str)
REQUIREMENTS = [
    {"requirementId": 1, "gpuUnits": 0, "cpuAmount": "500m", "memoryAmount": "2Gi",
     "status": "ACTIVE"},
    {"requirementId": 2, "gpuUnits": 0, "cpuAmount": "2000m", "memoryAmount": "8Gi",
     "status": "ACTIVE"},
    {"requirementId": 3, "gpuUnits": 1, "cpuAmount": "4000m", "memoryAmount": "16Gi",
     "status": "INACTIVE"},
]  # fmt: skip
_log = logging.getLogger(__name__)


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response(error_body(status, message), status, headers)


def _render_error(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.StreamResponse:
    return error_response(status, message, headers)


class ModzyApi:
    def __init__(self, state: EmulatorState) -> None:
        self.state = state
        self.scenario = state.scenario.modzy
        self.model = ModzyModel(self.scenario, state.scenario.seed, state.clock)
        state.declare_counters(PROVIDER, "results_not_yet")
        state.add_stats_source(PROVIDER, self._stats)
        state.add_truth_source(PROVIDER, self.model.truth)

    def build_app(self) -> web.Application:
        rl = self.scenario.rate_limit
        middlewares = provider_middlewares(
            PROVIDER, self.state, _render_error, rate_limit=rl, retry_after="none"
        )
        app = web.Application(middlewares=[*middlewares, self._auth])
        r = app.router
        r.add_get("/api/models", self._api(self._models))
        r.add_get("/api/models/requirements/account", self._api(self._requirements))
        r.add_post("/api/jobs", self._api(self._create))
        r.add_get("/api/jobs/{job_id}", self._api(self._get))
        r.add_delete("/api/jobs/{job_id}", self._api(self._cancel))
        r.add_get("/api/results/{job_id}", self._api(self._results))
        return app

    def _stats(self) -> dict[str, Any]:
        return {"jobs": len(self.model.jobs), "jobs_by_status": self.model.count_by_status()}

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization", "").strip()
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if not header:
            reason, message = "missing", "Unauthorized: the Authorization header is missing"
        elif scheme != "ApiKey" or not key:
            reason, message = "malformed", "Unauthorized: expected 'Authorization: ApiKey <key>'"
        elif self.scenario.valid_api_keys and key not in self.scenario.valid_api_keys:
            reason, message = "invalid", "Unauthorized: the API key is not valid"
        else:
            self.state.remember_api_key(key)
            request[API_KEY] = key
            return await handler(request)
        self.state.record_auth_refusal(PROVIDER, reason)
        return error_response(401, message)

    @staticmethod
    def _api(handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except ModzyError as exc:
                return json_response(exc.body(), exc.status)
            except BodyError as exc:
                return error_response(400, exc.message)
            except Exception:
                # An emulator bug must still answer in Modzy's envelope, or it would test
                # the client's handling of a body Modzy never sends.
                _log.exception("modzy handler failed: %s %s", request.method, request.path)
                return error_response(500, "Internal server error")

        return wrapped

    # -- handlers -----------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.StreamResponse:
        versions: dict[str, list[str]] = {}
        for model_id, version in self.model.models:
            versions.setdefault(model_id, []).append(version)
        listed = [
            {"modelId": m, "latestVersion": max(vs), "versions": sorted(vs)}
            for m, vs in sorted(versions.items())
        ]
        return json_response(listed)

    async def _requirements(self, request: web.Request) -> web.StreamResponse:
        return json_response(REQUIREMENTS)

    async def _create(self, request: web.Request) -> web.StreamResponse:
        job = self.model.create(await read_json_object(request), request[API_KEY])
        # No idempotency key exists: identical bodies are grouped so a test can spot a
        # blindly retried create.
        self.state.record_create(PROVIDER, job.model_id, job.key, new=True)
        return json_response(self.model.render_created(job))

    async def _get(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.model.render_job(self.model.get(request.match_info["job_id"])))

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        job = self.model.get(request.match_info["job_id"])
        self.model.cancel(job)
        return json_response(self.model.render_job(job))

    async def _results(self, request: web.Request) -> web.StreamResponse:
        job_id = request.match_info["job_id"]
        job = self.model.jobs.get(job_id)
        if job is None or not self.model.results_visible(job):
            if job is not None:
                self.state.count(PROVIDER, "results_not_yet")
            # One body for both cases, as the service gives: "not yet" and "never" look alike.
            raise ModzyError(404, f"The results for job {job_id} were not found")
        return json_response(self.model.render_results(job))
