"""Bentley in memory: Reality Analysis, readaccess, its token endpoint and its output
containers, on a ``MemoryNetwork``.

The jobs are the emulator's own (``BentleyModel``: v2 schema checks, states, progress
percentage, ``$filter`` listings, output blobs), timed by the engine's clock, so a job runs
``job_duration_s`` of virtual time (Queued for its first fifth, then Active with its
percentage moving in ``progress_step`` steps) and its outputs can be checked against the
emulator's truth. The HTTP side answers as the emulator's handlers do (``{"job": ...}``,
``{"error": {...}}``, a bearer token with the ``itwin-platform`` scope on every call, each
output a SAS-signed Azure container on the storage host).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from harvester.clock import Clock
from harvester.emulator.azure import BlobEntry
from harvester.emulator.bentley import container_blobs
from harvester.emulator.bentley_model import AnalysisJob, BentleyError, BentleyModel
from harvester.emulator.scenario import BentleyScenario
from harvester.testing.azure import MemoryContainers
from harvester.testing.network import MemoryAnswer, MemoryNetwork, MemoryRequest
from harvester.testing.oauth import MemoryTokens

__all__ = ["MemoryBentley", "Observed"]

_JOBS = "/reality-analysis/jobs"
_JOB = re.compile(r"^/reality-analysis/jobs/(?P<job>[^/]+)(?P<tail>/progress|/messages)?$")
_READACCESS = re.compile(r"^/reality-management/reality-data/(?P<rd>[^/]+)/readaccess$")
SCOPE = "itwin-platform"


@dataclass(frozen=True, slots=True)
class Observed:
    """What one ``GET /jobs/{id}`` showed: when, and the job's state and percentage then."""

    at: float
    job_id: str
    state: str
    percentage: int


class MemoryBentley:
    """Bentley's API at ``api``, tokens at ``tokens.url``, output containers at ``storage``."""

    def __init__(
        self,
        clock: Clock,
        *,
        api: str = "http://bentley.test",
        storage: str = "http://blobs.test",
        login: str = "http://login.test",
        client_id: str = "engine-client",
        client_secret: str = "engine-secret",
        scenario: BentleyScenario | None = None,
        seed: int = 7,
    ) -> None:
        self.api = api.rstrip("/")
        self.scenario = scenario or BentleyScenario()
        self.model = BentleyModel(self.scenario, seed, clock.monotonic, clock.wall)
        self.tokens = MemoryTokens(clock, {client_id: client_secret}, origin=login)
        self.containers = MemoryContainers(
            clock,
            storage,
            self._list_container,
            self._read_blob,
            sas_ttl_s=self.scenario.sas_ttl_s,
            page_size=self.scenario.list_page_size,
        )
        self._clock = clock
        #: create requests that made a job, by job name (a count above 1 is a duplicate)
        self.created: dict[str, int] = {}
        #: every job GET answered, in order
        self.observed: list[Observed] = []

    def mount(self, network: MemoryNetwork) -> MemoryBentley:
        network.route(self.api, self.handle_api)
        network.route(self.containers.origin, self.containers.handle)
        self.tokens.mount(network)
        return self

    # -- API ----------------------------------------------------------------------------
    async def handle_api(self, req: MemoryRequest) -> MemoryAnswer:
        check = self.tokens.check(req.headers.get("authorization"), SCOPE)
        if check is None or check.token is None:
            return _error(401, "InvalidToken", "Access denied.")
        try:
            return self._route(req, check.token.client_id)
        except BentleyError as exc:
            return MemoryAnswer.json(exc.body(), exc.status)

    def _route(self, req: MemoryRequest, client_id: str) -> MemoryAnswer:
        if req.path == _JOBS and req.method == "POST":
            body = req.json()
            if not isinstance(body, dict):
                raise BentleyError(400, "InvalidRealityAnalysisRequest", "not a JSON object")
            job = self.model.create(body, client_id)
            name = job.name or job.key
            self.created[name] = self.created.get(name, 0) + 1
            return MemoryAnswer.json({"job": self.model.render(job)}, 201)
        if req.path == _JOBS and req.method == "GET":
            return self._list(req, client_id)
        if m := _JOB.match(req.path):
            job = self.model.get(m["job"])
            if req.method == "DELETE" and not m["tail"]:
                self.model.cancel(job)
                return MemoryAnswer.json({"job": self.model.render(job)})
            if req.method == "GET":
                return self._job_part(job, m["tail"])
        if req.method == "GET" and (m := _READACCESS.match(req.path)):
            found = self.model.reality_data(m["rd"])
            if found is None:
                raise BentleyError(
                    404, "RealityDataNotFound", "Requested reality data is not available."
                )
            href = self.containers.container_url(m["rd"])
            return MemoryAnswer.json({"_links": {"containerUrl": {"href": href}}})
        return _error(404, "NotFound", f"no route {req.method} {req.path}")

    def _job_part(self, job: AnalysisJob, tail: str | None) -> MemoryAnswer:
        if tail == "/progress":
            progress = {"percentage": self.model.percentage(job), "state": self.model.state(job)[0]}
            return MemoryAnswer.json({"progress": progress})
        if tail == "/messages":
            return MemoryAnswer.json({"messages": self.model.messages(job)})
        state = self.model.state(job)[0]
        self.observed.append(
            Observed(self._clock.monotonic(), job.id, state, self.model.percentage(job))
        )
        return MemoryAnswer.json({"job": self.model.render(job)})

    def _list(self, req: MemoryRequest, client_id: str) -> MemoryAnswer:
        q = req.query
        page, token = self.model.list_jobs(
            q.get("$filter"), q.get("$top"), q.get("continuationToken"), client_id
        )
        doc: dict[str, Any] = {"jobs": [self.model.render(j) for j in page]}
        if token is not None:
            query = urlencode(
                {
                    **{k: v for k, v in q.items() if k != "continuationToken"},
                    "continuationToken": token,
                }
            )
            doc["_links"] = {"next": {"href": f"{self.api}{_JOBS}?{query}"}}
        return MemoryAnswer.json(doc)

    # -- storage ------------------------------------------------------------------------
    def _list_container(self, container: str) -> list[BlobEntry] | None:
        return container_blobs(self.model, self.scenario, container)

    def _read_blob(self, container: str, name: str) -> bytes | None:
        found = self.model.reality_data(container)
        return None if found is None else self.model.blob_bytes(found[0], found[1], name)

    # -- what tests check ---------------------------------------------------------------
    def job_named(self, name: str) -> AnalysisJob | None:
        return next((j for j in self.model.jobs.values() if j.name == name), None)


def _error(status: int, code: str, message: str) -> MemoryAnswer:
    return MemoryAnswer.json({"error": {"code": code, "message": message}}, status)
