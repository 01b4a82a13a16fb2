"""OpenTelemetry traces of a harvest against the emulator (the SDK's in-memory exporter):
one trace per job with the job span as the parent of its steps, the files of a harvest under
it, the job's ids as attributes and no secret anywhere, trace ids in the JSON logs; and
with tracing off, or opentelemetry absent, nothing at all."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from harvester import tracing
from harvester.emulator.scenario import parse_fault
from harvester.emulator.server import Emulator
from harvester.jobs import JobState
from harvester.logs import configure

from .helpers import (
    API_KEY,
    config_toml,
    harvest_burst,
    jobs_file,
    make_config,
    new_jobs,
    playment_lane,
    scenario,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IT_PLAYMENT_KEY", API_KEY)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = tracing.new_provider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.setup(provider=provider)
    try:
        yield exporter
    finally:
        tracing.shutdown()


async def run_harvest(tmp_path: Path, emu: Emulator, n: int) -> dict[JobState, int]:
    config = make_config(tmp_path, emu)
    counts, _ = await harvest_burst(config, new_jobs(n, frames=2), now=1_700_000_000.0)
    return counts


@pytest.mark.anyio
async def test_a_harvest_is_one_trace_per_job_with_its_steps_and_files(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    log = io.StringIO()
    configure("info", "json", stream=log)
    async with Emulator(scenario()) as emu:
        # The first two polls fail and are retried: their log lines come from inside a span.
        emu.state.add_fault(
            parse_fault({"kind": "5xx", "status": 500, "count": 2, "match": "/jobs/"})
        )
        assert await run_harvest(tmp_path, emu, 3) == {JobState.HARVESTED: 3}

    finished = spans.get_finished_spans()
    by_trace: dict[int, list[Any]] = {}
    for s in finished:
        by_trace.setdefault(s.context.trace_id, []).append(s)
    assert len(by_trace) == 3  # one trace per job, nothing else
    keys = set()
    for trace in by_trace.values():
        (root,) = [s for s in trace if s.name == "job"]
        key = root.attributes["harvester.job.key"]
        keys.add(key)
        assert root.parent is None
        assert root.attributes["harvester.provider"] == "playment"
        assert root.attributes["harvester.job.reference_id"] == key
        assert root.attributes["harvester.job.state"] == "harvested"
        assert root.attributes["harvester.job.remote_id"]
        ids = {s.context.span_id: s for s in trace}
        names = [s.name for s in trace]
        assert names.count("submit") == 1 and names.count("harvest") == 1
        assert names.count("poll") >= 1
        for s in trace:
            if (
                s.name in ("submit", "poll", "harvest", "job")
                or s.attributes.get("harvester.file") == "MANIFEST.json"
            ):
                # Steps (and the manifest, written last) hang off the job span.
                assert s is root or s.parent.span_id == root.context.span_id, s.name
                assert s.attributes["harvester.job.key"] == key
            else:
                # Files of the harvest: downloads, the decoded label frames, small writes.
                assert ids[s.parent.span_id].name == "harvest", s.name
        harvest = next(s for s in trace if s.name == "harvest")
        files = {s.attributes["harvester.file"] for s in trace if s.parent == harvest.context}
        assert {"labels/f-000.npy", "labels/f-001.npy", "result.json"} <= files
        decode = [s for s in trace if s.name == "decode"]
        assert {s.attributes["harvester.file"] for s in decode} == {
            "labels/f-000.npy",
            "labels/f-001.npy",
        }
        assert all(s.end_time >= s.start_time for s in trace)
        assert root.start_time <= min(s.start_time for s in trace)
    assert keys == {"scan-000", "scan-001", "scan-002"}

    # No secret, and no URL (a signed URL's query is one), in any attribute or status.
    text = json.dumps([[dict(s.attributes), s.status.description] for s in finished], default=str)
    assert API_KEY not in text and "http" not in text

    # Log lines written inside a span carry its ids: each "job state" line its job's trace.
    events = [orjson.loads(line) for line in log.getvalue().splitlines()]
    states = [e for e in events if e["event"] == "job state"]
    assert states and all("trace_id" in e and "span_id" in e for e in states)
    trace_of = {
        s.attributes["harvester.job.key"]: format(s.context.trace_id, "032x")
        for s in finished
        if s.name == "job"
    }
    for e in states:
        assert e["trace_id"] == trace_of[e["job"]], e
    retried = [e for e in events if e["event"] == "retrying"]
    polls = {format(s.context.span_id, "016x"): s for s in finished if s.name == "poll"}
    assert len(retried) == 2
    for e in retried:
        poll = polls[e["span_id"]]  # logged inside that poll's span, in its job's trace
        assert e["trace_id"] == format(poll.context.trace_id, "032x")
        assert e["job"] == poll.attributes["harvester.job.key"]


@pytest.mark.anyio
async def test_off_every_hook_is_the_one_shared_no_op(tmp_path: Path) -> None:
    assert not tracing.enabled()
    job = new_jobs(1)[0]
    from harvester.jobs import Job

    stored = Job(job.provider, job.key, job.reference_id, None, JobState.NEW, 0.0, 0.0)
    assert tracing.step("poll", stored) is tracing.NOOP  # nothing allocated per call
    assert tracing.span("write", file="x") is tracing.NOOP
    log = io.StringIO()
    configure("info", "json", stream=log)
    async with Emulator(scenario()) as emu:
        assert await run_harvest(tmp_path, emu, 1) == {JobState.HARVESTED: 1}
    assert "trace_id" not in log.getvalue()


def test_without_opentelemetry_harvester_runs_untraced_and_says_why() -> None:
    # A child where importing opentelemetry fails, as on an install without the extra.
    code = """
