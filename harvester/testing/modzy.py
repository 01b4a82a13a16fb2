"""Modzy in memory: its jobs and results API on a ``MemoryNetwork``.

The jobs are the emulator's own (``ModzyModel``: statuses, inputs finishing one by one,
per-input failures, results that answer 404 for ``results_404_s`` after the create), timed
by the engine's clock. The HTTP side answers as the emulator's handlers do
(``Authorization: ApiKey <key>``, errors as ``{statusCode, status, message, reportErrorUrl}``).
"""

from __future__ import annotations

import re

from harvester.clock import Clock
from harvester.emulator.modzy_model import ModzyError, ModzyJob, ModzyModel, error_body
from harvester.emulator.scenario import ModzyScenario
from harvester.testing.network import MemoryAnswer, MemoryNetwork, MemoryRequest

__all__ = ["MemoryModzy"]

_JOB = re.compile(r"^/api/(?P<kind>jobs|results)/(?P<job>[^/]+)$")


class MemoryModzy:
    """Modzy's API at ``api``."""

    def __init__(
        self,
        clock: Clock,
        *,
        api: str = "http://modzy.test",
        scenario: ModzyScenario | None = None,
        seed: int = 7,
    ) -> None:
        self.api = api.rstrip("/")
        self.scenario = scenario or ModzyScenario()
        self.model = ModzyModel(self.scenario, seed, clock.monotonic, clock.wall)
        #: create requests that made a job, by the digest of the request (above 1: a duplicate)
        self.created: dict[str, int] = {}
        #: results requests answered 404 because the results were not published yet
        self.results_not_yet = 0

    def mount(self, network: MemoryNetwork) -> MemoryModzy:
        network.route(self.api, self.handle_api)
        return self

    async def handle_api(self, req: MemoryRequest) -> MemoryAnswer:
        scheme, _, key = (req.headers.get("authorization") or "").strip().partition(" ")
        valid = self.scenario.valid_api_keys
        if scheme != "ApiKey" or not key.strip() or (valid and key.strip() not in valid):
            return MemoryAnswer.json(error_body(401, "Unauthorized"), 401)
        try:
            return self._route(req, key.strip())
        except ModzyError as exc:
            return MemoryAnswer.json(exc.body(), exc.status)

    def _route(self, req: MemoryRequest, api_key: str) -> MemoryAnswer:
        if req.method == "POST" and req.path == "/api/jobs":
            body = req.json()
            if not isinstance(body, dict):
                raise ModzyError(400, "the body must be a JSON object")
            job = self.model.create(body, api_key)
            self.created[job.key] = self.created.get(job.key, 0) + 1
            return MemoryAnswer.json(self.model.render_created(job))
        m = _JOB.match(req.path)
        if m is None:
            raise ModzyError(404, f"no route {req.method} {req.path}")
        if m["kind"] == "results" and req.method == "GET":
            return self._results(m["job"])
        job = self.model.get(m["job"])
        if req.method == "DELETE":
            self.model.cancel(job)
        elif req.method != "GET":
            raise ModzyError(405, f"{req.method} is not allowed here")
        return MemoryAnswer.json(self.model.render_job(job))

    def _results(self, job_id: str) -> MemoryAnswer:
        job = self.model.jobs.get(job_id)
        if job is None or not self.model.results_visible(job):
            self.results_not_yet += job is not None
            # One body for both cases, as the service gives: "not yet" and "never" look alike.
            raise ModzyError(404, f"The results for job {job_id} were not found")
        return MemoryAnswer.json(self.model.render_results(job))

    # -- what tests check ---------------------------------------------------------------
    def job(self, job_id: str) -> ModzyJob:
        return self.model.get(job_id)
