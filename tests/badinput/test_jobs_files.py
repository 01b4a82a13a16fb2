"""Malformed jobs files: each is refused with one clear ``file:line: reason`` (exit 2) and the
store and output directory are byte for byte unchanged. Path-traversal reference ids are
*accepted*, and their results land in one safe folder inside the output directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harvester.jobs import job_key
from tests.integration.helpers import (
    payload,
    stored,
)

from .helpers import SECRET_ENV, Workspace, cli, line

PLAY = payload(1)


def pl(**fields: Any) -> dict[str, Any]:
    """A Playment line with ``fields`` replacing its own (None drops one)."""
    base: dict[str, Any] = {"provider": "playment", "reference_id": "bad-1", "payload": PLAY}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


COGNITE = {"items": [{"fileId": 1}], "points": [{"x": 0.5, "y": 0.5, "label": 1}]}
BENTLEY = {
    "type": "Segmentation2D",
    "iTwinId": "i",
    "specifications": {
        "inputs": {"photos": "r"},
        "outputs": ["segmentation2D"],
        "options": {},
    },
}
MODZY = {
    "model": {"identifier": "m", "version": "1"},
    "input": {"type": "text", "sources": {"a": {"input.txt": "x"}}},
}


@dataclass(frozen=True)
class Case:
    id: str
    content: bytes  #: the jobs file
    line: int  #: the line the error must name
    says: str  #: the reason must contain this


GOOD = line({"provider": "playment", "reference_id": "fine-1", "payload": PLAY})
CASES = [
    Case("truncated-json", b'{"provider": "playment", "reference_id": "x", "payload": ', 1,
         "not valid JSON"),
    Case("not-json", b"provider=playment reference_id=x\n", 1, "not valid JSON"),
    Case("trailing-comma", b'{"provider": "playment", "reference_id": "x",}\n', 1,
         "not valid JSON"),
    Case("single-quotes", b"{'provider': 'playment'}\n", 1, "not valid JSON"),
    Case("array", b"[1, 2, 3]\n", 1, "expected a JSON object, got list"),
    Case("string", b'"playment"\n', 1, "expected a JSON object, got str"),
    Case("number", b"42\n", 1, "expected a JSON object, got int"),
    Case("null", b"null\n", 1, "expected a JSON object, got NoneType"),
    Case("invalid-utf8", b'{"provider": "play\xff\xfement"}\n', 1, "not valid JSON"),
    Case("nan", b'{"provider": "playment", "reference_id": "x", "payload": {"data": NaN}}\n',
         1, "NaN is not valid JSON"),
    Case("infinity", line(pl()).replace(b'"wf-it"', b"Infinity"), 1,
         "Infinity is not valid JSON"),
    Case("number-overflows-float", line(pl()).replace(b'"wf-it"', b"1e400"), 1, "1e400"),
    Case("integer-beyond-64-bit",
         line(pl()).replace(b'"sensor_meta": []', b'"sensor_meta": ' + b"9" * 30), 1, "64-bit"),
    Case("deep-nesting", b'{"provider": "playment", "payload": ' + b"[" * 100_000 + b"\n", 1,
         "not valid JSON"),
    # Deep enough for Python's parser, too deep for the store's serialiser (orjson: 254).
    Case("deep-payload", line(pl()).replace(b'"wf-it"', b"[" * 300 + b"]" * 300), 1,
         "nested too deeply"),
    Case("lone-surrogate-id", line(pl()).replace(b'"bad-1"', b'"bad-\\ud800"'), 1,
         "lone surrogate"),
    Case("lone-surrogate-payload", line(pl()).replace(b'"wf-it"', b'"\\udfff"'), 1,
         "lone surrogate"),
    Case("long-unknown-key", b'{"' + b"k" * 20_000 + b'": 1}\n', 1,
         "unknown key 'kkkkkkkk"),
    Case("long-duplicate-key", b'{"' + b"k" * 20_000 + b'": 1, "' + b"k" * 20_000 + b'": 2}\n',
         1, "(20000 characters)' appears twice"),
    Case("unknown-provider", line(pl(provider="playmint")), 1,
         "provider 'playmint' is not configured"),
    Case("provider-missing", line(pl(provider=None)), 1, "'provider' is missing"),
    Case("provider-not-string", line(pl(provider=["playment"])), 1,
         "'provider' is missing or not a string"),
    Case("reference-missing", line(pl(reference_id=None)), 1, "needs 'reference_id'"),
    Case("payload-missing", line(pl(payload=None)), 1, "needs a 'payload'"),
    Case("unknown-key", line(pl(referenceid="x")), 1, "unknown key 'referenceid'"),
    Case("duplicate-keys", b'{"provider": "playment", "provider": "cognite", '
         b'"reference_id": "x", "payload": {}}\n', 1, "key 'provider' appears twice"),
    Case("nested-duplicate-keys", line(pl()).replace(b'"data": {', b'"data": {"a": 1, "a": 2, '),
         1, "key 'a' appears twice"),
    Case("huge-line", b'{"provider": "playment", "reference_id": "' + b"x" * (5 << 20) + b'"}\n',
         1, "more than the 4194304 allowed"),
    Case("reference-not-string", line(pl(reference_id=17)), 1,
         "'reference_id' must be a non-empty string"),
    Case("reference-empty", line(pl(reference_id="")), 1,
         "'reference_id' must be a non-empty string"),
    Case("reference-spaces", line(pl(reference_id=" scan-1")), 1,
         "leading or trailing whitespace"),
    Case("reference-control-char", line(pl(reference_id="scan\x001")), 1,
         "contains control characters"),
    Case("reference-too-long", line(pl(reference_id="x" * 513)), 1,
         "longer than 512 characters"),
    Case("job-id-and-payload", line(pl(job_id="42")), 1, "takes no payload"),
    Case("job-id-negative", line({"provider": "cognite", "job_id": -4}), 1,
         "'job_id' must be a non-empty string"),
    Case("job-id-bool", line({"provider": "cognite", "job_id": True}), 1,
         "'job_id' must be a non-empty string"),
    Case("playment-data-empty", line(pl(payload={"data": {}})), 1,
         "payload.data must be a non-empty JSON object"),
    Case("playment-payload-not-object", line(pl(payload=[1])), 1,
         "payload must be a JSON object"),
    Case("playment-project-in-payload", line(pl(payload={**PLAY, "project_id": "p"})), 1,
         "payload.project_id is not allowed"),
    Case("playment-frames-no-id", line(pl(payload={"data": {"sensor_data": {"frames": [{}]}}})),
         1, "frame_id"),
    Case("playment-reference-differs", line(pl(payload={**PLAY, "reference_id": "other"})), 1,
         "payload.reference_id 'other' differs from the line's reference_id 'bad-1'"),
    Case("playment-video-frame-no-src",
         line(pl(payload={"data": {"video_data": {"frames": [{"frame_id": "a"}]}}})), 1,
         "payload.data.video_data.frames[0].src must be a URL string"),
    Case("playment-video-repeated-frame",
         line(pl(payload={"data": {"video_data": {"frames": [
             {"frame_id": "a", "src": "https://x/1.jpg"},
             {"frame_id": "a", "src": "https://x/2.jpg"}]}}})), 1,
         "payload.data.video_data.frames[1].frame_id 'a' is repeated"),
    Case("playment-sensor-meta-no-id",
         line(pl(payload={"data": {"sensor_data": {
             "frames": [{"frame_id": "f"}], "sensor_meta": [{"name": "lidar"}]}}})), 1,
         "sensor_meta must be a list of objects with a string id"),
    Case("cognite-two-items",
         line({"provider": "cognite", "reference_id": "c",
               "payload": {**COGNITE, "items": [{"fileId": 1}, {"fileId": 2}]}}),
         1, "item"),
    Case("cognite-point-out-of-range",
         line({"provider": "cognite", "reference_id": "c",
               "payload": {**COGNITE, "points": [{"x": 2.0, "y": 0.5, "label": 1}]}}),
         1, "x"),
    Case("cognite-instance-id-without-space",
         line({"provider": "cognite", "reference_id": "c",
               "payload": {**COGNITE, "items": [{"fileInstanceId": {"externalId": "x"}}]}}),
         1, "payload.items[0].fileInstanceId must be an object {space, externalId}"),
    Case("cognite-repeated-point",
         line({"provider": "cognite", "reference_id": "c",
               "payload": {**COGNITE, "points": COGNITE["points"] * 2}}),
         1, "payload.points[1] repeats payload.points[0]"),
    Case("bentley-unknown-type",
         line({"provider": "bentley", "reference_id": "b",
               "payload": {**BENTLEY, "type": "Segmentation9D"}}),
         1, "type"),
    Case("bentley-v1-inputs-list",
         line({"provider": "bentley", "reference_id": "b",
               "payload": {**BENTLEY, "specifications": {
                   **BENTLEY["specifications"],
                   "inputs": [{"name": "photos", "realityDataId": "r"}]}}}),
         1, "payload.specifications.inputs must be an object mapping Segmentation2D input names"
            " to reality-data ids (model3D, photoSegmentationDetector, photos, segmentation2D)"),
    Case("bentley-unknown-output",
         line({"provider": "bentley", "reference_id": "b",
               "payload": {**BENTLEY, "specifications": {
                   **BENTLEY["specifications"], "outputs": ["segmentation3D"]}}}),
         1, 'payload.specifications.outputs[0] "segmentation3D" is not an output of'
            " Segmentation2D (valid: lines3D,"),
    Case("bentley-v1-extra-key",
         line({"provider": "bentley", "reference_id": "b",
               "payload": {**BENTLEY, "costEstimationParameters": {"gigaPixels": 2}}}),
         1, "payload.costEstimationParameters is not a property of a v2 job creation"),
    Case("modzy-no-model",
         line({"provider": "modzy", "reference_id": "m", "payload": {"input": MODZY["input"]}}),
         1, "model"),
    Case("bad-line-after-good-ones", GOOD + b"\n\n" + GOOD + b"{oops}\n", 5, "not valid JSON"),
    Case("same-key-different-content",
         GOOD + line({"provider": "playment", "reference_id": "fine-1", "payload": payload(2)}),
         2, "was already used by"),
]  # fmt: skip


def _check_one_error(done: Any, path: Path, number: int, says: str) -> None:
    assert done.code == 2, (done.code, done.err)
    first, *rest = done.lines
    assert first.startswith(f"harvester: {path}:{number}: "), first
    assert says in first, first
    assert len(first) < 400, "one clear line, not a dump"
    # One error: the line, then only the verdict that nothing was added.
    assert rest == [f"nothing from {path} was added"], rest


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
@pytest.mark.parametrize("command", ["submit", "harvest"])
def test_bad_jobs_file_is_refused_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: Case, command: str
) -> None:
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    ws = Workspace(tmp_path)
    jobs = ws.write("jobs.jsonl", case.content)
    before = ws.snapshot()
    done = cli(command, "-c", str(ws.config), str(jobs))
    _check_one_error(done, jobs, case.line, case.says)
    assert ws.snapshot() == before


def test_one_bad_file_among_several_adds_nothing_from_any(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    ws = Workspace(tmp_path)
    first = ws.write("first.jsonl", GOOD)
    second = ws.write("second.jsonl", GOOD.replace(b"fine-1", b"fine-2") + b"[]\n")
    before = ws.snapshot()
    done = cli("submit", "-c", str(ws.config), str(first), str(second))
    _check_one_error(done, second, 2, "expected a JSON object")
    assert ws.snapshot() == before


@pytest.mark.parametrize(
    ("make", "says"),
    [
        pytest.param(lambda ws: ws.inputs / "absent.jsonl", "No such file", id="missing-file"),
        pytest.param(lambda ws: ws.inputs, "Is a directory", id="directory"),
    ],
)
def test_unreadable_jobs_file(tmp_path: Path, make: Callable[[Workspace], Path], says: str) -> None:
    ws = Workspace(tmp_path)
    path = make(ws)
    before = ws.snapshot()
    done = cli("submit", "-c", str(ws.config), str(path))
    assert done.code == 2
    assert done.lines == [f"harvester: {path}: cannot read jobs file: {says}"] or (
        len(done.lines) == 1 and says in done.lines[0] and str(path) in done.lines[0]
    ), done.lines
    assert ws.snapshot() == before


TRAVERSAL_IDS = [
    "../../etc",
    "../../../../../../etc/passwd",
    "..",
    ".",
    ".hidden",
    "a/b/c",
    "/absolute/path",
    "C:\\Windows\\system32",
    "%2e%2e%2fetc",
    "scan\u2215slash",  # a division slash that looks like "/"
    "ünïcødé scan",
    "CON",
    "x" * 512,
]


def test_traversal_reference_ids_are_accepted_as_safe_keys(tmp_path: Path) -> None:
    """Accepted (ids are the user's business), but each job's key, the name of its output
    folder, is one safe path component, different for every id."""
    ws = Workspace(tmp_path)
    lines = [
        {"provider": "playment", "reference_id": ref, "payload": PLAY} for ref in TRAVERSAL_IDS
    ]
    jobs = ws.write("jobs.jsonl", b"".join(line(x) for x in lines))
    done = cli("submit", "-c", str(ws.config), str(jobs))
    assert done.code == 0, done.err
    keys = {job_key(ref) for ref in TRAVERSAL_IDS}
    assert len(keys) == len(TRAVERSAL_IDS)
    out = tmp_path / "out" / "playment"
    for key in keys:
        assert "/" not in key and "\\" not in key and not key.startswith(".")
        assert (out / key).resolve().parent == out.resolve(), key
    status = cli("status", "-c", str(ws.config), "--json", "--check")
    assert status.code == 0, status.out
    assert json.loads(status.out)["check"] == []


@pytest.mark.anyio
async def test_traversal_ids_harvest_into_safe_folders(tmp_path: Path) -> None:
    """End to end: jobs whose reference ids and frame ids try to climb out are harvested, and
    every file lands inside its job's own folder under the output directory."""
    import anyio

    from harvester.emulator.server import Emulator
    from harvester.engine import Engine
    from harvester.jobsfile import read_jobs_files
    from tests.integration.helpers import API_KEY, make_config, scenario

    climbing = {
        "data": {
            "sensor_data": {
                "frames": [{"frame_id": "../../../../pwn", "sensors": []}, {"frame_id": "..",
                            "sensors": []}],
                "sensor_meta": [],
            }
        },
        "work_flow_id": "wf",
    }  # fmt: skip
    ids = ["../../etc", "a/b/c", "..", ".hidden", "/absolute/path"]
    deep = tmp_path / "d1" / "d2"
    deep.mkdir(parents=True)
    jobs_path = deep / "jobs.jsonl"
    lines = [{"provider": "playment", "reference_id": r, "payload": climbing} for r in ids]
    jobs_path.write_bytes(b"".join(line(x) for x in lines))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IT_PLAYMENT_KEY", API_KEY)
        async with Emulator(scenario()) as emu:
            config = make_config(deep, emu)
            jobs = read_jobs_files([jobs_path], config)
            async with stored(config, jobs) as store:
                with anyio.fail_after(30):
                    await Engine(config, store).run()
                done = await store.jobs()
    assert [j.state.value for j in done] == ["harvested"] * len(ids)
    _all_inside(tmp_path, config, done)


def _all_inside(tmp_path: Path, config: Any, done: list[Any]) -> None:
    from harvester.verify import verify_outputs

    out = config.output.dir.resolve()
    # Nothing was written anywhere but the store, the jobs file and the output directory.
    written = {p.relative_to(tmp_path).parts[2] for p in tmp_path.rglob("*") if p.is_file()}
    assert written <= {"out", "jobs.jsonl", "state.db", "state.db-wal", "state.db-shm"}, written
    for job in done:
        folder = (config.output.dir / job.provider / job.key).resolve()
        assert folder.parent == out / "playment"
        files = [p.resolve() for p in folder.rglob("*") if p.is_file()]
        assert all(f.is_relative_to(folder) for f in files)
        labels = sorted(p.name for p in (folder / "labels").iterdir())
        assert len(labels) == 2 and all(not n.startswith(".") for n in labels), labels
    assert verify_outputs(config.output.dir, done).problems == []
