"""Microsoft's own ``azure-storage-blob`` client, unmodified, against the emulator's storage.

The emulator's containers imitate Azure Blob; here the official client is the judge of what
"imitate" has to mean: paginated listings it can follow, ``x-ms-range`` reads with the
``Content-Range`` it requires, chunked ranged downloads, per-range ``Content-MD5`` checks
(``validate_content``) and the 416-then-plain-GET dance it does for an empty blob. The raw
tests below pin the header rules from Azure's REST reference that the client relies on.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import pytest
from azure.storage.blob.aio import ContainerClient
from conftest import StartEmulator, get_token, poll_until

from harvester.emulator import Emulator

pytestmark = pytest.mark.anyio
OUTPUT = "segmentation2D"
BODY: dict[str, Any] = {
    "type": "Segmentation2D",
    "iTwinId": "f7cb7bbb-c0fd-437d-af2a-0a8c51cfc3c4",
    "specifications": {
        "inputs": {"photos": "401975b7-0c0a-4498-5896-84987921f4bb"},
        "outputs": [OUTPUT],
        "options": {},
    },
}
PART = f"{OUTPUT}/segmentation/part-0001.bin"
#: small enough that a blob of BLOB_BYTES takes many ranged gets
CHUNK = 1024
BLOB_BYTES = 10_000


async def finished_container(
    emu: Emulator, session: aiohttp.ClientSession
) -> tuple[str, dict[str, Any]]:
    """A finished Bentley job's output container URL (with its SAS) and its ground truth."""
    headers = {"Authorization": f"Bearer {await get_token(emu, session)}"}
    base = emu.urls["bentley"]
    async with session.post(f"{base}/reality-analysis/jobs", json=BODY, headers=headers) as r:
        assert r.status == 201, await r.text()
        job = (await r.json())["job"]
    rd_id = job["specifications"]["outputs"][OUTPUT]

    async def read_access() -> tuple[int, Any]:
        url = f"{base}/reality-management/reality-data/{rd_id}/readaccess"
        async with session.get(url, headers=headers) as r:
            return r.status, await r.json()

    seen = await poll_until(read_access, lambda answer: answer[0] == 200)
    href = str(seen[-1][1]["_links"]["containerUrl"]["href"])
    async with session.get(
        f"{base.removesuffix('/bentley')}/_emulator/truth/bentley/{job['id']}"
    ) as r:
        truth = (await r.json())["outputs"][OUTPUT]["blobs"]
    return href, truth


def client(href: str, **kw: Any) -> ContainerClient:
    return ContainerClient.from_container_url(
        href, max_single_get_size=CHUNK, max_chunk_get_size=CHUNK, retry_total=0, **kw
    )


