"""``harvester run`` as a real subprocess against the emulator: the jobs API, ``harvester
submit`` next to it, the token, Prometheus metrics, and the exit codes of bad starts."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harvester import __version__
from tests.emulated import StartEmulator

from .helpers import (
    API_KEY,
    REPO,
    ReadyDaemon,
    child_env,
    cli_process,
    emulator_stats,
    free_port,
    job_line,
    jsonl,
    write_config,
)

pytestmark = pytest.mark.anyio


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def exported_names(text: str) -> set[str]:
    """Every series name a query can use, including families with no samples yet."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def assert_dashboard_queries_name_exported_metrics(text: str) -> None:
    dashboard = json.loads((REPO / "configs" / "grafana" / "harvester-dashboard.json").read_text())
    exported = exported_names(text)
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    assert queries
    for query in queries:
        used = set(re.findall(r"\b(?:harvester|process|python)_[a-z0-9_]+", query))
        assert used, f"query names no metric: {query}"
        assert used <= exported, f"{query}: not exported: {used - exported}"


async def test_jobs_from_http_and_from_submit_are_harvested_and_counted(
    tmp_path: Path,
    start_emulator: StartEmulator,
    ready_daemon: ReadyDaemon,
    session: aiohttp.ClientSession,
) -> None:
    emu = await start_emulator()
    daemon = await ready_daemon(emu)
    config = daemon.config

    # JSON Lines, with a line repeated inside the body.
    body = jsonl([job_line("http-1"), job_line("http-2", frames=2), job_line("http-1")])
    status, doc = await daemon.post("/jobs", body)
    assert status == 201, doc
    assert doc["added"] == 2
    assert [(j["line"], j["key"], j["result"]) for j in doc["jobs"]] == [
        (1, "http-1", "added"),
        (2, "http-2", "added"),
        (3, "http-1", "repeated"),
    ]
    assert doc["jobs"][2]["same_as_line"] == 1

    # A JSON array, pretty-printed; one job is already in the store.
    array = json.dumps([job_line("http-3"), job_line("http-2", frames=2)], indent=2).encode()
    status, doc = await daemon.post("/jobs", array, headers={"Content-Type": "application/json"})
    assert status == 201, doc
    assert [j["result"] for j in doc["jobs"]] == ["added", "already_present"]

    # Posting the same again adds nothing: 200, not 201.
    status, doc = await daemon.post("/jobs", array)
    assert status == 200 and doc["added"] == 0 and doc["already_present"] == 2

    # Another process adds jobs to the same store; the daemon picks them up by itself.
    jobs_file = tmp_path / "more.jsonl"
    jobs_file.write_bytes(jsonl([job_line("cli-1"), job_line("cli-2")]))
    code, err = await run_cli("submit", "-c", str(config), str(jobs_file))
    assert code == 0, err

    keys = ["http-1", "http-2", "http-3", "cli-1", "cli-2"]
    for key in keys:
        job = await daemon.wait_job(key, "harvested")
        assert job["remote_id"] and job["attempts"] == 1 and job["reason"] is None
        assert job["created_at"].endswith("Z") and job["updated_at"] >= job["created_at"]
        assert (Path(job["output"]) / "MANIFEST.json").is_file()

    stats = await emulator_stats(emu, session)
    assert stats["playment"]["creates"] == len(keys)
    assert stats["playment"]["duplicate_creates"] == 0

    status, text = await daemon.get("/metrics")
    assert status == 200
    async with session.get(daemon.base + "/metrics") as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=")
    requests = metric_samples(text, "harvester_requests_total")
    by_endpoint: dict[str, float] = {}
    for labels, value in requests:
        assert labels["provider"] == "playment"
        by_endpoint[labels["endpoint"]] = by_endpoint.get(labels["endpoint"], 0) + value
    api_requests = sum(v for e, v in by_endpoint.items() if e != "download")
    assert by_endpoint["create"] == stats["playment"]["creates"]
    assert api_requests == stats["playment"]["requests"]
    assert by_endpoint["download"] == stats["storage"]["requests"]
    jobs = {
        labels["state"]: value
        for labels, value in metric_samples(text, "harvester_jobs")
        if labels["provider"] == "playment"
    }
    assert jobs["harvested"] == len(keys)
    assert jobs["new"] == jobs["running"] == jobs["failed"] == 0  # zeros are reported too
    harvested = metric_samples(text, "harvester_transitions_total")
    assert {"provider": "playment", "state": "harvested"} in [labels for labels, _ in harvested]
    assert sum(v for _, v in metric_samples(text, "harvester_downloaded_bytes_total")) > 0
    assert metric_samples(text, "harvester_poll_latency_seconds_count")
    # Every provider endpoint that was called has its duration histogram, downloads included.
    timed = {
        labels["endpoint"]: value
        for labels, value in metric_samples(text, "harvester_request_duration_seconds_count")
    }
    assert timed.keys() == by_endpoint.keys()
    assert all(timed[e] == by_endpoint[e] for e in by_endpoint), (timed, by_endpoint)
    # ...and so does every route of the daemon's own API that was answered.
    routes = {
        (labels["route"], labels["method"], labels["status"])
        for labels, _ in metric_samples(text, "harvester_http_request_duration_seconds_count")
    }
    assert {("/jobs", "POST", "201"), ("/readyz", "GET", "200")} <= routes
    assert ("/jobs/{provider}/{key}", "GET", "200") in routes  # the template, not the key
    (build,) = metric_samples(text, "harvester_build_info")
    assert build[1] == 1 and build[0]["version"] == __version__
    assert metric_samples(text, "process_resident_memory_bytes")
    assert metric_samples(text, "python_info")
    assert_dashboard_queries_name_exported_metrics(text)
    # Nothing in the metrics names a job or a secret.
    assert "http-1" not in text and "cli-1" not in text and "daemon-test-key" not in text

    # One event per state change, as JSON lines.
    events = [e for e in daemon.events() if e.get("event") == "job state"]
    assert {e["job"] for e in events if e["state"] == "harvested"} == set(keys)


