"""Errors raised in place of another keep it as their cause (``raise ... from exc``), so a
traceback shows what the disk, the import system or the bucket said; the places that drop
it (``from None``) say why beside the raise."""

from __future__ import annotations

import errno
import sys

import pytest

from harvester.config import StoreConfig
from harvester.errors import ConfigError, OutputError, StoreError
from harvester.fsutil import disk_errors
from harvester.objstore import Bucket
from harvester.store import make_store
from harvester.store.binding import read_marker


def test_a_disk_error_keeps_the_os_error() -> None:
    oserror = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OutputError) as info, disk_errors("labels/a.npy"):
        raise oserror
    assert info.value.__cause__ is oserror
    assert info.value.errno == errno.ENOSPC


def test_a_missing_postgres_driver_keeps_the_import_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "harvester.store.postgres", None)  # import fails
    with pytest.raises(ConfigError, match=r"install harvester\[postgres\]") as info:
        make_store(StoreConfig(url="postgresql://db.invalid/harvester"))
    assert isinstance(info.value.__cause__, ImportError)


class _RefusingBucket(Bucket):
    """A bucket whose every read fails as ``Bucket.read`` reports it (no store behind it)."""

    def __init__(self, error: OutputError) -> None:  # no store behind it
        self.error = error

    def url(self, rel: str = "") -> str:
        return f"s3://bucket/{rel}"

    def read(self, rel: str, limit: int) -> bytes | None:
        raise self.error


def test_an_unreadable_bucket_marker_keeps_the_output_error() -> None:
    refused = OutputError("cannot read s3://bucket/marker: permission denied")
    with pytest.raises(StoreError, match="permission denied") as info:
        read_marker(_RefusingBucket(refused))
    assert info.value.__cause__ is refused
