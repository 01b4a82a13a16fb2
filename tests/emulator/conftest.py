"""Fixtures for the emulator tests: a started emulator, a small raw-HTTP Playment client and
helpers for the other providers (tokens, introspection, bounded polling).

The clients here are deliberately naive (plain aiohttp calls, no harvester code): these tests
check the emulator against the API description, not against harvester's own client.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import anyio
import pytest
from multidict import CIMultiDict

from harvester.emulator import Emulator
from tests.emulated import StartEmulator, emulator_fixtures

API_KEY = "test-key-123"
PROJECT = "proj-1"
FAST: dict[str, Any] = {
    "playment": {"job_duration_s": 0.3, "points_per_frame": [500, 2000]},
    "cognite": {"job_duration_s": 0.3},
    "bentley": {"job_duration_s": 0.3, "terminating_s": 0.1, "blob_bytes": 3000},
    "modzy": {"job_duration_s": 0.3, "results_404_s": 0.15},
}
WAIT_S = 5.0  # upper bound for any wait in these tests; jobs take 0.3 s
CLIENT_ID = "client-1"
CLIENT_SECRET = "secret-1"


start_emulator, session = emulator_fixtures(FAST, timeout_s=WAIT_S)


def point_cloud_body(reference_id: str, frames: tuple[str, ...] = ("f0",)) -> dict[str, Any]:
    return {
        "reference_id": reference_id,
        "work_flow_id": "wf-1",
        "data": {
            "sensor_data": {
                "frames": [{"frame_id": f, "ego_pose": {}, "sensors": []} for f in frames],
                "sensor_meta": [{"id": "lidar", "modality": "lidar"}],
            }
        },
    }


class PlaymentClient:
    def __init__(self, emu: Emulator, session: aiohttp.ClientSession) -> None:
        self.emu = emu
        self.session = session
        self.base = emu.urls["playment"]
        self.headers = {"x-api-key": API_KEY}

    async def request(
        self, method: str, path: str, *, key: str | None = API_KEY, **kw: Any
    ) -> tuple[int, Any]:
        headers = {"x-api-key": key} if key is not None else {}
        async with self.session.request(method, self.base + path, headers=headers, **kw) as r:
            return r.status, await r.json(content_type=None)

    async def create(self, body: dict[str, Any], path: str | None = None) -> tuple[int, Any]:
        return await self.request("POST", path or f"/v1/projects/{PROJECT}/jobs", json=body)

    async def create_job(self, reference_id: str, frames: tuple[str, ...] = ("f0",)) -> str:
        status, doc = await self.create(point_cloud_body(reference_id, frames))
        assert status == 200, doc
        return str(doc["data"]["job_id"])

    async def job(self, job_id: str, version: str = "v1") -> dict[str, Any]:
        status, doc = await self.request("GET", f"/{version}/projects/{PROJECT}/jobs/{job_id}")
        assert status == 200, doc
        return dict(doc["data"])

    async def wait_completed(self, job_id: str) -> dict[str, Any]:
        seen: list[str] = []
        with anyio.fail_after(WAIT_S):
            while True:
                doc = await self.job(job_id)
                if not seen or seen[-1] != doc["status"]:
                    seen.append(doc["status"])
                if doc["status"] == "completed":
                    doc["_seen"] = seen
                    return doc
                await anyio.sleep(0.03)

    async def resolve(self, url: str) -> tuple[int, str | None]:
        """Ask the attachments API for ``url``; returns (status, Location)."""
        async with self.session.get(
            f"{self.base}/v1/attachments",
            params={"url": url},
            headers=self.headers,
            allow_redirects=False,
        ) as r:
            return r.status, r.headers.get("Location")

    async def download(self, url: str) -> bytes:
        """Resolve, then fetch the signed URL without any credential, as a client must."""
        status, location = await self.resolve(url)
        assert status == 302 and location, (status, location)
        async with self.session.get(location) as r:
            assert r.status == 200, await r.text()
            return await r.read()

    async def introspect(self, method: str, path: str, **kw: Any) -> Any:
        origin = self.base.removesuffix("/playment")
        async with self.session.request(method, f"{origin}/_emulator{path}", **kw) as r:
            assert r.status == 200, await r.text()
            return await r.json()


MakeClient = Callable[..., Awaitable[PlaymentClient]]


@pytest.fixture
async def make_client(start_emulator: StartEmulator, session: aiohttp.ClientSession) -> MakeClient:
    async def make(overrides: dict[str, Any] | None = None) -> PlaymentClient:
        return PlaymentClient(await start_emulator(overrides), session)

    return make


@pytest.fixture
async def api(make_client: MakeClient) -> PlaymentClient:
    return await make_client()


# -- helpers for the providers behind OAuth2 and the introspection endpoints ---------------


class RawApi:
    """One provider's API as plain aiohttp calls: ``request`` sends to ``base`` + path with
    the client's headers (or the ones given) and returns status, headers and the JSON body."""

    def __init__(
        self, emu: Emulator, session: aiohttp.ClientSession, base: str, headers: dict[str, str]
    ) -> None:
        self.emu = emu
        self.session = session
        self.base = base
        self.headers = headers

    async def request(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, **kw: Any
    ) -> tuple[int, CIMultiDict[str], Any]:
        hdrs = self.headers if headers is None else headers
        async with self.session.request(method, self.base + path, headers=hdrs, **kw) as r:
            return r.status, CIMultiDict(r.headers), await r.json(content_type=None)


def origin(emu: Emulator) -> str:
    return emu.urls["playment"].removesuffix("/playment")


async def introspect(
    emu: Emulator, session: aiohttp.ClientSession, method: str, path: str, **kw: Any
) -> Any:
    async with session.request(method, f"{origin(emu)}/_emulator{path}", **kw) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def token_request(
    emu: Emulator, session: aiohttp.ClientSession, **form: str
) -> tuple[int, Any]:
    async with session.post(emu.urls["token"], data=form) as r:
        return r.status, await r.json(content_type=None)


async def get_token(
    emu: Emulator,
    session: aiohttp.ClientSession,
    scope: str = "itwin-platform",
    client_id: str = CLIENT_ID,
) -> str:
    status, doc = await token_request(
        emu,
        session,
        grant_type="client_credentials",
        client_id=client_id,
        client_secret=CLIENT_SECRET,
        scope=scope,
    )
    assert status == 200, doc
    return str(doc["access_token"])


async def poll_until(
    fetch: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], interval: float = 0.02
) -> list[Any]:
    """Call ``fetch`` until ``done(answer)``, at most WAIT_S; returns every answer seen."""
    seen: list[Any] = []
    with anyio.fail_after(WAIT_S):
        while True:
            seen.append(await fetch())
            if done(seen[-1]):
                return seen
            await anyio.sleep(interval)