async def test_a_bad_body_adds_nothing_and_names_the_line(
    tmp_path: Path, start_emulator: StartEmulator, ready_daemon: ReadyDaemon
) -> None:
    emu = await start_emulator()
    daemon = await ready_daemon(emu)

    body = jsonl([job_line("good-1"), {"provider": "playment", "reference_id": "x"}])
    body += b"{not json\n"
    status, doc = await daemon.post("/jobs", body)
    assert status == 400, doc
    assert [e["line"] for e in doc["errors"]] == [2, 3]
    assert "payload" in doc["errors"][0]["error"]
    assert "not valid JSON" in doc["errors"][1]["error"]
    assert "nothing was added" in doc["error"]
    status, doc = await daemon.get("/jobs/playment/good-1")
    assert status == 404 and "error" in doc

    # In an array, the line number is the item's position.
    array = json.dumps([job_line("good-2"), {"provider": "nope", "reference_id": "y"}]).encode()
    status, doc = await daemon.post("/jobs", array)
    assert status == 400 and doc["errors"][0]["line"] == 2
    assert "not configured" in doc["errors"][0]["error"]

    for bad in (b"", b"   \n", b"[1, 2", b'[{"a": 1}] trailing'):
        status, doc = await daemon.post("/jobs", bad)
        assert status == 400 and doc["error"], bad

    # A different job under a key the store already has is a conflict.
    status, _ = await daemon.post("/jobs", jsonl([job_line("good-3")]))
    assert status == 201
    status, doc = await daemon.post("/jobs", jsonl([job_line("good-4"), job_line("good-3", 3)]))
    assert status == 409 and doc["errors"][0]["line"] == 2
    status, _ = await daemon.get("/jobs/playment/good-4")
    assert status == 404

    # Errors are JSON everywhere, aiohttp's own included.
    status, doc = await daemon.get("/nope")
    assert status == 404 and doc == {"error": "no such route"}
    async with daemon.session.delete(daemon.base + "/jobs") as r:
        assert r.status == 405 and "error" in await r.json()


async def test_the_job_routes_need_the_token_and_the_probes_do_not(
    tmp_path: Path, start_emulator: StartEmulator, ready_daemon: ReadyDaemon
) -> None:
    emu = await start_emulator()
    secret = "s3cret-token-value"
    daemon = await ready_daemon(
        emu, token_env="HARVESTER_API_TOKEN", env={"HARVESTER_API_TOKEN": secret}
    )

    body = jsonl([job_line("tok-1")])
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": secret}):
        status, doc = await daemon.post("/jobs", body, headers=headers)
        assert status == 401 and "Bearer" in doc["error"], headers
        status, _ = await daemon.get("/jobs/playment/tok-1", headers=headers)
        assert status == 401
    auth = {"Authorization": f"Bearer {secret}"}
    status, doc = await daemon.post("/jobs", body, headers=auth)
    assert status == 201, doc
    status, doc = await daemon.get("/jobs/playment/tok-1", headers=auth)
    assert status == 200 and doc["key"] == "tok-1"

    for path in ("/healthz", "/readyz", "/metrics"):
        status, text = await daemon.get(path)
        assert status == 200, path
        assert secret not in str(text)
    assert secret not in daemon.log()


async def run_cli(*args: str, **env: str) -> tuple[int, str]:
    done = await cli_process(*args, env=child_env(**env))
    return done.returncode, done.stderr.decode()


async def test_a_bad_start_exits_2_with_one_line(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlisten = "nowhere"\n')
    code, err = await run_cli("run", "-c", str(bad))
    assert code == 2 and err.count("\n") == 1 and "server.listen" in err, err

    emu = await start_emulator()
    config = write_config(tmp_path, emu, free_port(), token_env="HARVESTER_API_TOKEN")
    code, err = await run_cli("run", "-c", str(config))  # the token's variable is not set
    assert code == 2 and "HARVESTER_API_TOKEN" in err, err

    # Refused credentials are fatal: nothing can progress until a person fixes them.
    refusing = await start_emulator({"playment": {"valid_api_keys": ["another-key"]}})
    config = write_config(tmp_path, refusing, free_port())
    code, err = await run_cli("run", "-c", str(config))
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("harvester: playment"), err
    assert API_KEY not in err

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, emu, port)
        code, err = await run_cli("run", "-c", str(config))
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("harvester: server.listen") and "cannot listen" in last
