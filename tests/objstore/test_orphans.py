"""harvester.objorphans against moto's S3 server: which uploads it aborts, and how it fails."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from harvester.config import OutputConfig, SecretRef, parse_location
from harvester.objorphans import S3Orphans

from .servers import Backend, make_backend


@pytest.fixture
def s3(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    for got in make_backend("s3", request.config):
        for k, v in got.env.items():
            monkeypatch.setenv(k, v)
        yield got


def output_config(backend: Backend, url: str) -> OutputConfig:
    """[output] as harvester's config gives it: keys by reference (the backend's env)."""
    out = backend.output
    return OutputConfig(
        url=url,
        endpoint=out["endpoint"],
        region=out["region"],
        access_key_id=SecretRef("output.access_key_id", env=out["access_key_id_env"]),
        secret_access_key=SecretRef("output.secret_access_key", env=out["secret_access_key_env"]),
    )


def orphans_for(backend: Backend, url: str | None = None) -> S3Orphans:
    cfg = output_config(backend, url or backend.url)
    cleaner = S3Orphans.for_output(parse_location(cfg.url or ""), cfg)
    assert cleaner is not None
    return cleaner


def start_upload(backend: Backend, rel: str) -> str:
    key = f"{backend.prefix}/{rel}"
    upload: dict[str, Any] = backend.client.create_multipart_upload(Bucket=backend.bucket, Key=key)
    backend.client.upload_part(
        Bucket=backend.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"p" * 100
    )
    return str(upload["UploadId"])


def test_aborts_every_open_upload_under_the_folder_and_nothing_else(s3: Backend) -> None:
    # (The listing's paging is not exercised: moto answers every upload in one page
    # whatever MaxUploads asks.)
    for name in ("a.npy", "labels/f-000.npy", "labels/f-001.npy"):
        start_upload(s3, f"playment/job-1/{name}")
    start_upload(s3, "playment/job-10/a.npy")  # a folder whose name starts the same
    start_upload(s3, "playment/job-2/a.npy")
    cleaner = orphans_for(s3)
    with capture_logs() as logs:
        assert cleaner.abort_under("playment/job-1") == 3
    assert s3.unfinished("playment/job-1") == []
    assert s3.unfinished("playment/job-10") == [f"{s3.prefix}/playment/job-10/a.npy"]
    assert s3.unfinished("playment/job-2") == [f"{s3.prefix}/playment/job-2/a.npy"]
    assert [entry["uploads"] for entry in logs if "aborted" in entry["event"]] == [3]
    assert cleaner.abort_under("playment/job-1") == 0  # nothing left: a no-op


def test_a_store_that_refuses_is_logged_and_never_fails_the_publish(s3: Backend) -> None:
    cleaner = orphans_for(s3, "s3://no-such-bucket-here/runs/a")
    with capture_logs() as logs:
        assert cleaner.abort_under("playment/job-1") == 0
    [warning] = [entry for entry in logs if entry["log_level"] == "warning"]
    assert "lifecycle rule" in warning["event"]
    assert warning["output"] == "s3://no-such-bucket-here/runs/a/playment/job-1"
    assert "NoSuchBucket" in warning["error"]
    assert not any(secret in str(logs) for secret in s3.env.values())


def test_without_boto3_there_is_no_cleaner_and_a_warning_says_so(
    s3: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 -> ImportError
    cfg = output_config(s3, s3.url)
    with capture_logs() as logs:
        assert S3Orphans.for_output(parse_location(s3.url), cfg) is None
    [warning] = logs
    assert "harvester[s3]" in warning["event"] and warning["log_level"] == "warning"
