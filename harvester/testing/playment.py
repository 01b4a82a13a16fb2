"""Playment in memory: its API and its storage host, on a ``MemoryNetwork``.

The state and the result files are the emulator's own (``PlaymentModel``,
``PlaymentResults``), timed by the engine's clock, so a job finishes after ``job_duration_s``
of virtual time and its labels can be checked against the emulator's truth. The HTTP side is
a few lines per route here, answering as the emulator's handlers do (``success`` envelope,
``FS_0001`` for a reference id already taken, attachments redirected to a signed URL).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from harvester.clock import Clock
from harvester.emulator.playment_model import Job, PlaymentError, PlaymentModel
from harvester.emulator.playment_results import PREFIX, PlaymentResults
from harvester.emulator.scenario import PlaymentScenario, ResultVariant, Scenario
from harvester.testing.network import MemoryAnswer, MemoryNetwork, MemoryRequest, serve_bytes

__all__ = ["MemoryPlayment"]

_JOBS = re.compile(r"^/v1/projects/(?P<project>[^/]+)/jobs$")
_JOB = re.compile(r"^/v1/projects/(?P<project>[^/]+)/jobs/(?P<job>[^/]+)$")
_BATCHES = re.compile(r"^/v1/projects/(?P<project>[^/]+)/batch$")
_BATCH = re.compile(r"^/v1/projects/(?P<project>[^/]+)/batch/(?P<batch>[^/]+)$")
_SIGNATURE = "sig"


class _TimedModel(PlaymentModel):
    """The emulator's model, with each job's duration chosen by ``duration_of``."""

    def __init__(
        self,
        scenario: PlaymentScenario,
        seed: int,
        clock: Callable[[], float],
        duration_of: Callable[[str], float] | None,
    ) -> None:
        super().__init__(scenario, seed, clock)
        self._statuses = scenario.statuses
        self._duration_of = duration_of
        self._now = clock

    def status(self, job: Job) -> str:
        if self._duration_of is None:
            return super().status(job)
        duration = self._duration_of(job.reference_id)
        elapsed = self._now() - job.created_at
        if duration <= 0 or elapsed >= duration:
            return self._statuses[-1]
        step = int(elapsed * (len(self._statuses) - 1) / duration)
        return self._statuses[min(step, len(self._statuses) - 2)]


class MemoryPlayment:
    """Playment's API at ``api`` and its result files at ``storage``."""

    def __init__(
        self,
        clock: Clock,
        *,
        api: str = "http://playment.test",
        storage: str = "http://storage.test",
        job_duration_s: float = 10.0,
        duration_of: Callable[[str], float] | None = None,
        statuses: tuple[str, ...] = ("created", "in_progress", "completed"),
        points_per_frame: tuple[int, int] = (50, 80),
        result_variant: ResultVariant = "masks",
        seed: int = 7,
    ) -> None:
        self.api = api.rstrip("/")
        self.storage = storage.rstrip("/")
        self.scenario = Scenario(
            seed=seed,
            playment=PlaymentScenario(
                job_duration_s=job_duration_s,
                statuses=statuses,
                points_per_frame=points_per_frame,
                result_variant=result_variant,
            ),
        )
        self.model = _TimedModel(self.scenario.playment, seed, clock.monotonic, duration_of)
        self.results = PlaymentResults(self.model, self.scenario, self._private_url)
        #: create requests that made a job, by reference id (a duplicate is a bug)
        self.created: dict[str, int] = {}

    def mount(self, network: MemoryNetwork) -> MemoryPlayment:
        network.route(self.api, self.handle_api)
        network.route(self.storage, self.handle_storage)
        return self

    def _private_url(self, path: str) -> str:
        return self.storage + quote(path)

    # -- API ----------------------------------------------------------------------------
    async def handle_api(self, req: MemoryRequest) -> MemoryAnswer:
        if not req.headers.get("x-api-key"):
            return _error(401, "auth-failure", "x-api-key header is missing")
        try:
            return self._route(req)
        except PlaymentError as exc:
            return _error(exc.status, exc.code, exc.message)

    def _route(self, req: MemoryRequest) -> MemoryAnswer:
        path = req.path
        if req.method == "POST" and (m := _JOBS.match(path)):
            return self._create(m["project"], req.json())
        if req.method == "GET" and (m := _JOB.match(path)):
            return _ok(self._job_doc(self.model.get_job(m["project"], m["job"])))
        if req.method == "POST" and (m := _BATCHES.match(path)):
            batch = self.model.create_batch(m["project"], req.json())
            return _ok({"batch_id": batch.batch_id})
        if req.method == "GET" and (m := _BATCH.match(path)):
            jobs, token = self.model.list_batch(
                m["project"], m["batch"], req.query.get("page_token") or None
            )
            listed = [
                {"id": j.job_id, "reference_id": j.reference_id, "status": self.model.status(j)}
                for j in jobs
            ]
            return _ok({"jobs": listed, "next_page_token": token})
        if req.method == "GET" and path == "/v1/attachments":
            return self._attachment(req.query.get("url", ""))
        return _error(404, "GE_0001", f"no route {req.method} {path}")

    def _create(self, project: str, body: Any) -> MemoryAnswer:
        if not isinstance(body, dict):
            raise PlaymentError(400, "GE_0001", "body must be a JSON object")
        job = self.model.create_job(project, self.model.validate_job(project, body))
        self.created[job.reference_id] = self.created.get(job.reference_id, 0) + 1
        return _ok(
            {
                "job_id": job.job_id,
                "reference_id": job.reference_id,
                "work_flow_id": job.work_flow_id,
            }
        )

    def _job_doc(self, job: Job) -> dict[str, Any]:
        return self.model.document(job, lambda j: self._private_url(self.results.result_path(j)))

    def _attachment(self, url: str) -> MemoryAnswer:
        parts = urlsplit(url)
        path = unquote(parts.path)
        if (
            f"{parts.scheme}://{parts.netloc}" != self.storage
            or not path.startswith(PREFIX)
            or self.results.resolve(path) is None
        ):
            raise PlaymentError(404, "FS_0007", "attachment not found or not accessible")
        signed = f"{self.storage}{quote(path)}?{_SIGNATURE}=1"
        return MemoryAnswer.json(
            {"data": {"url": signed}, "success": True}, 302, {"Location": signed}
        )

    # -- storage ------------------------------------------------------------------------
    async def handle_storage(self, req: MemoryRequest) -> MemoryAnswer:
        if _SIGNATURE not in req.query:
            return MemoryAnswer(403, b"not signed")
        source = self.results.resolve(unquote(req.path))
        if source is None:
            return MemoryAnswer(404, b"no such object")
        headers = {"Content-Type": source.content_type}
        return serve_bytes(source.produce(), req.headers.get("range"), headers)

    # -- what tests check ---------------------------------------------------------------
    def job_by_reference(self, project: str, reference_id: str) -> Job | None:
        return self.model.existing(project, reference_id)


def _ok(data: dict[str, Any]) -> MemoryAnswer:
    return MemoryAnswer.json({"data": data, "success": True})


def _error(status: int, code: str, message: str) -> MemoryAnswer:
    return MemoryAnswer.json(
        {"success": False, "error": {"code": code, "message": message}}, status
    )