def blob_gets(emu: Emulator, name: str) -> list[int]:
    path = urlsplit(emu.urls["storage"]).path + "/bentley/"
    return [
        r["status"]
        for r in emu.state.requests()
        if r["provider"] == "storage"
        and r["method"] == "GET"
        and r["path"].startswith(path)
        and r["path"].endswith("/" + name)
    ]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_sdk_lists_in_pages_with_sizes_and_md5s(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    emu = await start_emulator({"bentley": {"parts_per_output": 5, "blob_bytes": BLOB_BYTES}})
    href, truth = await finished_container(emu, session)
    pages: list[list[Any]] = []
    async with client(href) as container:
        async for page in container.list_blobs(results_per_page=2).by_page():
            pages.append([blob async for blob in page])
        listed = {b.name: b for page in pages for b in page}
        assert [len(p) for p in pages] == [2, 2, 2]  # 6 blobs, NextMarker twice
        assert {n: b.size for n, b in listed.items()} == {n: t["size"] for n, t in truth.items()}
        for name, blob in listed.items():
            data = await (await container.download_blob(name)).readall()
            assert sha(data) == truth[name]["sha256"], name
            assert bytes(blob.content_settings.content_md5) == hashlib.md5(data).digest(), name
            assert blob.etag


async def test_sdk_downloads_whole_ranged_and_chunked(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    emu = await start_emulator({"bentley": {"parts_per_output": 1, "blob_bytes": BLOB_BYTES}})
    href, truth = await finished_container(emu, session)
    async with client(href) as container:
        whole = await (await container.download_blob(PART)).readall()
        assert len(whole) == BLOB_BYTES and sha(whole) == truth[PART]["sha256"]
        # 10 ranged gets of at most 1 KiB each, every one answered 206
        assert blob_gets(emu, PART) == [206] * 10

        stream = await container.download_blob(PART, offset=1500, length=2500)
        assert stream.size == 2500
        parts = [chunk async for chunk in stream.chunks()]
        assert b"".join(parts) == whole[1500:4000] and len(parts) == 3

        tail = await (await container.download_blob(PART, offset=9000)).readall()
        assert tail == whole[9000:]
        last = await (
            await container.download_blob(PART, offset=BLOB_BYTES - 1, length=5)
        ).readall()
        assert last == whole[-1:]

        # validate_content asks for each range's own Content-MD5 and checks it
        checked = await (await container.download_blob(PART, validate_content=True)).readall()
        assert checked == whole

        props = await container.get_blob_client(PART).get_blob_properties()
        assert props.size == BLOB_BYTES
        assert bytes(props.content_settings.content_md5) == hashlib.md5(whole).digest()


async def test_sdk_downloads_an_empty_blob(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    """Azure answers 416 to a range over an empty blob; the client then asks without one."""
    emu = await start_emulator({"bentley": {"parts_per_output": 1, "blob_bytes": 0}})
    href, truth = await finished_container(emu, session)
    assert truth[PART]["size"] == 0
    async with client(href) as container:
        listed = {b.name: b.size async for b in container.list_blobs()}
        assert listed[PART] == 0
        assert await (await container.download_blob(PART)).readall() == b""
    assert blob_gets(emu, PART) == [416, 200]


async def test_sdk_reports_a_refused_sas(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    from azure.core.exceptions import ClientAuthenticationError

    emu = await start_emulator({"bentley": {"parts_per_output": 1, "blob_bytes": 100}})
    href, _ = await finished_container(emu, session)
    forged = href.replace("sig=", "sig=A")
    async with client(forged) as container:
        with pytest.raises(ClientAuthenticationError) as caught:
            await (await container.download_blob(PART)).readall()
        assert caught.value.error_code == "AuthenticationFailed"


# -- the header rules the client relies on, from Azure's REST reference -----------------------


def blob_url(href: str, name: str) -> str:
    parts = urlsplit(href)
    return urlunsplit(parts._replace(path=f"{parts.path}/{quote(name)}"))


async def test_x_ms_range_wins_over_range_and_ranges_carry_the_blobs_md5(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    emu = await start_emulator({"bentley": {"parts_per_output": 1, "blob_bytes": BLOB_BYTES}})
    href, _ = await finished_container(emu, session)
    url = blob_url(href, PART)
    async with session.get(url) as r:
        assert r.status == 200 and "Content-Range" not in r.headers
        whole = await r.read()
        md5 = base64.b64encode(hashlib.md5(whole).digest()).decode()
        assert r.headers["Content-MD5"] == md5
        assert r.headers["x-ms-version"] == dict(_query(href))["sv"]
        etag = r.headers["ETag"]
    both = {"x-ms-range": "bytes=10-19", "Range": "bytes=0-99"}
    async with session.get(url, headers=both) as r:
        assert r.status == 206 and await r.read() == whole[10:20]
        assert r.headers["Content-Range"] == f"bytes 10-19/{BLOB_BYTES}"
        assert r.headers["x-ms-blob-content-md5"] == md5
        assert "Content-MD5" not in r.headers  # a range's own MD5 only when asked for
    async with session.get(url, headers={"Range": "bytes=9990-"}) as r:
        assert r.status == 206 and await r.read() == whole[9990:]
        assert r.headers["Content-Range"] == f"bytes 9990-9999/{BLOB_BYTES}"
    ask_md5 = {"x-ms-range": "bytes=0-99", "x-ms-range-get-content-md5": "true"}
    async with session.get(url, headers=ask_md5) as r:
        assert r.status == 206
        assert (
            r.headers["Content-MD5"] == base64.b64encode(hashlib.md5(whole[:100]).digest()).decode()
        )
    async with session.get(url, headers={"x-ms-range-get-content-md5": "true"}) as r:
        assert r.status == 400  # no range to hash
    async with session.get(
        url, headers={"x-ms-version": "2025-01-05", "x-ms-client-request-id": "c1"}
    ) as r:
        assert (
            r.headers["x-ms-version"] == "2025-01-05"
            and r.headers["x-ms-client-request-id"] == "c1"
        )
    async with session.get(url, headers={"x-ms-version": "latest"}) as r:
        assert r.status == 400 and r.headers["x-ms-error-code"] == "InvalidHeaderValue"
    async with session.get(url, headers={"If-Match": '"0xNOTIT"', "x-ms-range": "bytes=0-9"}) as r:
        assert r.status == 412 and r.headers["x-ms-error-code"] == "ConditionNotMet"
    async with session.get(url, headers={"If-Match": etag, "x-ms-range": "bytes=0-9"}) as r:
        assert r.status == 206


async def test_unsatisfiable_ranges_are_416_invalid_range(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    emu = await start_emulator({"bentley": {"parts_per_output": 1, "blob_bytes": 100}})
    href, _ = await finished_container(emu, session)
    url = blob_url(href, PART)
    for headers in (
        {"x-ms-range": "bytes=100-"},
        {"x-ms-range": "bytes=100-200", "Range": "bytes=0-9"},  # x-ms-range decides
        {"Range": "bytes=500-600"},
    ):
        async with session.get(url, headers=headers) as r:
            assert r.status == 416, headers
            assert r.headers["x-ms-error-code"] == "InvalidRange"
            assert r.headers["Content-Range"] == "bytes */100"
            assert b"<Code>InvalidRange</Code>" in await r.read()


def _query(href: str) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl

    return parse_qsl(urlsplit(href).query)
