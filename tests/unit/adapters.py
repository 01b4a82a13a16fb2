"""Shared by the adapter tests (``test_<provider>_adapter.py``): a job row, a recorded answer,
and an in-memory ``Client`` and ``HarvestIO``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson
from multidict import CIMultiDict

from harvester.jobs import Job, JobState
from harvester.providers.base import RemoteFile
from harvester.wire import RequestSpec, Resolver, Response

T = TypeVar("T")


def make_job(provider: str, key: str, remote_id: str, /, **kw: Any) -> Job:
    """A running job of ``provider`` whose reference is its key; ``kw`` overrides any field."""
    fields: dict[str, Any] = {
        "provider": provider,
        "key": key,
        "reference_id": key,
        "remote_id": remote_id,
        "state": JobState.RUNNING,
        "created_at": 0.0,
        "updated_at": 0.0,
    }
    fields.update(kw)
    return Job(**fields)


def answer(
    status: int,
    body: Any,
    *,
    url: str,
    request_id: str | None,
    headers: dict[str, str] | None = None,
) -> Response:
    """A provider's answer: ``body`` as sent (bytes) or as JSON (anything else)."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(status, CIMultiDict(headers or {}), raw, url, request_id)


class FakeClient:
    """A ``Client`` that is an in-memory function from spec to response."""

    def __init__(self, handler: Callable[[RequestSpec], Response]) -> None:
        self.handler = handler
        self.specs: list[RequestSpec] = []

    async def call(self, spec: RequestSpec, parse: Callable[[Response], T]) -> T:
        self.specs.append(spec)
        return parse(self.handler(spec))


class RecordingIO:
    """A ``HarvestIO`` that keeps what a harvest writes in ``files``; every way out to the
    network fails the test unless a subclass (for an adapter that uses it) says otherwise."""

    input_urls: frozenset[str] = frozenset()
    provider = "this adapter"

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    async def request(self, spec: RequestSpec) -> Response:
        raise AssertionError(f"{self.provider}'s harvest sends no request")

    async def fetch(self, resolve: Resolver, *, what: str) -> bytes:
        raise AssertionError(f"{self.provider}'s harvest fetches nothing")

    async def labels(self, frame: str, resolve: Resolver, fmt: Any) -> None:
        raise AssertionError(f"{self.provider} has no label arrays")

    async def download(self, relpath: str, resolve: Resolver) -> None:
        raise AssertionError(f"{self.provider}'s harvest downloads nothing")

    async def download_files(self, files: Sequence[RemoteFile]) -> None:
        for f in files:
            await self.download(f.relpath, f.resolve)

    async def write_bytes(self, relpath: str, data: bytes) -> None:
        self.files[relpath] = data

    async def write_json(self, relpath: str, obj: Any) -> None:
        await self.write_bytes(relpath, orjson.dumps(obj))
