"""Jobs files: every bad line named by file:line, and nothing added from a bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harvester.config import load_config
from harvester.errors import JobsFileError
from harvester.jobsfile import parse_jobs_text, read_jobs_files

CONFIG = """
[providers.playment]
api_key_env = "K"
project_id = "p"
"""
PAYLOAD = {"data": {"sensor_data": {"frames": [{"frame_id": "f1"}]}}, "work_flow_id": "wf"}
IMAGE = {"data": {"image_url": "u"}, "work_flow_id": "wf"}


@pytest.fixture
def config(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "c.toml"
    path.write_text(CONFIG)
    return load_config(path)


def line(**kw: object) -> str:
    return json.dumps(kw)


def test_good_lines(config) -> None:  # type: ignore[no-untyped-def]
    text = "\n".join(
        [
            line(provider="playment", reference_id="scan-1", payload=PAYLOAD),
            "",
            line(provider="playment", job_id="abc"),
            line(provider="playment", reference_id="scan-1", payload=PAYLOAD),  # same twice: once
            line(provider="playment", reference_id="../../etc", payload=PAYLOAD),
        ]
    ).encode()
    jobs = parse_jobs_text(text, source="j.jsonl", config=config)
    assert [j.key for j in jobs][:2] == ["scan-1", "abc"]
    assert jobs[1].remote_id == "abc" and jobs[1].payload is None
    assert "/" not in jobs[2].key and not jobs[2].key.startswith(".")
    assert jobs[0].source == "j.jsonl:1"


BAD = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (line(provider="nope", reference_id="a", payload=PAYLOAD), "provider 'nope' is not configured"),
    (line(reference_id="a", payload=PAYLOAD), "'provider' is missing"),
    (line(provider="playment", payload=PAYLOAD), "needs 'reference_id'"),
    (line(provider="playment", reference_id="a"), "needs a 'payload'"),
    (line(provider="playment", reference_id="", payload=PAYLOAD), "non-empty string"),
    (line(provider="playment", reference_id="a\nb", payload=PAYLOAD), "control characters"),
    (line(provider="playment", reference_id="a", payload={"data": {}}), "payload.data"),
    (line(provider="playment", job_id="1", payload=PAYLOAD), "takes no payload"),
    (line(provider="playment", reference_id="a", payload=PAYLOAD, extra=1), "unknown key 'extra'"),
    ('{"provider": "playment", "provider": "x", "job_id": "1"}', "appears twice"),
    ('{"provider": "playment", "job_id": NaN}', "NaN is not valid JSON"),
    (line(provider="playment", reference_id="x" * 600, payload=PAYLOAD), "longer than"),
    (line(provider="playment", job_id=True), "non-empty string"),
]


@pytest.mark.parametrize(("bad", "needle"), BAD)
def test_bad_line_is_named(config, bad: str, needle: str) -> None:  # type: ignore[no-untyped-def]
    good = line(provider="playment", reference_id="ok", payload=PAYLOAD)
    with pytest.raises(JobsFileError) as info:
        parse_jobs_text(f"{good}\n{bad}\n".encode(), source="j.jsonl", config=config)
    text = str(info.value)
    assert text.startswith("j.jsonl:2: "), text
    assert needle in text
    assert "nothing from j.jsonl was added" in text


def test_conflicting_lines(config) -> None:  # type: ignore[no-untyped-def]
    a = line(provider="playment", reference_id="a", payload=PAYLOAD)
    b = line(
        provider="playment",
        reference_id="a",
        payload={"data": {"image_url": "u"}, "work_flow_id": "wf"},
    )
    with pytest.raises(
        JobsFileError, match=r"j\.jsonl:2: job key playment/a was already used by j\.jsonl:1"
    ):
        parse_jobs_text(f"{a}\n{b}\n".encode(), source="j.jsonl", config=config)


def test_huge_line(config) -> None:  # type: ignore[no-untyped-def]
    huge = line(provider="playment", reference_id="a", payload={"data": {"x": "y" * (5 << 20)}})
    with pytest.raises(JobsFileError, match=r"j\.jsonl:1: line is .* bytes"):
        parse_jobs_text(huge.encode(), source="j.jsonl", config=config)


def test_files_are_all_or_nothing(config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    one = tmp_path / "one.jsonl"
    one.write_text(line(provider="playment", reference_id="a", payload=PAYLOAD) + "\n")
    two = tmp_path / "two.jsonl"
    two.write_text(
        line(
            provider="playment",
            reference_id="a",
            payload={"data": {"image_url": "u"}, "work_flow_id": "wf"},
        )
    )
    with pytest.raises(JobsFileError, match=r"two\.jsonl:1"):
        read_jobs_files([one, two], config)
    with pytest.raises(JobsFileError, match="cannot read jobs file"):
        read_jobs_files([tmp_path / "missing.jsonl"], config)
    assert len(read_jobs_files([one, one], config)) == 1
