"""harvester's Cognite requests and the emulator's Cognite answers, checked against Cognite's
own definitions: the segmentation reference (seed 001, parsed here) and cognite-sdk's data
classes (``FileReference``, ``NodeId``: how Cognite's own client names a file).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from cognite.client.data_classes.contextualization import FileReference
from cognite.client.data_classes.data_modeling.ids import NodeId

from harvester.emulator.cognite_model import CogniteModel
from harvester.emulator.scenario import CogniteScenario
from harvester.errors import InvalidPayload
from harvester.jobs import JobState
from harvester.providers.base import RemoteState, Status
from harvester.providers.cognite import STATES
from harvester.wire import Response

from .common import cognite, new_job
from .seeds import cognite_job_example, cognite_statuses, conforms

JOB = new_job("cognite")
#: the three ways Cognite's own client names a file
SDK_REFERENCES = [
    FileReference(file_id=1234),
    FileReference(file_external_id="site-a/photo-1.jpg"),
    FileReference(file_instance_id=NodeId("site-a", "photo-1")),
]


def test_harvesters_status_set_is_the_references_enum() -> None:
    assert set(STATES) == cognite_statuses()


@pytest.mark.parametrize("ref", SDK_REFERENCES, ids=["fileId", "fileExternalId", "fileInstanceId"])
def test_create_bodies_name_files_as_the_sdk_does(ref: FileReference) -> None:
    example = cognite_job_example()
    item = ref.to_api_item()
    payload = {**example["prompt"], "items": [item]}  # the reference's own prompt
    provider = cognite()
    provider.validate_payload(payload)
    body = provider.build_create(JOB, payload).json
    assert body["items"] == [item]
    # The file reference is one of the forms the reference lists for a file...
    assert not conforms(body["items"][0], example["failedItems"][0]["items"][0])
    # ...and the prompt has exactly the reference's fields and types.
    prompt = {k: v for k, v in body.items() if k != "items"}
    assert not conforms(prompt, example["prompt"])
    assert set(prompt) == set(example["prompt"])
    assert [set(p) for p in prompt["points"]] == [set(example["prompt"]["points"][0])]
    assert set(prompt["boundingBox"]) == set(example["prompt"]["boundingBox"])


def test_what_the_sdk_refuses_harvester_refuses_too() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        FileReference(file_id=1, file_external_id="x")
    two = {"fileId": 1, "fileExternalId": "x"}
    with pytest.raises(InvalidPayload, match="exactly one"):
        cognite().validate_payload({**cognite_job_example()["prompt"], "items": [two]})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("fails", [False, True])
@pytest.mark.parametrize("ref", SDK_REFERENCES, ids=["fileId", "fileExternalId", "fileInstanceId"])
def test_every_job_document_the_emulator_serves_is_the_documented_shape(
    fails: bool, ref: FileReference
) -> None:
    clock = Clock()
    scenario = CogniteScenario(job_duration_s=4.0, failure_rate=1.0 if fails else 0.0)
    model = CogniteModel(scenario, seed=5, clock=clock, wall_clock=lambda: 1_730_204_346.0)
    example = cognite_job_example()
    job = model.create("p", {**example["prompt"], "items": [ref.to_api_item()]})
    seen: dict[str, dict[str, Any]] = {}
    for t in (0.0, 1.0, 2.0, 4.0, 9.0):  # Queued, Running, Running, then the end
        clock.now = 100.0 + t
        doc = model.render(job)
        seen[doc["status"]] = doc
        assert not conforms(doc, example), conforms(doc, example)
        assert doc["status"] in cognite_statuses()
    assert set(seen) == {"Queued", "Running", "Failed" if fails else "Completed"}
    last = seen["Failed" if fails else "Completed"]
    if fails:  # failedItems name the file in the form the request used
        (named,) = last["failedItems"][0]["items"]
        assert named.items() >= ref.to_api_item().items()
    else:
        assert last["items"][0]["segments"]


def test_the_create_answer_is_the_documented_shape() -> None:
    # The POST answer of the reference carries the prompt's fields at the top level where the
    # job document (seed 001) nests them under "prompt", and its items are bare file
    # references, in the forms seed 001 lists under failedItems.
    example = cognite_job_example()
    created_example = {k: v for k, v in example.items() if k != "prompt"} | example["prompt"]
    created_example["items"] = example["failedItems"][0]["items"]
    model = CogniteModel(CogniteScenario(), seed=5)
    node = {"space": "site-a", "externalId": "photo-1"}
    job = model.create("p", {**example["prompt"], "items": [{"fileInstanceId": node}]})
    doc = model.render(job, just_created=True)
    assert doc["status"] == "Queued" and doc["items"][0]["fileInstanceId"] == node
    assert not conforms(doc, created_example), conforms(doc, created_example)
    assert "prompt" not in doc and doc["points"] == example["prompt"]["points"]


def test_the_documented_times_reach_the_poll_scheduler() -> None:
    """startTime and statusTime of the reference's sample (epoch milliseconds) become the
    Status's started_at / ended_at (Unix seconds): the scheduler learns the job's duration
    from them instead of from when polls happened to look."""
    example = cognite_job_example()
    provider = cognite()
    job = dataclasses.replace(JOB, remote_id="123", state=JobState.RUNNING)
    for status, started, ended in (
        ("Completed", example["startTime"] / 1000, example["statusTime"] / 1000),
        ("Running", example["startTime"] / 1000, None),
        ("Queued", None, None),  # not started: its startTime would be the create time
    ):
        doc = {**example, "status": status}
        answer = _answer(doc)
        got = provider.parse_poll(answer, job)
        assert isinstance(got, Status)
        assert (got.started_at, got.ended_at) == (started, ended), status
    odd = {**example, "status": "Completed", "startTime": "soon", "statusTime": -5}
    got = provider.parse_poll(_answer(odd), job)
    assert isinstance(got, Status) and got.state == RemoteState.SUCCEEDED
    assert (got.started_at, got.ended_at) == (None, None)  # odd times: no hint, no failure


def _answer(doc: dict[str, Any]) -> Response:
    return Response(
        200, {"Content-Type": "application/json"}, json.dumps(doc).encode(), url="https://x/job"
    )


def test_cognite_jobs_have_no_class_beyond_the_provider() -> None:
    # one endpoint (segment): the provider's duration table is that endpoint's
    job = dataclasses.replace(JOB, remote_id="123", state=JobState.RUNNING)
    got = cognite().parse_poll(_answer(cognite_job_example()), job)
    assert isinstance(got, Status) and cognite().job_class(got) is None
