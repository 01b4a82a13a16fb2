"""Hostile answers for the proxy (``proxy.Malformed.serve``) and one engine run behind it.

The answers: bodies that never end, bodies trickled a few bytes at a time, and gzip bombs
(a small body that inflates a thousandfold). Each is bounded on the serving side too, so a
harvester that does not stop reading still ends (that is what the tests tell apart).

``harvest_through`` runs the engine over Playment and Cognite jobs against the emulator behind
the proxy, with the test's config overrides, and returns every job as stored.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from aiohttp import web

from harvester.config import Config, parse_config
from harvester.emulator.scenario import parse_scenario
from harvester.emulator.server import Emulator
from harvester.engine import Engine
from harvester.jobs import Job, job_key
from harvester.store.base import NewJob
from tests.integration.helpers import (
    payload,
    stored,
)
from tests.loopback import Serve

from .proxy import Malformed, Proxy


def gzip_of(head: bytes, unit: bytes, total: int) -> bytes:
    """A gzip body that inflates to ``head`` then ``unit`` repeated up to ``total`` bytes."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [packer.compress(head)]
    block = unit * max(1, (1 << 20) // len(unit))
    left = total - len(head)
    while left > 0:
        piece = block[:left]
        out.append(packer.compress(piece))
        left -= len(piece)
    out.append(packer.flush())
    return b"".join(out)


def bomb(body: bytes, content_type: str = "application/octet-stream") -> Serve:
    """Serves ``body`` (gzip) as ``Content-Encoding: gzip``: the client inflates it."""

    async def serve(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=body, headers={"Content-Encoding": "gzip", "Content-Type": content_type}
        )

    return serve


def endless(head: bytes, unit: bytes, *, upto: int, content_type: str = "text/plain") -> Serve:
    """Streams ``head`` then ``unit`` again and again (chunked, no length) up to ``upto``
    bytes, or until the client goes away."""

    async def serve(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        await resp.prepare(request)
        block = unit * max(1, (64 << 10) // len(unit))
        sent = 0
        try:
            await resp.write(head)
            while sent < upto:
                await resp.write(block)
                sent += len(block)
        except (ConnectionError, RuntimeError):
            return resp  # the client stopped reading: what a bounded reader does
        await resp.write_eof()
        return resp

    return serve


def trickle(body: bytes, *, every_s: float, step: int = 1) -> Serve:
    """Sends ``body`` ``step`` bytes at a time, one step every ``every_s`` seconds."""

    async def serve(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.content_length = len(body)
        await resp.prepare(request)
        try:
            for i in range(0, len(body), step):
                await resp.write(body[i : i + step])
                await anyio.sleep(every_s)
        except (ConnectionError, RuntimeError):
            return resp
        await resp.write_eof()
        return resp

    return serve


@dataclass(frozen=True)
class Case:
    """One hostile answer, given to the job ``bad-<id>`` of ``provider`` at ``place``."""

    id: str
    provider: str
    place: str
    serve: Serve | None = None
    location: str | None = None

    @property
    def key(self) -> str:
        return job_key(f"bad-{self.id}")


@dataclass
class Run:
    config: Config
    jobs: dict[str, Job]  #: "provider/key" -> the job as stored at the end
    served: dict[str, int]  #: case id -> hostile answers given
    elapsed_s: float


GOOD_JOBS = [
    NewJob("playment", "good-p1", "good-p1", None, payload(2), "hostile"),
    NewJob("playment", "good-p2", "good-p2", None, payload(2), "hostile"),
    NewJob("cognite", "good-c", "good-c", None,
           {"items": [{"fileId": 1}], "points": [{"x": 0.5, "y": 0.5, "label": 1}]}, "hostile"),
]  # fmt: skip


def _bad_job(case: Case, i: int) -> tuple[NewJob, bytes]:
    """The job ``case`` targets and the marker its create request carries."""
    ref = f"bad-{case.id}"
    if case.provider == "playment":
        return (
            NewJob("playment", case.key, ref, None, payload(2), "hostile"),
            f'"reference_id":"{ref}"'.encode(),
        )
    assert case.provider == "cognite", case.provider
    body = {"items": [{"fileId": 7000 + i}], "points": [{"x": 0.5, "y": 0.5, "label": 1}]}
    return NewJob("cognite", case.key, ref, None, body, "hostile"), f'"fileId":{7000 + i}'.encode()


async def harvest_through(
    root: Path,
    cases: Sequence[Case],
    *,
    provider_settings: Mapping[str, Any] | None = None,
    harvest_settings: Mapping[str, Any] | None = None,
    within_s: float = 90.0,
) -> Run:
    """Harvest ``cases``' jobs and ``GOOD_JOBS`` against the emulator behind the proxy."""
    bad = [_bad_job(c, i) for i, c in enumerate(cases)]
    malformed = [
        Malformed(c.id, c.provider, marker, c.place, b"", serve=c.serve, location=c.location)
        for c, (_, marker) in zip(cases, bad, strict=True)
    ]
    scenario = parse_scenario(
        {
            "seed": 11,
            "playment": {"job_duration_s": 0.2, "points_per_frame": [300, 600]},
            "cognite": {"job_duration_s": 0.2},
        }
    )
    async with (
        Emulator(scenario) as emu,
        Proxy(emu.urls["playment"].rsplit("/", 1)[0], malformed) as px,
    ):
        common = {
            "rate_per_s": 0,
            "poll_min_s": 0.1,
            "poll_max_s": 0.3,
            "backoff_base_s": 0.05,
            "backoff_max_s": 0.3,
            "request_timeout_s": 5,
            **(provider_settings or {}),
        }
        doc = {
            "store": {"url": "sqlite://state.db"},
            "output": {"dir": "out"},
            "harvest": {"max_attempts": 2, **(harvest_settings or {})},
            "providers": {
                "playment": {**common, "base_url": px.url("playment"), "project_id": "hi",
                             "api_key_env": "BI_PLAYMENT_KEY"},
                "cognite": {**common, "base_url": px.url("cognite"), "project": "hi",
                            "token_url": px.url("token"), "client_id": "hi",
                            "client_secret_env": "BI_COGNITE_SECRET"},
            },
        }  # fmt: skip
        config = parse_config(doc, source=root / "config.toml")
        async with stored(config, [j for j, _ in bad] + GOOD_JOBS) as store:
            started = anyio.current_time()
            with anyio.fail_after(within_s):
                await Engine(config, store).run()
            elapsed = anyio.current_time() - started
            jobs = {f"{j.provider}/{j.key}": j for j in await store.jobs()}
        return Run(config, jobs, dict(px.served), elapsed)
