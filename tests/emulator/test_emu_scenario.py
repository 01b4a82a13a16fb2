from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

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
        {"storage": {"chunk_size": 0}},
        {"faults": [{"kind": 429}]},
        {"faults": [{"provider": "storage"}]},
        {"faults": [{"kind": "5xx", "status": 404}]},
        {"faults": [{"kind": "slow", "probability": 1.5}]},
        {"faults": ["429"]},
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
