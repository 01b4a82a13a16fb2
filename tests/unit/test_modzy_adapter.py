"""The Modzy adapter on recorded bodies (written from PROVIDERS.md): no network."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
import pytest

from harvester.config import ModzyConfig, SecretRef
from harvester.errors import (
    CredentialsError,
    HarvesterError,
    InvalidPayload,
    NotYetAvailable,
    ProtocolError,
    ProviderJobFailed,
    ProviderUnavailable,
    RateLimited,
    RetryableError,
)
from harvester.jobs import Job
from harvester.providers.base import Accepted, RemoteState, Status
from harvester.providers.modzy import RESULTS_RETRY_S, ModzyProvider
from harvester.wire import RequestSpec, Response
from tests.unit.adapters import FakeClient, RecordingIO, answer, make_job

T = TypeVar("T")
BASE = "https://app.modzy.example"
CFG = ModzyConfig(name="modzy", base_url=BASE + "/", api_key=SecretRef("k", env="X"))
PAYLOAD: dict[str, Any] = {
    "model": {"identifier": "ed542963de", "version": "1.0.1"},
    "explain": False,
    "input": {
        "type": "text",
        "sources": {"first": {"input.txt": "Modzy is great"}, "second": {"input.txt": "meh"}},
    },
}
JOB_DOC: dict[str, Any] = {
    "jobIdentifier": "5b2f-77",
    "status": "COMPLETED",
    "total": 2,
    "pending": 0,
    "completed": 2,
    "failed": 0,
    "model": {"identifier": "ed542963de", "version": "1.0.1", "name": "Sentiment"},
}
RESULTS: dict[str, Any] = {
    "jobIdentifier": "5b2f-77",
    "total": 2,
    "completed": 2,
    "failed": 0,
    "finished": True,
    "results": {
        "first": {
            "status": "SUCCESSFUL",
            "engine": "model-batch-ed542963de-1-0-1-6d4c",
            "startTime": "2024-01-01T00:00:00.000+0000",
            "updateTime": "2024-01-01T00:00:01.000+0000",
            "endTime": "2024-01-01T00:00:01.000+0000",
            "elapsedTime": 1000,
            "results.json": {"data": {"result": {"classPredictions": [{"class": "pos"}]}}},
            "voting": {"up": 0, "down": 0},
        }
    },
    "failures": {},
}


def job(**kw: Any) -> Job:
    return make_job("modzy", "txt-1", "5b2f-77", **kw)


def resp(status: int, body: Any) -> Response:
    return answer(status, body, url=f"{BASE}/api/jobs", request_id="rid-m")


def err(status_code: int, status: str, message: str) -> dict[str, Any]:
    return {
        "statusCode": status_code,
        "status": status,
        "message": message,
        "reportErrorUrl": "https://github.com/modzy/sdk-python/issues/new",
    }


@pytest.fixture
def p() -> ModzyProvider:
    return ModzyProvider(CFG)


# -- requests ---------------------------------------------------------------------------
def test_requests(p: ModzyProvider) -> None:
    create = p.build_create(job(remote_id=None), PAYLOAD)
    assert (create.method, create.url, create.json) == ("POST", f"{BASE}/api/jobs", PAYLOAD)
    assert create.idempotent is False
    poll = p.build_poll(job())
    assert (poll.method, poll.url, poll.idempotent) == ("GET", f"{BASE}/api/jobs/5b2f-77", True)
    results = p.build_results(job())
    assert (results.method, results.url) == ("GET", f"{BASE}/api/results/5b2f-77")
    assert p.build_find(job(), None) is None and p.setup_spec() is None and p.ladder() is None


def test_create_answer(p: ModzyProvider) -> None:
    body = {"jobIdentifier": "5b2f-77", "status": "SUBMITTED", "totalInputs": 2}
    assert p.parse_create(resp(200, body), job()) == Accepted("5b2f-77")


@pytest.mark.parametrize("body", [{"status": "SUBMITTED"}, {"jobIdentifier": 7}, b"oops", [1]])
def test_malformed_create_answers(p: ModzyProvider, body: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        p.parse_create(resp(200, body), job())
    assert "modzy" in str(info.value) and "rid-m" in str(info.value)


# -- error envelopes ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "body", "exc"),
    [
        (400, err(400, "BAD_REQUEST", "The model version does not exist"), InvalidPayload),
        (401, err(401, "UNAUTHORIZED", "Invalid API key"), CredentialsError),
        (403, err(403, "FORBIDDEN", "No access to this model"), CredentialsError),
        (422, err(422, "UNPROCESSABLE_ENTITY", "sources is empty"), InvalidPayload),
        (429, err(429, "TOO_MANY_REQUESTS", "slow down"), RateLimited),
        (500, err(500, "INTERNAL_SERVER_ERROR", "boom"), ProviderUnavailable),
        (405, err(405, "METHOD_NOT_ALLOWED", "no"), ProtocolError),
    ],
)
def test_error_envelopes_are_typed(p: ModzyProvider, status: int, body: Any, exc: type) -> None:
    for parse in (p.parse_create, p.parse_poll, p.parse_results):
        with pytest.raises(exc) as info:
            parse(resp(status, body), job())
        error = info.value
        assert isinstance(error, HarvesterError)
        assert error.code == body["status"] and error.request_id == "rid-m"
        text = str(error)
        assert body["message"] in text and f"code {body['status']}" in text and "rid-m" in text


def test_404_depends_on_the_request(p: ModzyProvider) -> None:
    body = err(404, "NOT_FOUND", "not found")
    with pytest.raises(InvalidPayload):
        p.parse_create(resp(404, body), job())
    with pytest.raises(ProviderJobFailed):
        p.parse_poll(resp(404, body), job())
    with pytest.raises(NotYetAvailable) as info:
        p.parse_results(resp(404, body), job())
    assert isinstance(info.value, RetryableError) and info.value.retry_after == p.results_retry_s


@pytest.mark.parametrize("body", [b"", b"<html>", {"error": "x"}, [1], {"statusCode": 401}])
def test_odd_error_bodies_still_typed_by_status(p: ModzyProvider, body: Any) -> None:
    with pytest.raises(CredentialsError):
        p.parse_poll(resp(401, body), job())


# -- status mapping ------------------------------------------------------------------------
# One case per status of Modzy's jobs reference ("Submitted", "In Progress", then "Completed"
# or "Error", or "Canceled"; the SDK adds TIMEDOUT), then undocumented ones.
@pytest.mark.parametrize(
    ("raw", "state", "known"),
    [
        ("SUBMITTED", RemoteState.RUNNING, True),
        ("IN_PROGRESS", RemoteState.RUNNING, True),
        ("COMPLETED", RemoteState.SUCCEEDED, True),
        ("CANCELED", RemoteState.CANCELLED, True),
        ("TIMEDOUT", RemoteState.FAILED, True),
        ("ERROR", RemoteState.FAILED, True),
        ("FAILED", RemoteState.RUNNING, False),  # not a Modzy job status
        ("OPEN", RemoteState.RUNNING, False),
        ("completed", RemoteState.RUNNING, False),  # statuses are exact upper case
    ],
)
def test_status_mapping(p: ModzyProvider, raw: str, state: RemoteState, known: bool) -> None:
    status = p.parse_poll(resp(200, {**JOB_DOC, "status": raw}), job())
    assert isinstance(status, Status) and (status.state, status.raw) == (state, raw)
    assert status.known is known
    if state in (RemoteState.FAILED, RemoteState.CANCELLED):
        assert status.reason and raw in status.reason


def test_progress_from_counts(p: ModzyProvider) -> None:
    body = {**JOB_DOC, "status": "IN_PROGRESS", "total": 4, "completed": 1, "failed": 1}
    status = p.parse_poll(resp(200, body), job())
    assert isinstance(status, Status) and status.progress == 50.0
    for odd in ({"total": 0}, {"total": "4"}, {"completed": None}, {"total": True}):
        status = p.parse_poll(resp(200, {**body, **odd}), job())
        assert isinstance(status, Status) and status.progress is None
    huge = p.parse_poll(resp(200, {**body, "total": 1, "completed": 10**18}), job())
    assert isinstance(huge, Status) and huge.progress == 100.0
    failed = p.parse_poll(resp(200, {**body, "status": "ERROR", "failed": 4}), job())
    assert (
        isinstance(failed, Status)
        and failed.reason == "Modzy reports the job ERROR (4 of 4 inputs failed)"
    )


@pytest.mark.parametrize("body", [{"jobIdentifier": "x"}, {"status": 5}, b"{]", b"[]"])
def test_malformed_poll_answers(p: ModzyProvider, body: Any) -> None:
    with pytest.raises(ProtocolError):
        p.parse_poll(resp(200, body), job())


@pytest.mark.anyio
async def test_poll_through_a_client(p: ModzyProvider) -> None:
    client = FakeClient(lambda spec: resp(200, JOB_DOC))
    status = await p.poll(job(), client)
    assert isinstance(status, Status) and status.state == RemoteState.SUCCEEDED
    assert len(client.specs) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("raw", ["ERROR", "TIMEDOUT"])
async def test_a_failed_job_carries_its_failures_messages(p: ModzyProvider, raw: str) -> None:
    doc = {**JOB_DOC, "status": raw, "completed": 0, "failed": 2}
    failures = {
        "first": {"status": "FAILED", "error": "Model container exited with code 137"},
        "second": {"status": "FAILED", "error": "Input could not be fetched"},
    }
    answers = {
        f"{BASE}/api/jobs/5b2f-77": resp(200, doc),
        f"{BASE}/api/results/5b2f-77": resp(200, {**RESULTS, "results": {}, "failures": failures}),
    }
    client = FakeClient(lambda spec: answers[spec.url])
    status = await p.poll(job(), client)
    assert isinstance(status, Status) and status.state == RemoteState.FAILED and status.known
    assert status.reason == (
        f"Modzy reports the job {raw} (2 of 2 inputs failed): "
        "first: Model container exited with code 137; second: Input could not be fetched"
    )
    assert [s.endpoint for s in client.specs] == ["poll", "results"]


@pytest.mark.anyio
@pytest.mark.parametrize("answer", [resp(404, err(404, "NOT_FOUND", "no")), resp(200, [1])])
async def test_a_failed_job_without_readable_failures_still_ends(
    p: ModzyProvider, answer: Response
) -> None:
    doc = {**JOB_DOC, "status": "ERROR", "completed": 0, "failed": 2}
    client = FakeClient(lambda spec: resp(200, doc) if spec.endpoint == "poll" else answer)
    status = await p.poll(job(), client)
    assert isinstance(status, Status) and status.state == RemoteState.FAILED
    assert status.reason == "Modzy reports the job ERROR (2 of 2 inputs failed)"


# -- payload validation --------------------------------------------------------------------
def test_valid_payload(p: ModzyProvider) -> None:
    p.validate_payload(PAYLOAD)


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ("x", "JSON object"),
        ({**PAYLOAD, "model": None}, "payload.model must be"),
        ({**PAYLOAD, "model": {"identifier": "a"}}, "model.version"),
        ({**PAYLOAD, "model": {"identifier": 3, "version": "1"}}, "model.identifier"),
        ({**PAYLOAD, "input": []}, "payload.input must be"),
        ({**PAYLOAD, "input": {"sources": {"a": {"b": 1}}}}, "input.type"),
        ({**PAYLOAD, "input": {"type": "text", "sources": {}}}, "sources must be a non-empty"),
        ({**PAYLOAD, "input": {"type": "text", "sources": ["a"]}}, "sources must be a non-empty"),
        ({**PAYLOAD, "input": {"type": "text", "sources": {"a": "b"}}}, r"sources\['a'\]"),
        ({**PAYLOAD, "input": {"type": "text", "sources": {"a": {}}}}, r"sources\['a'\]"),
        ({**PAYLOAD, "explain": "yes"}, "explain"),
    ],
)
def test_invalid_payloads(p: ModzyProvider, payload: Any, words: str) -> None:
    with pytest.raises(InvalidPayload, match=words):
        p.validate_payload(payload)


# -- harvest -------------------------------------------------------------------------------
class FakeIO(RecordingIO):
    """Modzy's results come from its API: every request gets ``answer``."""

    provider = "Modzy"

    def __init__(self, answer: Response) -> None:
        super().__init__()
        self.answer = answer
        self.specs: list[RequestSpec] = []

    async def request(self, spec: RequestSpec) -> Response:
        self.specs.append(spec)
        return self.answer


