from __future__ import annotations

import json

import aiohttp
import anyio
import pytest
from conftest import API_KEY, MakeClient, PlaymentClient

pytestmark = pytest.mark.anyio
INSTANT = {"playment": {"job_duration_s": 0}}  # these tests are about downloads, not waiting


@pytest.fixture
async def api(make_client: MakeClient) -> PlaymentClient:
    return await make_client(INSTANT)


async def _completed_result(api: PlaymentClient, ref: str) -> str:
    done = await api.wait_completed(await api.create_job(ref))
    return str(done["result"])


async def _get(session: aiohttp.ClientSession, url: str, **kw: object) -> tuple[int, bytes]:
    async with session.get(url, **kw) as r:  # type: ignore[arg-type]
        return r.status, await r.read()


async def test_private_urls_need_a_valid_signature(api: PlaymentClient) -> None:
    result = await _completed_result(api, "priv-1")
    status, body = await _get(api.session, result)
    assert status == 403 and b"<Code>AccessDenied</Code>" in body
    _, location = await api.resolve(result)
    assert location is not None
    forged = location[:-4] + ("0000" if not location.endswith("0000") else "1111")
    status, body = await _get(api.session, forged)
    assert status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in body
    other = location.replace("result.json", "masks/0.txt")
    assert (await _get(api.session, other))[0] == 403  # a signature covers one path only


async def test_expired_url_then_reresolution_works(make_client: MakeClient) -> None:
    api = await make_client({**INSTANT, "storage": {"expire_first_n": 1}})
    result = await _completed_result(api, "exp-1")
    _, first = await api.resolve(result)
    assert first is not None
    status, body = await _get(api.session, first)
    assert status == 403
    assert b"<Code>AccessDenied</Code>" in body and b"Request has expired" in body
    _, second = await api.resolve(result)
    assert second is not None and second != first
    status, body = await _get(api.session, second)
    assert status == 200 and "annotation_data" in json.loads(body)
    storage = (await api.introspect("GET", "/stats"))["storage"]
    assert storage["expired_urls_issued"] == 1 and storage["expired_rejected"] == 1


@pytest.mark.parametrize("header", ["x-api-key", "Authorization", "X-Custom-Token"])
async def test_credentials_sent_to_storage_are_recorded_and_refused(
    api: PlaymentClient, header: str
) -> None:
    result = await _completed_result(api, "cred-1")
    _, location = await api.resolve(result)
    assert location is not None
    value = API_KEY if header != "Authorization" else "Bearer something"
    status, body = await _get(api.session, location, headers={header: value})
    assert status == 400 and b"<Code>InvalidArgument</Code>" in body
    stats = await api.introspect("GET", "/stats")
    hits = stats["credential_hits"]
    assert [(h["header"], h["path"]) for h in hits] == [
        (header.lower(), location.split("?")[0].removeprefix(api.emu.urls["storage"]))
    ]
    assert API_KEY not in json.dumps(stats)


async def test_following_the_redirect_with_the_key_is_caught(api: PlaymentClient) -> None:
    # aiohttp keeps custom headers across a cross-host redirect: exactly the leak to catch.
    result = await _completed_result(api, "leak-1")
    async with api.session.get(
        f"{api.base}/v1/attachments", params={"url": result}, headers=api.headers
    ) as r:
        assert r.status == 400
    assert len(api.emu.state.stats()["credential_hits"]) == 1


async def test_ranges_lengths_and_chunked_streaming(make_client: MakeClient) -> None:
    api = await make_client({**INSTANT, "storage": {"chunk_size": 7}})
    result = await _completed_result(api, "range-1")
    full = await api.download(result)
    _, location = await api.resolve(result)
    assert location is not None
    async with api.session.get(location) as r:
        assert r.headers["Content-Length"] == str(len(full))
        assert r.headers["ETag"].startswith('"')
    async with api.session.get(location, headers={"Range": "bytes=10-"}) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 10-{len(full) - 1}/{len(full)}"
        assert r.headers["Content-Length"] == str(len(full) - 10)
        assert await r.read() == full[10:]
    async with api.session.get(location, headers={"Range": f"bytes={len(full)}-"}) as r:
        assert r.status == 416
    async with api.session.head(location) as r:
        assert r.status == 200 and r.headers["Content-Length"] == str(len(full))


async def test_unknown_object_with_valid_signature_is_no_such_key(api: PlaymentClient) -> None:
    signed = api.emu.storage.signed_url("/playment-private/p/nojob/result.json")
    status, body = await _get(api.session, signed)
    assert status == 404 and b"<Code>NoSuchKey</Code>" in body


async def test_bandwidth_caps_hold_each_connection_and_the_link(make_client: MakeClient) -> None:
    """A lower bound only (the caps delay, never hurry): each body at most
    ``connection_bytes_per_s``, all bodies together at most ``link_bytes_per_s``."""
    rate = 400_000.0
    api = await make_client(
        {
            **INSTANT,
            "playment": {"job_duration_s": 0, "points_per_frame": [20_000, 20_000]},
            "storage": {
                "chunk_size": 8192,
                "connection_bytes_per_s": rate,
                "link_bytes_per_s": 1.5 * rate,
            },
        }
    )
    result = await _completed_result(api, "bw-1")
    _, location = await api.resolve(result)
    assert location is not None
    started = anyio.current_time()
    body = await _get(api.session, location)
    alone = anyio.current_time() - started
    size = len(body[1])
    assert size > 20_000 and alone >= size / rate * 0.95
    started = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(_get, api.session, location)
    together = anyio.current_time() - started
    assert together >= 3 * size / (1.5 * rate) * 0.95  # the link, not 3 connections' worth
