"""harvester's Modzy requests and the emulator's Modzy answers, checked against Modzy's own
definitions: the SDK's results reference (seed 003, parsed here), the SDK's ``Result`` object
(how Modzy's client reads a results document) and the job/result messages modzy-sdk publishes
as protocol buffers (``modzy.edge.proto``: the same JSON documents, field names and types).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from modzy.edge.proto.jobs.v1 import jobs_pb2
from modzy.edge.proto.results.v1 import results_pb2
from modzy.jobs import Jobs
from modzy.results import Result

from harvester.emulator.modzy_model import ModzyModel
from harvester.emulator.scenario import ModzyScenario
from harvester.providers.base import Status
from harvester.providers.modzy import STATES
from harvester.wire import Response

from .common import modzy, new_job
from .seeds import ANY_ITEM, ANY_OUTPUT, is_type, modzy_results_structure

JOB = new_job("modzy")
MODEL = {"identifier": "ed542963de", "version": "1.0.1"}
PAYLOADS: list[dict[str, Any]] = [
    {"model": MODEL, "input": {"type": "text", "sources": {"r-1": {"input.txt": "good"}}}},
    {
        "model": MODEL,
        "explain": True,
        "input": {"type": "embedded", "sources": {"img": {"image": "data:image/png;base64,AA=="}}},
    },
    {
        "model": MODEL,
        "input": {
            "type": "aws-s3",
            "accessKeyID": "AKIA...",
            "secretAccessKey": "...",
            "region": "us-east-1",
            "sources": {"s-1": {"input": {"bucket": "b", "key": "/k.txt"}}},
        },
    },
]
#: the jobs reference: "Once finished, the status is set as Completed or Error"; the SDK's
#: ``Jobs.status`` names the others
DOCUMENTED_STATUSES = {*vars(Jobs.status).values(), "ERROR"}


def strictly(doc: Any, message: Message) -> Message:
    """Parse as the published message, refusing any field it does not define."""
    return json_format.ParseDict(doc, message, ignore_unknown_fields=False)


def typed(doc: Any, message: Message) -> Message:
    """Parse as the published message: every field it defines has its type (others pass)."""
    return json_format.ParseDict(doc, message, ignore_unknown_fields=True)


def test_harvesters_status_set_is_the_documented_one() -> None:
    assert set(STATES) == DOCUMENTED_STATUSES


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: p["input"]["type"])
def test_create_bodies_are_job_submissions(payload: dict[str, Any]) -> None:
    provider = modzy()
    provider.validate_payload(payload)
    body = provider.build_create(JOB, payload).json
    parsed = strictly(body, jobs_pb2.JobSubmission())
    assert json_format.MessageToDict(parsed)["model"] == MODEL


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def scenario(outcome: str) -> ModzyScenario:
    return ModzyScenario(
        job_duration_s=4.0,
        results_404_s=0.0,
        failure_rate=1.0 if outcome == "ERROR" else 0.0,
        timeout_rate=1.0 if outcome == "TIMEDOUT" else 0.0,
        item_failure_rate=0.5 if outcome == "COMPLETED" else 0.0,
    )


def check_results(doc: dict[str, Any]) -> None:
    """The results document against seed 003, read the way the SDK reads it."""
    result = Result(copy.deepcopy(doc))
    structure = modzy_results_structure()
    for name, kind in structure.items():
        value = getattr(result, name)  # the SDK's snake_case access, as the seed names it
        if name == "results":
            for item in value.values():
                check_item(Result(item), kind[ANY_ITEM])
        elif isinstance(kind, dict):
            for sub, sub_kind in kind.items():
                assert is_type(getattr(Result(value), sub), sub_kind), (name, sub)
        else:
            assert is_type(value, kind), (name, value, kind)
    typed({k: v for k, v in doc.items() if k != "failures"}, results_pb2.Results())
    for item, failure in (doc.get("failures") or {}).items():
        # where the SDK finds a failed input's message (Result.get_source_outputs)
        assert isinstance(Result(failure).error, str) and failure["error"], item


def check_item(item: Result, structure: dict[str, Any]) -> None:
    for name, kind in structure.items():
        if name == ANY_OUTPUT:
            continue
        value = getattr(item, name)
        if isinstance(kind, dict):
            for sub, sub_kind in kind.items():
                assert is_type(value[sub], sub_kind), (name, sub)
        else:
            assert is_type(value, kind), (name, value, kind)


@pytest.mark.parametrize("outcome", ["COMPLETED", "ERROR", "TIMEDOUT", "CANCELED"])
def test_every_document_the_emulator_serves_is_the_documented_shape(outcome: str) -> None:
    clock = Clock()
    model = ModzyModel(scenario(outcome), seed=3, clock=clock, wall_clock=lambda: 1.7e9)
    sources = {f"item-{i}": {"input.txt": f"text {i}"} for i in range(6)}
    job = model.create({"model": MODEL, "input": {"type": "text", "sources": sources}}, "ak.s")
    created = model.render_created(job)
    typed(created, jobs_pb2.JobSubmissionReceipt())
    assert created["status"] in DOCUMENTED_STATUSES
    seen = set()
    for t in (0.0, 2.0, 3.0, 9.0):
        clock.now = 50.0 + t
        if outcome == "CANCELED" and t == 2.0:
            model.cancel(job)
        doc = model.render_job(job)
        typed(doc, jobs_pb2.JobDetails())
        assert doc["status"] in DOCUMENTED_STATUSES
        seen.add(doc["status"])
        check_results(model.render_results(job))
    assert outcome in seen


def test_a_jobs_class_is_its_model_and_version_as_the_sdks_job_details_give_them() -> None:
    # the poll scheduler learns durations per model version (issue 18); the document is
    # Modzy's own JobDetails message as JSON
    details = jobs_pb2.JobDetails(job_identifier="j-1", status="IN_PROGRESS")
    details.model.identifier, details.model.version = MODEL["identifier"], MODEL["version"]
    doc = json_format.MessageToDict(details)
    p = modzy()
    status = p.parse_poll(Response(200, {}, json.dumps(doc).encode(), "u"), JOB)
    assert isinstance(status, Status)
    assert p.job_class(status) == "ed542963de@1.0.1"
    del doc["model"]["version"]
    status = p.parse_poll(Response(200, {}, json.dumps(doc).encode(), "u"), JOB)
    assert isinstance(status, Status) and p.job_class(status) == "ed542963de"