import sys
sys.modules["opentelemetry"] = None  # any import of it now raises ImportError
from harvester import tracing
assert not tracing.AVAILABLE
print(tracing.setup_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}))
print(tracing.setup_from_env({}))
import harvester.engine, harvester.harvest  # the hooks import nothing of it
assert not tracing.enabled() and "opentelemetry.sdk" not in sys.modules
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert "opentelemetry is not installed" in first and "harvester[otel]" in first
    assert second == "None"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, None),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, None),
    ],
)
def test_the_standard_variables_turn_it_on(env: dict[str, str], expected: str | None) -> None:
    assert tracing.wanted(env) == expected


@pytest.mark.anyio
async def test_the_command_traces_when_the_standard_variable_asks(tmp_path: Path) -> None:
    """``harvester harvest`` with ``OTEL_TRACES_EXPORTER=console``: set up from the
    environment alone, every span flushed by the time the command exits. (The OTLP exporter
    is the same path with another exporter; it needs protobuf >= 5, which the dev extra's
    modzy-sdk refuses, so the test suite does not install it.)"""
    async with Emulator(scenario()) as emu:
        config = tmp_path / "harvester.toml"
        playment = playment_lane(emu.urls["playment"])
        config.write_text(config_toml(log={"format": "json"}, providers={"playment": playment}))
        jobs = jobs_file(tmp_path / "jobs.jsonl", new_jobs(2, frames=1))
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
            "PYTHONPATH": str(REPO),
            "IT_PLAYMENT_KEY": API_KEY,
            "OTEL_TRACES_EXPORTER": "console",
        }
        command = ["harvest", "-c", str(config), str(jobs), "--no-progress", "--json"]
        done = await anyio.run_process(
            [sys.executable, "-m", "harvester.cli", *command], env=env, check=False
        )
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    for expected in ('"name": "job"', '"name": "poll"', '"name": "decode"', '"scan-001"'):
        assert expected in out, expected
    assert API_KEY not in out
    logged = [orjson.loads(line) for line in done.stderr.decode().splitlines()]
    assert any("trace_id" in e for e in logged if e.get("event") == "job state")


def test_without_the_otlp_exporter_it_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    warning = tracing.setup_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert warning is not None and "harvester[otel]" in warning
    assert not tracing.enabled()
