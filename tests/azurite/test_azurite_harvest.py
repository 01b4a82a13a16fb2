"""harvester's Azure listing and download path against Azurite, a real Azure Storage
implementation by Microsoft, with SAS tokens made by Microsoft's ``azure-storage-blob``.

The code under test is ``providers.azure_container.harvest_container`` / ``list_container``
(what the Bentley adapter runs for each output) writing through the engine's own
``JobOutput`` and Bentley ``Transport`` — the latter holding a live OAuth bearer token from
the emulator's token endpoint, so a leak would have something to leak. Every request
harvester makes goes through a recording proxy in front of Azurite: the proof that no
credential reached storage is taken from the wire (every header and URL of every request),
which holds whatever Azurite's log format happens to be.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from azure.storage.blob import ContainerSasPermissions, ContentSettings, generate_container_sas
from azure.storage.blob.aio import BlobServiceClient, ContainerClient

from harvester.azure import blob_url, safe_blob_path
from harvester.clock import SystemClock
from harvester.config import parse_config
from harvester.emulator.scenario import parse_scenario
from harvester.emulator.server import Emulator
from harvester.engine import Engine, _Transports
from harvester.errors import CorruptDownload
from harvester.harvest import JobOutput
from harvester.jobs import Job, JobState
from harvester.providers.azure_container import harvest_container, list_container
from harvester.store.sqlite import SqliteStore
from harvester.transport import Transport
from harvester.wire import Resolver

from .recorder import RecordingProxy
from .server import ACCOUNT, ACCOUNT_KEY, Azurite

pytestmark = pytest.mark.anyio
MIB = 1 << 20
FOLDER = "outputs/segmentation3D"
SECRET = "bentley-secret-azurite"


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


#: name -> body: several MB, an empty blob, names with spaces, nested folders
BLOBS = {
    "big one.bin": payload(5 * MIB + 123, 1),
    "tiles/level 0/tile 1.b3dm": payload(3 * MIB, 2),
    "empty blob.dat": b"",
    "labels.json": b'{"classes": ["ground", "vegetation", "building"]}',
    "tiles/level 0/tile 2.b3dm": payload(700_000, 3),
}
#: uploaded in 1 MiB blocks (Put Block List): Azure keeps no whole-blob MD5 for it
BLOCKS = {"parts/stitched in blocks.bin": payload(3 * MIB + 17, 4)}


@dataclass
class Stage:
    azurite: Azurite
    proxy: RecordingProxy
    container: str
    transport: Transport
    token: str
    root: Path

    def source(self, *, expired_first: bool = False) -> SasContainer:
        return SasContainer(self.proxy.origin, self.container, expired_first=expired_first)

    def output(self) -> JobOutput:
        job = Job("bentley", "azurite-job", "azurite-job", "j-1", JobState.HARVESTING, 0.0, 0.0)
        return JobOutput(
            self.root,
            job,
            transport=self.transport,
            clock=SystemClock(),
            label_dtype="auto",
            chunk_bytes=64 * 1024,
        )

    def client(self) -> BlobServiceClient:
        """A client with the account key, for setting the stage (not through the proxy)."""
        return BlobServiceClient.from_connection_string(
            self.azurite.connection_string, max_single_put_size=MIB, max_block_size=MIB
        )


class SasContainer:
    """A container URL signed by azure-storage-blob, issued afresh when storage refuses one
    (what Bentley's readaccess does for harvester)."""

    def __init__(self, origin: str, container: str, *, expired_first: bool) -> None:
        self.origin = origin
        self.container = container
        self.issued: list[str] = []
        self.url = self._issue(expired=expired_first)

    def _issue(self, *, expired: bool) -> str:
        now = datetime.now(UTC)
        sas = generate_container_sas(
            ACCOUNT,
            self.container,
            account_key=ACCOUNT_KEY,
            permission=ContainerSasPermissions(read=True, list=True),
            start=now - timedelta(hours=2),
            expiry=now - timedelta(hours=1) if expired else now + timedelta(hours=1),
        )
        url = f"{self.origin}/{ACCOUNT}/{self.container}?{sas}"
        self.issued.append(url)
        return url

    def resolver(self, build: Callable[[str], str]) -> Resolver:
        first = True

        async def resolve() -> str:
            nonlocal first
            if not first:
                self.url = self._issue(expired=False)
            first = False
            return build(self.url)

        return resolve


@pytest.fixture
async def stage(
    azurite: Azurite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Stage]:
    monkeypatch.setenv("AZ_BENTLEY_SECRET", SECRET)
    container = f"c-{random.Random().getrandbits(48):012x}"
    async with (
        Emulator(parse_scenario({"seed": 5})) as emu,
        RecordingProxy(azurite.endpoint) as proxy,
    ):
        doc = {
            "store": {"url": "sqlite://state.db"},
            "output": {"dir": "out"},
            "providers": {
                "bentley": {
                    "base_url": emu.urls["bentley"],
                    "token_url": emu.urls["token"],
                    "client_id": "ben",
                    "client_secret_env": "AZ_BENTLEY_SECRET",
                    "rate_per_s": 0,
                    "request_timeout_s": 10,
                    "backoff_base_s": 0.05,
                    "backoff_max_s": 0.2,
                }
            },
        }
        cfg = parse_config(doc, source=tmp_path / "config.toml")
        assert cfg.store.path is not None
        async with SqliteStore(cfg.store.path) as store:
            engine = Engine(cfg, store, providers=["bentley"])
            # The engine's own transports: the Bentley lane's auth is a live OAuth client.
            async with _Transports(engine) as lanes:
                transport = lanes["bentley"].transport
                bearer = (await transport.auth.headers())["Authorization"]
                assert bearer.startswith("Bearer ")
                stage = Stage(
                    azurite, proxy, container, transport, bearer.split()[1], cfg.output.dir
                )
                async with stage.client() as service:
                    await service.create_container(container)
                    try:
                        yield stage
                    finally:
                        await service.delete_container(container)


async def upload(stage: Stage, blobs: dict[str, bytes], *, blocks: bool = False) -> None:
    async with stage.client() as service:
        client = service.get_container_client(stage.container)
        for name, body in blobs.items():
            # A 1 MiB single-put limit makes the client upload bigger blobs in blocks.
            assert blocks == (len(body) > MIB)
            await client.upload_blob(name, body, overwrite=True)


def harvested(stage: Stage) -> dict[str, bytes]:
    folder = stage.root / "bentley" / "azurite-job" / FOLDER
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def expected(blobs: dict[str, bytes]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name, body in blobs.items():
        rel = safe_blob_path(name)
        assert rel is not None
        out[rel] = body
    return out


def assert_no_credential_reached_storage(stage: Stage) -> None:
    assert stage.proxy.requests, "nothing went through the recording proxy"
    for sent in stage.proxy.requests:
        assert "Authorization" not in sent.headers, sent
        assert "x-api-key" not in sent.headers, sent
        for value in [sent.path_qs, *sent.headers.values()]:
            assert stage.token not in value and SECRET not in value, sent
            assert "bearer" not in value.lower(), sent


async def test_harvest_lists_in_pages_and_downloads_every_blob_intact(stage: Stage) -> None:
    await upload(stage, {k: v for k, v in BLOBS.items() if len(v) <= MIB})
    await upload(stage, {k: v for k, v in BLOBS.items() if len(v) > MIB}, blocks=True)
    await upload(stage, BLOCKS, blocks=True)
    # One blob uploaded in blocks that its writer then gave a Content-MD5, as Azure allows.
    stamped = "tiles/level 0/tile 1.b3dm"
    async with ContainerClient.from_connection_string(
        stage.azurite.connection_string, stage.container
    ) as client:
        digest = hashlib.md5(BLOBS[stamped]).digest()
        await client.get_blob_client(stamped).set_http_headers(
            ContentSettings(content_type="application/octet-stream", content_md5=digest)
        )
    everything = {**BLOBS, **BLOCKS}
    source = stage.source()
    out = stage.output()

    listed = await list_container(out, source, FOLDER, page_size=2)
    assert {b.name: b.size for b in listed} == {n: len(b) for n, b in everything.items()}
    md5s = {b.name: b.md5 for b in listed}
    assert md5s["labels.json"] == hashlib.md5(BLOBS["labels.json"]).digest()
    assert md5s["empty blob.dat"] == hashlib.md5(b"").digest()
    assert md5s[stamped] == digest
    assert md5s["big one.bin"] is None  # uploaded in blocks: Azure has no whole-blob MD5

    stage.proxy.requests.clear()
    await harvest_container(out, source, FOLDER, page_size=2)
    assert harvested(stage) == expected(everything)
    for rel, body in expected(everything).items():
        entry = out.entries[f"{FOLDER}/{rel}"]
        assert entry.bytes == len(body)
        assert entry.sha256 == hashlib.sha256(body).hexdigest()

    lists = [r for r in stage.proxy.requests if "comp=list" in r.path_qs]
    assert len(lists) == 3  # 6 blobs, 2 a page: NextMarker was followed twice
    queries = [parse_qs(urlsplit(r.path_qs).query) for r in lists]
    assert all(q["maxresults"] == ["2"] for q in queries)
    assert "marker" not in queries[0] and all(q["marker"][0] for q in queries[1:])
    gets = [r for r in stage.proxy.requests if "comp=list" not in r.path_qs]
    assert len(gets) == len(everything) and all(r.status in (200, 416) for r in gets)
    assert {r.status for r in gets if "empty%20blob.dat" not in r.path_qs} == {200}
    assert len(source.issued) == 1  # one SAS served every request
    assert_no_credential_reached_storage(stage)


async def test_a_refused_sas_is_issued_again(stage: Stage) -> None:
    await upload(stage, {"labels.json": BLOBS["labels.json"]})
    source = stage.source(expired_first=True)
    await harvest_container(stage.output(), source, FOLDER)
    assert harvested(stage) == expected({"labels.json": BLOBS["labels.json"]})
    # Azurite checked the SAS: the expired one was refused, the fresh ones accepted.
    assert [r.status for r in stage.proxy.requests][:2] == [403, 200]
    assert len(source.issued) == 2
    assert_no_credential_reached_storage(stage)


async def test_a_blob_whose_bytes_do_not_match_its_listed_md5_is_refused(stage: Stage) -> None:
    body = BLOBS["tiles/level 0/tile 2.b3dm"]
    await upload(stage, {"good.json": b"{}", "z damaged.bin": body})
    wrong = hashlib.md5(body + b"!").digest()
    async with ContainerClient.from_connection_string(
        stage.azurite.connection_string, stage.container
    ) as client:
        # Azure stores a blob's Content-MD5 as given: what a writer with a bug leaves.
        await client.get_blob_client("z damaged.bin").set_http_headers(
            ContentSettings(content_type="application/octet-stream", content_md5=wrong)
        )
    out = stage.output()
    with pytest.raises(CorruptDownload) as caught:
        await harvest_container(out, stage.source(), FOLDER)
    message = str(caught.value)
    rel = safe_blob_path("z damaged.bin")
    assert message.startswith(f"bentley job azurite-job: {FOLDER}/{rel}: the bytes' MD5 is ")
    assert "the listing says" in message and message.endswith("(Content-MD5)")
    # Fetched whole and refused: nothing under its final name, no temporary file left.
    assert harvested(stage) == {"good.json": b"{}"}
    assert_no_credential_reached_storage(stage)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (+1000, "storage sent more than the 700000 bytes listed"),
        (-1000, "699000 bytes arrived, the listing says 700000 (Content-Length)"),
    ],
)
async def test_a_blob_replaced_after_the_listing_is_refused(
    stage: Stage, change: int, words: str
) -> None:
    name = "tiles/level 0/tile 2.b3dm"
    assert len(BLOBS[name]) == 700_000
    await upload(stage, {name: BLOBS[name]})
    out = stage.output()
    source = stage.source()
    (blob,) = await list_container(out, source, FOLDER)
    await upload(stage, {name: payload(len(BLOBS[name]) + change, 9)})  # rewritten meanwhile
    rel = f"{FOLDER}/{safe_blob_path(name)}"
    with pytest.raises(CorruptDownload) as caught:
        await out.download(
            rel,
            source.resolver(lambda url: blob_url(url, name)),
            size=blob.size,
            md5=blob.md5,
        )
    assert str(caught.value) == f"bentley job azurite-job: {rel}: {words}"
    assert harvested(stage) == {}
    assert_no_credential_reached_storage(stage)
