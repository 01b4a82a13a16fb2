from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from harvester.emulator.playment_model import PlaymentModel, job_duration
from harvester.emulator.scenario import (
    Scenario,
    ScenarioError,
    load_scenario,
    parse_fault,
    parse_scenario,
)
from harvester.errors import ConfigError

SCENARIOS = Path(__file__).resolve().parents[2] / "configs" / "scenarios"


def test_no_file_means_defaults() -> None:
    s = load_scenario(None)
    assert s == Scenario()
    assert s.seed == 1
    assert s.playment.job_duration_s == 2.0
    assert s.playment.statuses == ("created", "in_progress", "completed")
    assert s.playment.points_per_frame == (40_000, 40_000)
    assert s.playment.rate_limit.rate_per_s == 0
    assert s.storage.url_ttl_s == 300 and s.storage.expire_first_n == 0
    assert s.faults == ()
    assert s.cognite.job_duration_s == 2.0 and s.cognite.rate_limit.retry_after == "none"
    assert s.bentley.required_scope == "itwin-platform" and s.bentley.list_page_size == 5000
    assert s.bentley.rate_limit.retry_after == "seconds"
    assert s.modzy.results_404_s == 1.0 and s.modzy.rate_limit.rate_per_s == 0
    assert s.oauth.token_ttl_s == 3600 and s.oauth.clients == ()


def test_new_provider_sections_parse() -> None:
    s = parse_scenario(
        {
            "cognite": {"segments_per_item": 2, "missing_files": [5, "x"], "failure_rate": 0.5},
            "bentley": {"rate_limit": {"rate_per_s": 8.3, "burst": 50}, "expire_first_n": 2},
            "modzy": {"valid_api_keys": ["k"], "failure_rate": 0.2, "timeout_rate": 0.3},
            "oauth": {"clients": {"id-1": "s-1", "id-2": "s-2"}, "token_ttl_s": 0.5},
        }
    )
    assert s.cognite.segments_per_item == (2, 2) and s.cognite.missing_files == (5, "x")
    assert s.bentley.rate_limit.rate_per_s == 8.3 and s.bentley.expire_first_n == 2
    assert s.modzy.valid_api_keys == ("k",)
    assert s.oauth.clients == (("id-1", "s-1"), ("id-2", "s-2"))
    faults = [{"kind": "5xx", "provider": p} for p in ("cognite", "bentley", "modzy", "token")]
    assert [f.provider for f in parse_scenario({"faults": faults}).faults] == [
        "cognite", "bentley", "modzy", "token",
    ]  # fmt: skip


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_scenarios_load(path: Path) -> None:
    load_scenario(path)


def test_default_toml_documents_the_defaults() -> None:
    assert load_scenario(SCENARIOS / "default.toml") == Scenario()


def test_points_per_frame_takes_an_int_or_a_range() -> None:
    assert parse_scenario({"playment": {"points_per_frame": 7}}).playment.points_per_frame == (
        7,
        7,
    )
    ranged = parse_scenario({"playment": {"points_per_frame": [3, 9]}})
    assert ranged.playment.points_per_frame == (3, 9)


