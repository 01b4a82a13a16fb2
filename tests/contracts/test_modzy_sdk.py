"""modzy-sdk, unmodified, against ``harvester emulator``; and harvester's own requests and
parsing held against what that SDK sends and receives.

The scenario makes jobs finish at once (``job_duration_s = 0``, no results 404 window), so the
SDK's own blocking helpers return on their first poll: nothing here waits on a clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
from modzy import ApiClient
from modzy.error import ResultsError
from multidict import CIMultiDict

from harvester.providers.base import RemoteState, Status
from harvester.providers.modzy import ModzyProvider, failure_reason
from harvester.wire import Response

from .common import WAIT_S, emulator, introspect, modzy, new_job

API_KEY = "sdkaccess.sdk-secret"
MODEL, VERSION = "ed542963de", "1.0.1"
SOURCES = {"review-1": {"input.txt": "Modzy is great!"}, "review-2": {"input.txt": "meh"}}
FAST = "seed = 4\n[modzy]\njob_duration_s = 0\nresults_404_s = 0\n"


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with emulator(tmp_path_factory.mktemp("modzy"), FAST) as found:
        yield found


@pytest.fixture(scope="module")
def failing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with emulator(tmp_path_factory.mktemp("modzy-err"), FAST + "failure_rate = 1.0\n") as found:
        yield found


class Recorder:
    """What the SDK sent, seen through requests' public response hooks (the SDK untouched)."""

    def __init__(self, client: ApiClient) -> None:
        self.bodies: list[tuple[str, str, Any]] = []
        client.http.session.hooks["response"].append(self.hook)

    def hook(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        request = response.request
        body = json.loads(request.body) if request.body else None
        self.bodies.append((str(request.method), str(request.url), body))


def client_for(urls: dict[str, str]) -> ApiClient:
    # The SDK probes <base>/models, then <base>/api/models and the account's requirements.
    return ApiClient(base_url=urls["modzy"], api_key=API_KEY)


def provider(urls: dict[str, str]) -> ModzyProvider:
    return modzy(urls["modzy"])


def as_response(doc: Any) -> Response:
    return Response(200, CIMultiDict(), orjson.dumps(dict(doc)), "sdk", None)


def test_the_sdk_submits_waits_and_reads_results(urls: dict[str, str]) -> None:
    client = client_for(urls)
    assert client.base_url.rstrip("/").endswith("/api")
    seen = Recorder(client)
    job = client.jobs.submit_text(MODEL, VERSION, SOURCES)
    assert job.status == "SUBMITTED" and job.job_identifier
    job.block_until_complete(timeout=WAIT_S, poll_interval=0.05)
    assert job.status == "COMPLETED"
    result = client.results.block_until_complete(job, timeout=WAIT_S, poll_interval=0.05)
    assert result.finished and result.total == 2 and result.completed == 2
    for item in SOURCES:
        output = result.get_source_outputs(item)["results.json"]
        assert output["data"]["result"]["classPredictions"]
    truth = introspect(urls, f"/truth/modzy/{job.job_identifier}")
    assert {k: v["results.json"] for k, v in result.results.items()} == truth["results"]

    # harvester sends, for the same job, exactly the body the SDK sent...
    (sdk_body,) = [body for method, url, body in seen.bodies if method == "POST"]
    payload = {"model": {"identifier": MODEL, "version": VERSION}, "explain": False,
               "input": {"type": "text", "sources": SOURCES}}  # fmt: skip
    ours = provider(urls)
    ours.validate_payload(payload)
    assert ours.build_create(new_job("modzy"), payload).json == sdk_body
    # ...and reads the documents the SDK was served as the SDK did.
    status = ours.parse_poll(as_response(client.jobs.get(job)), new_job("modzy"))
    assert isinstance(status, Status) and status.state == RemoteState.SUCCEEDED and status.known
    served = ours.parse_results(as_response(result), new_job("modzy"))
    assert served["results"] == result.results


def test_an_error_job_as_the_sdk_sees_it(failing: dict[str, str]) -> None:
    client = client_for(failing)
    job = client.jobs.submit_text(MODEL, VERSION, SOURCES)
    job.block_until_complete(timeout=WAIT_S, poll_interval=0.05)
    assert job.status == "ERROR"  # ends the SDK's wait: not SUBMITTED/IN_PROGRESS
    result = client.results.block_until_complete(job, timeout=WAIT_S, poll_interval=0.05)
    assert result.finished and result.failed == 2 and not result.results
    messages = []
    for item in SOURCES:
        with pytest.raises(ResultsError) as info:  # the SDK reads failures.<item>.error
            result.get_source_outputs(item)
        messages.append(info.value.message)
    ours = provider(failing)
    status = ours.parse_poll(as_response(client.jobs.get(job)), new_job("modzy"))
    assert isinstance(status, Status) and status.state == RemoteState.FAILED and status.known
    failures = ours.parse_failures(as_response(result), new_job("modzy"))
    assert set(failures) == set(SOURCES)
    # the reason harvester gives names every distinct message the SDK shows
    reason = failure_reason(failures)
    assert messages and all(message in reason for message in messages)


def test_the_sdk_cancels(tmp_path: Path) -> None:
    slow = "seed = 4\n[modzy]\njob_duration_s = 600\nresults_404_s = 0\n"
    with emulator(tmp_path, slow) as found:
        client = client_for(found)
        job = client.jobs.submit_text(MODEL, VERSION, SOURCES)
        job.cancel()
        assert job.status == "CANCELED"
        status = provider(found).parse_poll(as_response(client.jobs.get(job)), new_job("modzy"))
        assert isinstance(status, Status) and status.state == RemoteState.CANCELLED
