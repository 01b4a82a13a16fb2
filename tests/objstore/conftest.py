"""Fixtures for output.dir in object storage (see ``servers``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .servers import Backend, make_backend


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["s3", "az"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    for got in make_backend(request.param, request.config):
        for k, v in got.env.items():
            monkeypatch.setenv(k, v)
        yield got
