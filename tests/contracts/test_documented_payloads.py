"""Payloads as the providers document them, through the CLI a user runs: ``harvester submit``
stores them, ``harvester harvest`` creates, tracks and harvests them against ``harvester
emulator``; a bad one is one ``file:line: reason`` naming the field, and nothing is stored.

Cognite's come from the segmentation reference (seed 001: its prompt, and each of the three
ways it names a file); Modzy's is the body modzy-sdk itself sends for a text job.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from modzy import ApiClient

from tests.badinput.helpers import cli
from tests.integration.helpers import config_toml

from .common import REPO, cognite, emulator, modzy
from .seeds import cognite_job_example

SCENARIO = (
    "seed = 8\n[cognite]\njob_duration_s = 0.2\n"
    "[modzy]\njob_duration_s = 0.2\nresults_404_s = 0.1\n"
)
ENV = {"DOC_COGNITE_SECRET": "doc-cognite-secret", "DOC_MODZY_KEY": "docaccess.doc-secret"}


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with emulator(tmp_path_factory.mktemp("docs"), SCENARIO) as found:
        yield found


@pytest.fixture
def config(tmp_path: Path, urls: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "h.toml"
    fast = {"rate_per_s": 0, "poll_min_s": 0.1, "poll_max_s": 0.3}
    cognite = {
        "base_url": urls["cognite"],
        "project": "docs",
        "token_url": urls["token"],
        "client_id": "docs",
        "client_secret_env": "DOC_COGNITE_SECRET",
        **fast,
    }
    modzy = {"base_url": urls["modzy"], "api_key_env": "DOC_MODZY_KEY", **fast}
    path.write_text(
        config_toml(
            log={"level": "warning", "format": "json"},
            providers={"cognite": cognite, "modzy": modzy},
        )
    )
    return path


def cognite_payloads() -> dict[str, dict[str, Any]]:
    """The reference's prompt with each of the reference's ways to name a file."""
    example = cognite_job_example()
    (named,) = example["failedItems"][0]["items"]  # all three forms, side by side
    return {form: {"items": [{form: named[form]}], **example["prompt"]} for form in named}


def modzy_payload(urls: dict[str, str]) -> dict[str, Any]:
    """The body modzy-sdk sends for a text job (recorded from the SDK, not written here)."""
    client = ApiClient(base_url=urls["modzy"], api_key=ENV["DOC_MODZY_KEY"])
    bodies: list[Any] = []

    def hook(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        if response.request.method == "POST":
            bodies.append(json.loads(response.request.body or b"null"))

    client.http.session.hooks["response"].append(hook)
    client.jobs.submit_text("ed542963de", "0.0.27", {"my-input": {"input.txt": "Modzy is great!"}})
    (body,) = bodies
    assert isinstance(body, dict)
    return body


def lines(jobs: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(job) + "\n" for job in jobs)


def test_documented_payloads_are_submitted_and_harvested(
    tmp_path: Path, config: Path, urls: dict[str, str]
) -> None:
    jobs = [
        {"provider": "cognite", "reference_id": f"doc-{form}", "payload": payload}
        for form, payload in cognite_payloads().items()
    ]
    assert len(jobs) == 3  # fileId, fileExternalId, fileInstanceId
    jobs.append({"provider": "modzy", "reference_id": "doc-text", "payload": modzy_payload(urls)})
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text(lines(jobs))
    submitted = cli("submit", "-c", str(config), str(jobs_file))
    assert submitted.code == 0, submitted.err
    harvested = cli("harvest", "-c", str(config), "--no-progress", "--timeout", "60", "--json")
    assert harvested.code == 0, harvested.err
    out = tmp_path / "out"
    for job in jobs:
        folder = out / job["provider"] / job["reference_id"]
        assert (folder / "MANIFEST.json").is_file(), job["reference_id"]
        if job["provider"] == "cognite":
            segments = json.loads((folder / "segments.json").read_text())
            assert segments["items"][0]["segments"]
        else:
            assert json.loads((folder / "results.json").read_text())["finished"] is True


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"fileInstanceId": {"externalId": "photo-1"}}, "payload.items[0].fileInstanceId"),
        ({"fileInstanceId": {"space": "", "externalId": "x"}}, "fileInstanceId.space"),
        ({"fileId": 1234, "fileInstanceId": {"space": "s", "externalId": "x"}}, "exactly one"),
    ],
)
def test_a_bad_documented_payload_is_one_clear_error(
    tmp_path: Path, config: Path, item: dict[str, Any], field: str
) -> None:
    good = cognite_payloads()["fileId"]
    jobs = [
        {"provider": "cognite", "reference_id": "fine", "payload": good},
        {"provider": "cognite", "reference_id": "bad", "payload": {**good, "items": [item]}},
    ]
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text(lines(jobs))
    answer = cli("submit", "-c", str(config), str(jobs_file))
    assert answer.code == 2, answer.err
    error, *rest = answer.lines
    assert error.startswith(f"harvester: {jobs_file}:2: ") and field in error, error
    assert rest == [f"nothing from {jobs_file} was added"], rest
    status = cli("status", "-c", str(config), "--json")
    assert json.loads(status.out)["total"] == 0, status.out  # nothing was stored


def test_the_demo_jobs_show_every_documented_cognite_file_form() -> None:
    demo = [json.loads(line) for line in (REPO / "configs" / "demo-jobs.jsonl").open()]
    photos = [job["payload"] for job in demo if job["provider"] == "cognite"]
    forms = {next(iter(p["items"][0])) for p in photos}
    assert forms == set(cognite_payloads())
    validators = {"cognite": cognite(), "modzy": modzy()}
    for job in demo:
        if job["provider"] in validators:
            validators[job["provider"]].validate_payload(job["payload"])
