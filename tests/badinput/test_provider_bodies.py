"""Malformed provider answers: wrong types, missing fields, non-JSON, gigantic numbers,
negative labels, labels beyond ``output.label_dtype``.

First through the adapters' parse functions and the label decoders directly (what each
answer becomes), then end to end: one harvest through the engine against the emulator behind
a proxy that serves each case's malformed body to one job. Each bad job ends in ``error`` with
one reason naming the provider and the job (and the frame and byte offset for label files);
every other job is harvested; the bad job's folder has no ``MANIFEST.json`` and no temporary
file; ``status --check``'s verification finds nothing wrong.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from multidict import CIMultiDict

from harvester.config import Config, parse_config
from harvester.emulator.scenario import parse_scenario
from harvester.emulator.server import Emulator
from harvester.engine import Engine
from harvester.errors import DecodeError, JobError, ProtocolError
from harvester.harvest import LabelSink
from harvester.jobs import Job, JobState, job_key, new_job
from harvester.providers import make_provider
from harvester.store.base import NewJob
from harvester.verify import verify_outputs
from harvester.wire import Response
from tests.integration.helpers import (
    payload,
    stored,
)

from .helpers import CONFIG, secret_env
from .proxy import Malformed, Proxy

# -- through the parse functions and decoders ----------------------------------------------

_CFG = parse_config(tomllib.loads(CONFIG), source=Path("/tmp/bi/harvester.toml"))
PROVIDERS = {name: make_provider(cfg) for name, cfg in _CFG.providers.items()}


def job(provider: str) -> Job:
    return new_job(provider, reference_id=f"{provider}-bad-1", remote_id="r-77", now=0.0)


def answer(body: bytes | str, status: int = 200, **headers: str) -> Response:
    data = body.encode() if isinstance(body, str) else body
    return Response(status, CIMultiDict(headers), data, "http://h/x/r-77", "req-1")


def parse(provider: str, method: str, body: bytes | str, **kw: Any) -> Callable[[], Any]:
    def call() -> Any:
        fn = getattr(PROVIDERS[provider], method)
        resp = answer(body, **kw)
        if method == "parse_attachment":
            return fn(resp, "https://h/result.json")
        return fn(resp, job(provider))

    return call


def labels(body: bytes, fmt: str = "mask", dtype: str = "auto") -> Callable[[], Any]:
    def call() -> Any:
        folder = Path(_TMP[0])
        dir_fd = os.open(folder, os.O_RDONLY)
        sink = LabelSink(fmt, dir_fd, "f-001.npy", "playment job scan-9 frame f-001", "f-001")  # type: ignore[arg-type]
        try:
            for i in range(0, len(body), 7):  # chunks that split numbers anywhere
                sink.feed(body[i : i + 7])
            return sink.finish(dtype)
        finally:
            sink.close()
            os.close(dir_fd)

    return call


_TMP: list[Path] = []


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[], Any]
    error: type[Exception]
    says: tuple[str, ...]


PCD_HEAD = (
    b"# .PCD v0.7\nVERSION 0.7\nFIELDS x y z label_key\nSIZE 4 4 4 4\nTYPE F F F U\n"
    b"COUNT 1 1 1 1\nWIDTH 3\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS 3\nDATA ascii\n"
)
OK_ENVELOPE = '{"success": true, "data": %s}'
WHO = ("playment", "playment-bad-1")
CASES = [
    # Playment
    Case("playment-poll-not-json", parse("playment", "parse_poll", "<html>502</html>"),
         ProtocolError, (*WHO, "not JSON")),
    Case("playment-poll-empty", parse("playment", "parse_poll", ""), ProtocolError,
         (*WHO, "not JSON")),
    Case("playment-poll-success-not-bool", parse("playment", "parse_poll", '{"success": "yes"}'),
         ProtocolError, (*WHO, "boolean 'success'")),
    Case("playment-poll-data-list", parse("playment", "parse_poll", OK_ENVELOPE % "[]"),
         ProtocolError, (*WHO, "no data object")),
    Case("playment-poll-status-number",
         parse("playment", "parse_poll", OK_ENVELOPE % '{"status": 3}'), ProtocolError,
         (*WHO, "no status string")),
    Case("playment-poll-gigantic-number",
         parse("playment", "parse_poll", OK_ENVELOPE % '{"status": "created", "n": 1e999}'),
         ProtocolError, (*WHO, "not JSON")),
    Case("playment-create-no-job-id",
         parse("playment", "parse_create", OK_ENVELOPE % '{"job_id": 12}'), ProtocolError,
         (*WHO, "no data.job_id")),
    Case("playment-find-jobs-not-list",
         parse("playment", "parse_find", OK_ENVELOPE % '{"jobs": {}}'), ProtocolError,
         (*WHO, "no data.jobs list")),
    Case("playment-attachment-no-location",
         parse("playment", "parse_attachment", "", status=302), ProtocolError,
         ("playment", "without a Location")),
    Case("playment-attachment-file-url",
         parse("playment", "parse_attachment", "", status=302, Location="file:///etc/passwd"),
         ProtocolError, ("playment", "non-HTTP URL")),
    # Cognite
    Case("cognite-poll-not-object", parse("cognite", "parse_poll", "[1, 2]"), ProtocolError,
         ("cognite", "cognite-bad-1", "not a JSON object")),
    Case("cognite-poll-no-status", parse("cognite", "parse_poll", '{"jobId": 77}'),
         ProtocolError, ("cognite", "cognite-bad-1", "no status string")),
    Case("cognite-items-not-list",
         parse("cognite", "parse_poll", '{"status": "Completed", "items": {"a": 1}}'),
         ProtocolError, ("cognite", "cognite-bad-1", "items is not a list")),
    Case("cognite-create-id-string", parse("cognite", "parse_create", '{"jobId": "x"}'),
         ProtocolError, ("cognite", "cognite-bad-1", "no integer jobId")),
    # Bentley
    Case("bentley-job-missing", parse("bentley", "parse_get", '{"jobs": []}'), ProtocolError,
         ("bentley", "bentley-bad-1")),
    Case("bentley-state-number", parse("bentley", "parse_get", '{"job": {"state": 5}}'),
         ProtocolError, ("bentley", "bentley-bad-1", "no job.state string")),
    Case("bentley-progress-string",
         parse("bentley", "parse_progress", '{"progress": {"percentage": "50"}}'),
         ProtocolError, ("bentley", "bentley-bad-1", "percentage number")),
    Case("bentley-readaccess-ftp",
         parse("bentley", "parse_readaccess",
               '{"_links": {"containerUrl": {"href": "ftp://h/c"}}}'),
         ProtocolError, ("bentley", "bentley-bad-1", "containerUrl")),
    # Modzy
    Case("modzy-results-not-json", parse("modzy", "parse_results", "garbage"), ProtocolError,
         ("modzy", "modzy-bad-1", "not JSON")),
    Case("modzy-results-finished-string",
         parse("modzy", "parse_results", '{"finished": "yes"}'), ProtocolError,
         ("modzy", "modzy-bad-1", "boolean 'finished'")),
    Case("modzy-results-not-object",
         parse("modzy", "parse_results", '{"finished": true, "results": [1]}'), ProtocolError,
         ("modzy", "modzy-bad-1", "results is not an object")),
    Case("modzy-poll-status-null", parse("modzy", "parse_poll", '{"status": null}'),
         ProtocolError, ("modzy", "modzy-bad-1", "no status string")),
    # Label files (Playment masks and the PCD variant), fed in 7-byte chunks
    Case("mask-negative-label", labels(b"[1, 2, -3, 4]"), DecodeError,
         ("scan-9", "frame f-001", "at byte 7")),
    Case("mask-gigantic-number", labels(b"[1, 123456789012345678901234567890]"), DecodeError,
         ("scan-9", "frame f-001", "at byte")),
    Case("mask-float", labels(b"[1, 2.5, 3]"), DecodeError, ("frame f-001", "at byte")),
    Case("mask-letters", labels(b"[1, two, 3]"), DecodeError, ("frame f-001", "at byte 4")),
    Case("mask-not-array", labels(b'{"labels": [1]}'), DecodeError, ("frame f-001", "at byte 0")),
    Case("mask-unterminated", labels(b"[1, 2, 3"), DecodeError, ("frame f-001",)),
    Case("mask-nested", labels(b"[[1], 2]"), DecodeError, ("frame f-001", "at byte 1")),
    Case("mask-empty-file", labels(b""), DecodeError, ("frame f-001",)),
    Case("mask-beyond-dtype", labels(b"[1, 300, 2]", dtype="uint8"), DecodeError,
         ("frame f-001", "label 300 does not fit uint8", "output.label_dtype")),
    Case("pcd-negative-label", labels(PCD_HEAD + b"0 0 0 1\n0 0 0 -2\n0 0 0 3\n", "pcd"),
         DecodeError, ("frame f-001", "at byte")),
    Case("pcd-no-label-field",
         labels(PCD_HEAD.replace(b"label_key", b"intensity") + b"0 0 0 1\n", "pcd"),
         DecodeError, ("frame f-001", "label_key")),
    Case("pcd-short-row", labels(PCD_HEAD + b"0 0 0 1\n0 0\n0 0 0 3\n", "pcd"), DecodeError,
         ("frame f-001", "at byte")),
    Case("pcd-binary", labels(PCD_HEAD.replace(b"DATA ascii", b"DATA binary") + b"\x00" * 48,
                              "pcd"), DecodeError, ("frame f-001", "binary")),
    Case("pcd-beyond-dtype", labels(PCD_HEAD + b"0 0 0 1\n0 0 0 70000\n0 0 0 3\n", "pcd",
                                    dtype="uint16"), DecodeError,
         ("frame f-001", "label 70000 does not fit uint16")),
]  # fmt: skip


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_malformed_answer_is_one_clear_error(tmp_path: Path, case: Case) -> None:
    _TMP[:] = [tmp_path]
    with pytest.raises(JobError) as info:
        case.call()
    assert isinstance(info.value, case.error), type(info.value)
    text = str(info.value)
    assert "\n" not in text and len(text) < 500, text
    for fragment in case.says:
        assert fragment in text, (fragment, text)
    assert [p.name for p in tmp_path.iterdir()] == [], "nothing is left behind"


# -- end to end: the engine against the emulator behind a malformed-body proxy -------------


@dataclass(frozen=True)
class EndToEnd:
    id: str
    provider: str
    place: str
    body: bytes
    says: tuple[str, ...]


def mask_of(labels_text: str) -> bytes:
    return labels_text.encode()


E2E = [
    EndToEnd("playment-poll-not-json", "playment", "poll", b"<html>oops</html>",
             ("not JSON",)),
    EndToEnd("playment-poll-status-number", "playment", "poll",
             b'{"success": true, "data": {"status": 7}}', ("no status string",)),
    EndToEnd("playment-poll-gigantic-number", "playment", "poll",
             b'{"success": true, "data": {"status": "completed", "result": "x", "n": 1e999}}',
             ("not JSON",)),
    EndToEnd("playment-result-not-json", "playment", "result-file", b"{not json",
             ("result.json is not JSON",)),
    EndToEnd("playment-result-masks-string", "playment", "result-file",
             b'{"annotation_data": {"masks": "all of them"}}', ("masks is not a list",)),
    EndToEnd("playment-mask-negative-label", "playment", "mask-file", b"[1, 2, -3, 4]",
             ("frame f-001", "at byte 7")),
    EndToEnd("playment-mask-gigantic-number", "playment", "mask-file",
             b"[1, 99999999999999999999999, 3]", ("frame f-001", "at byte")),
    EndToEnd("playment-mask-beyond-dtype", "playment", "mask-file", b"[1, 300, 2]",
             ("frame f-001", "label 300 does not fit uint8")),
    EndToEnd("playment-mask-not-array", "playment", "mask-file", b'{"labels": [1, 2]}',
             ("frame f-001", "at byte 0")),
    EndToEnd("cognite-items-not-list", "cognite", "poll",
             b'{"jobId": 1, "status": "Completed", "items": {"a": 1}}', ("items is not a list",)),
    EndToEnd("cognite-poll-not-json", "cognite", "poll", b"Service Unavailable\x00",
             ("not JSON",)),
    EndToEnd("bentley-state-number", "bentley", "poll", b'{"job": {"id": "x", "state": 5}}',
             ("no job.state string",)),
    EndToEnd("modzy-results-not-json", "modzy", "results", b"\xff\xfe garbage",
             ("not JSON",)),
    EndToEnd("modzy-results-finished-string", "modzy", "results", b'{"finished": "yes"}',
             ("boolean 'finished'",)),
]  # fmt: skip


def _line_for(case: EndToEnd, i: int) -> tuple[NewJob, bytes]:
    """The bad job of ``case`` and the marker its create request carries."""
    ref = f"bad-{case.id}"
    if case.provider == "playment":
        body: dict[str, Any] = payload(2)
        marker = f'"reference_id":"{ref}"'.encode()
    elif case.provider == "cognite":
        body = {"items": [{"fileId": 5000 + i}], "points": [{"x": 0.5, "y": 0.5, "label": 1}]}
        marker = f'"fileId":{5000 + i}'.encode()
    elif case.provider == "bentley":
        body = {
            "type": "Segmentation2D",
            "iTwinId": "bi-itwin",
            "specifications": {
                "inputs": {"photos": f"rd-{i}"},
                "outputs": ["segmentation2D"],
                "options": {},
            },
        }
        marker = f'"name":"{ref}"'.encode()
    else:
        body = {
            "model": {"identifier": "bi-model", "version": "1.0.1"},
            "input": {"type": "text", "sources": {"item": {"input.txt": ref}}},
        }
        marker = ref.encode()
    return NewJob(case.provider, job_key(ref), ref, None, body, "e2e"), marker


GOOD_JOBS = [
    NewJob("playment", "good-p1", "good-p1", None, payload(2), "e2e"),
    NewJob("playment", "good-p2", "good-p2", None, payload(2), "e2e"),
    NewJob("cognite", "good-c", "good-c", None,
           {"items": [{"fileId": 1}], "points": [{"x": 0.5, "y": 0.5, "label": 1}]}, "e2e"),
    NewJob("bentley", "good-b", "good-b", None, _line_for(E2E[11], 99)[0].payload, "e2e"),
    NewJob("modzy", "good-m", "good-m", None,
           {"model": {"identifier": "bi-model", "version": "1.0.1"},
            "input": {"type": "text", "sources": {"item": {"input.txt": "good"}}}}, "e2e"),
]  # fmt: skip


@dataclass
class Harvest:
    config: Config
    jobs: dict[str, Job]
    served: dict[str, int]


async def _harvest(root: Path) -> Harvest:
    bad = [_line_for(c, i) for i, c in enumerate(E2E)]
    cases = [
        Malformed(c.id, c.provider, marker, c.place, c.body)
        for c, (_, marker) in zip(E2E, bad, strict=True)
    ]
    sc = parse_scenario(
        {
            "seed": 5,
            "playment": {"job_duration_s": 0.3, "points_per_frame": [300, 600]},
            "cognite": {"job_duration_s": 0.3},
            "bentley": {"job_duration_s": 0.3, "blob_bytes": 2000, "terminating_s": 0.1},
            "modzy": {"job_duration_s": 0.3, "results_404_s": 0.1},
        }
    )
    async with Emulator(sc) as emu, Proxy(emu.urls["playment"].rsplit("/", 1)[0], cases) as px:
        common = {"rate_per_s": 0, "poll_min_s": 0.1, "poll_max_s": 0.3, "backoff_base_s": 0.05,
                  "backoff_max_s": 0.3, "request_timeout_s": 5}  # fmt: skip
        doc = {
            "store": {"url": "sqlite://state.db"},
            # uint8: the good jobs' labels (< 60) fit, the 300 of one bad mask does not
            "output": {"dir": "out", "label_dtype": "uint8"},
            "harvest": {"max_attempts": 2},
            "providers": {
                "playment": {**common, "base_url": px.url("playment"), "project_id": "bi",
                             "api_key_env": "BI_PLAYMENT_KEY"},
                "cognite": {**common, "base_url": px.url("cognite"), "project": "bi",
                            "token_url": px.url("token"), "client_id": "bi",
                            "client_secret_env": "BI_COGNITE_SECRET"},
                "bentley": {**common, "base_url": px.url("bentley"), "token_url": px.url("token"),
                            "client_id": "bi", "client_secret_env": "BI_BENTLEY_SECRET"},
                "modzy": {**common, "base_url": px.url("modzy"), "api_key_env": "BI_MODZY_KEY"},
            },
        }  # fmt: skip
        config = parse_config(doc, source=root / "config.toml")
        async with stored(config, [j for j, _ in bad] + GOOD_JOBS) as store:
            with anyio.fail_after(60):
                await Engine(config, store).run()
            done = {f"{j.provider}/{j.key}": j for j in await store.jobs()}
        return Harvest(config, done, dict(px.served))


@pytest.fixture(scope="module")
def harvest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harvest]:
    with secret_env():
        yield anyio.run(_harvest, tmp_path_factory.mktemp("e2e"))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in E2E])
def test_malformed_answer_ends_its_job_in_error(harvest: Harvest, case: EndToEnd) -> None:
    key = job_key(f"bad-{case.id}")
    bad = harvest.jobs[f"{case.provider}/{key}"]
    assert harvest.served.get(case.id), "the malformed body was never asked for"
    assert bad.state == JobState.ERROR, (bad.state, bad.reason)
    reason = bad.reason or ""
    assert "\n" not in reason and len(reason) < 600, reason
    assert case.provider in reason, reason
    assert key in reason or (bad.remote_id or "-") in reason, f"names no job: {reason}"
    for fragment in case.says:
        assert fragment in reason, (fragment, reason)
    folder = harvest.config.output.dir / case.provider / key
    if folder.exists():
        names = [p.name for p in folder.rglob("*")]
        assert "MANIFEST.json" not in names, names
        assert not [n for n in names if ".tmp-" in n], names


def test_other_jobs_are_unaffected(harvest: Harvest) -> None:
    for good in GOOD_JOBS:
        job_ = harvest.jobs[f"{good.provider}/{good.key}"]
        assert job_.state == JobState.HARVESTED, (job_.label, job_.reason)
    assert verify_outputs(harvest.config.output.dir, harvest.jobs.values()).problems == []