def completed() -> Status:
    return Status(RemoteState.SUCCEEDED, "COMPLETED", progress=100.0, document=JOB_DOC)


@pytest.mark.anyio
async def test_harvest_writes_job_and_results_as_served(p: ModzyProvider) -> None:
    raw = orjson.dumps(RESULTS, option=orjson.OPT_INDENT_2)
    io = FakeIO(resp(200, raw))
    await p.harvest(job(), completed(), io)
    assert [s.url for s in io.specs] == [f"{BASE}/api/results/5b2f-77"]
    assert set(io.files) == {"job.json", "results.json"}
    assert io.files["results.json"] == raw  # byte for byte
    assert orjson.loads(io.files["job.json"]) == JOB_DOC


@pytest.mark.anyio
async def test_partly_failed_results_are_kept_with_their_failures(p: ModzyProvider) -> None:
    failures = {"second": {"status": "FAILED", "error": "input.txt is empty"}}
    body = {**RESULTS, "failed": 1, "failures": failures}
    io = FakeIO(resp(200, body))
    await p.harvest(job(), completed(), io)
    assert set(io.files) == {"job.json", "results.json", "failures.json"}
    assert orjson.loads(io.files["failures.json"]) == failures


@pytest.mark.anyio
async def test_all_failed_is_a_failed_job(p: ModzyProvider) -> None:
    failures = {
        "first": {"status": "FAILED", "error": "model crashed"},
        "second": {"status": "FAILED", "error": "model crashed"},
        "third": {"status": "FAILED", "error": {"message": "timeout"}},
    }
    body = {**RESULTS, "completed": 0, "failed": 3, "results": {}, "failures": failures}
    io = FakeIO(resp(200, body))
    with pytest.raises(ProviderJobFailed) as info:
        await p.harvest(job(), completed(), io)
    text = str(info.value)
    assert "first: model crashed" in text and "third: timeout" in text
    assert "3 inputs in all" in text and "rid-m" in text
    assert "failures.json" in io.files


@pytest.mark.parametrize(
    "answer",
    [
        resp(404, err(404, "NOT_FOUND", "Results not found")),
        resp(404, b""),
        resp(200, {**RESULTS, "finished": False}),
    ],
)
@pytest.mark.anyio
async def test_results_not_there_yet_are_retried_later(p: ModzyProvider, answer: Response) -> None:
    io = FakeIO(answer)
    with pytest.raises(NotYetAvailable) as info:
        await p.harvest(job(), completed(), io)
    # asked again at the poll cadence, at most RESULTS_RETRY_S apart
    assert info.value.retry_after == min(RESULTS_RETRY_S, p.cfg.poll_min_s)
    assert io.files == {}


@pytest.mark.parametrize(
    "body",
    [
        {**RESULTS, "finished": "yes"},
        {k: v for k, v in RESULTS.items() if k != "finished"},
        {**RESULTS, "results": []},
        {**RESULTS, "failures": "none"},
        b"<html>",
    ],
)
@pytest.mark.anyio
async def test_malformed_results(p: ModzyProvider, body: Any) -> None:
    with pytest.raises(ProtocolError):
        await p.harvest(job(), completed(), FakeIO(resp(200, body)))