@pytest.mark.parametrize(
    ("doc", "named"),
    [
        ({"sed": 1}, "'sed'"),
        ({"playment": {"job_duration": 1}}, "'playment.job_duration'"),
        ({"playment": {"rate_limit": {"rps": 1}}}, "'playment.rate_limit.rps'"),
        ({"storage": {"ttl": 1}}, "'storage.ttl'"),
        ({"faults": [{"kind": "429", "retry_after_s": 1, "statuss": 1}]}, "faults[0].statuss"),
        ({"faults": [{"kind": "reset", "status": 502}]}, "faults[0].status"),
        ({"cognite": {"job_time": 1}}, "'cognite.job_time'"),
        # Cognite never sends Retry-After and Bentley always does: not configurable.
        (
            {"cognite": {"rate_limit": {"retry_after": "seconds"}}},
            "'cognite.rate_limit.retry_after'",
        ),
        ({"bentley": {"rate_limit": {"retry_after": "none"}}}, "'bentley.rate_limit.retry_after'"),
        ({"modzy": {"results_404": 1}}, "'modzy.results_404'"),
        ({"oauth": {"ttl": 1}}, "'oauth.ttl'"),
    ],
)
def test_unknown_keys_are_errors_naming_the_key(doc: dict[str, Any], named: str) -> None:
    with pytest.raises(ScenarioError, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse_scenario(doc)


@pytest.mark.parametrize(
    "doc",
    [
        {"seed": "1"},
        {"seed": True},
        {"playment": {"statuses": ["created", "running"]}},
        {"playment": {"points_per_frame": [9, 3]}},
        {"playment": {"attachments_redirect_status": 301}},
        {"playment": {"result_variant": "polygons"}},
        {"playment": {"rate_limit": {"retry_after": "minutes"}}},
        {"playment": {"valid_api_keys": [""]}},
        {"playment": {"job_duration_s": 10, "job_duration_max_s": 5}},
        {"storage": {"chunk_size": 0}},
        {"faults": [{"kind": 429}]},
        {"faults": [{"provider": "storage"}]},
        {"faults": [{"kind": "5xx", "status": 404}]},
        {"faults": [{"kind": "slow", "probability": 1.5}]},
        {"faults": ["429"]},
        {"faults": [{"kind": "429", "provider": "azure"}]},
        {"cognite": {"failure_rate": 1.5}},
        {"cognite": {"missing_files": [0]}},
        {"cognite": {"vertices_per_polygon": [2, 5]}},
        {"bentley": {"list_page_size": 5001}},
        {"bentley": {"progress_step": 0}},
        {"modzy": {"failure_rate": 0.6, "timeout_rate": 0.6}},
        {"modzy": {"valid_api_keys": "k"}},
        {"oauth": {"clients": {"id": ""}}},
        {"oauth": {"clients": {"id": 3}}},
    ],
)
def test_bad_values_are_errors(doc: dict[str, Any]) -> None:
    with pytest.raises(ScenarioError):
        parse_scenario(doc)


def test_faults_parse_with_defaults() -> None:
    f = parse_fault({"kind": "429"})
    assert f.provider == "playment" and f.start_s == 0 and math.isinf(f.duration_s)
    assert f.count is None and f.probability == 1.0 and f.retry_after == "seconds"
    g = parse_fault({"kind": "reset", "provider": "storage", "count": 2, "when": "after"})
    assert (g.provider, g.count, g.when) == ("storage", 2, "after")


def test_scenario_errors_are_config_errors_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[playment]\nnum_lables = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*playment\.num_lables"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("seed = = 1\n")
    with pytest.raises(ScenarioError, match="invalid TOML"):
        load_scenario(broken)


def test_playment_durations_spread_by_job_id() -> None:
    assert parse_scenario({}).playment.job_duration_max_s is None
    scenario = parse_scenario({"playment": {"job_duration_s": 5, "job_duration_max_s": 90}})
    now = [1000.0]
    model = PlaymentModel(scenario.playment, seed=1, clock=lambda: now[0])
    body = {"work_flow_id": "w", "data": {"image_url": "https://example.invalid/a.png"}}
    jobs = [
        model.create_job("p", model.validate_job("p", {**body, "reference_id": f"r{i}"}))
        for i in range(900)
    ]
    durations = [model.duration(j.job_id) for j in jobs]
    assert all(5.0 <= d <= 90.0 for d in durations)
    # spread evenly: each ninth of the range holds about a ninth of the jobs
    ninths = [
        sum(1 for d in durations if 5 + k * 85 / 9 <= d < 5 + (k + 1) * 85 / 9) for k in range(9)
    ]
    assert all(60 <= n <= 140 for n in ninths), ninths
    # a job completes at its own duration, and the same id always has the same one
    job, d = jobs[0], durations[0]
    now[0] = 1000.0 + d - 0.01
    assert model.status(job) != "completed"
    now[0] = 1000.0 + d + 1e-6
    assert model.status(job) == "completed"
    assert job_duration(5.0, 90.0, job.job_id) == d
