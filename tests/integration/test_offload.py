"""Harvests off the event loop and in parallel: what ``offload`` and ``FileParts`` promise.

Everything goes over real HTTP to the emulator's storage host on 127.0.0.1, through the real
``Transport`` and ``JobOutput``; the bodies are this file's own, mounted on the storage host.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from aiohttp import web

from harvester.clock import SystemClock
from harvester.config import PlaymentConfig, SecretRef
from harvester.credentials import make_auth
from harvester.download import ByteBudget
from harvester.emulator.objects import ObjectSource
from harvester.emulator.scenario import FaultSpec, parse_scenario
from harvester.emulator.server import Emulator
from harvester.errors import CorruptDownload, ProtocolError
from harvester.harvest import JobOutput, LabelSink
from harvester.jobs import Job, JobState
from harvester.metrics import Metrics
from harvester.offload import Offload
from harvester.providers.base import LabelFrame, RemoteFile
from harvester.ratelimit import ProviderLimiter
from harvester.transport import Transport
from tests.loopback import serving

pytestmark = pytest.mark.anyio
MIB = 1 << 20
PREFIX = "/offload-test/"


def mask_text(n: int, seed: int) -> bytes:
    labels = np.random.default_rng(seed).integers(0, 60, n)
    return ("[" + ", ".join(map(str, labels.tolist())) + "]").encode()


class Stage:
    def __init__(self, emu: Emulator, transport: Transport, root: Path) -> None:
        self.emu = emu
        self.transport = transport
        self.root = root
        self.bodies: dict[str, bytes] = {}
        emu.storage.objects.mount(PREFIX, self._source)

    def _source(self, path: str) -> ObjectSource | None:
        body = self.bodies.get(path.removeprefix(PREFIX))
        return None if body is None else ObjectSource(lambda: body, "application/octet-stream")

    def put(self, name: str, body: bytes) -> Callable[[], Any]:
        """Serve ``body`` as ``name``; returns a resolver of its signed URL."""
        self.bodies[name] = body

        async def resolve() -> str:
            return self.emu.storage.signed_url(PREFIX + name)

        return resolve

    def gets(self, name: str) -> int:
        return sum(1 for r in self.emu.state.requests() if r["path"] == PREFIX + name)

    def output(self, key: str, *, threads: int, concurrency: int, part_bytes: int) -> JobOutput:
        job = Job("playment", key, key, f"r-{key}", JobState.HARVESTING, 0.0, 0.0)
        return JobOutput(
            self.root,
            job,
            transport=self.transport,
            clock=SystemClock(),
            label_dtype="auto",
            chunk_bytes=256 * 1024,
            frame_concurrency=concurrency,
            part_bytes=part_bytes,
            offload=Offload(threads),
            budget=ByteBudget(1 << 40, 1 << 40),
        )


@pytest.fixture
async def stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stage]:
    monkeypatch.setenv("OFFLOAD_TEST_KEY", "k")
    async with Emulator(parse_scenario({"seed": 5})) as emu:
        cfg = PlaymentConfig(
            name="playment",
            base_url=emu.urls["playment"],
            api_key=SecretRef("providers.playment.api_key", env="OFFLOAD_TEST_KEY"),
            project_id="p",
            request_timeout_s=10,
            max_retries=0,
        )
        clock = SystemClock()
        limiter = ProviderLimiter("playment", rate_per_s=0, burst=1, max_concurrency=8, clock=clock)
        async with Transport(
            cfg, auth=make_auth(cfg), limiter=limiter, clock=clock, metrics=Metrics()
        ) as transport:
            yield Stage(emu, transport, tmp_path / "out")


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- the event loop stays free while a big mask decodes -------------------------------------


@pytest.mark.parametrize("threads", [1, 0])
async def test_the_loop_runs_while_every_chunk_of_a_large_mask_decodes(
    stage: Stage, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    """A probe inside the decoder's ``feed`` waits (bounded) for a heartbeat task on the event
    loop to tick: it can only tick if the chunk is decoded off the loop. With worker threads
    every chunk sees the loop run; on the loop (``threads = 0``, the old way) none can, which
    shows the probe tells the two apart."""
    body = mask_text(1_500_000, seed=1)  # about 6 MB: two dozen chunks
    resolve = stage.put("big-mask.json", body)
    ticks = 0
    ticked: list[bool] = []
    loop_thread = threading.get_ident()
    real_feed = LabelSink.feed

    def probed_feed(self: LabelSink, chunk: bytes) -> None:
        seen = ticks
        # On the loop's own thread the loop cannot tick: no use waiting for it.
        wait_s = 0.0 if threading.get_ident() == loop_thread or False in ticked else 10.0
        deadline = time.monotonic() + wait_s
        while ticks == seen and time.monotonic() < deadline:
            time.sleep(0.0005)
        ticked.append(ticks != seen)
        real_feed(self, chunk)

    monkeypatch.setattr(LabelSink, "feed", probed_feed)
    out = stage.output("mask", threads=threads, concurrency=1, part_bytes=MIB)

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.sleep(0.0005)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat)
            await out.labels("f-0", resolve, "mask")
            tg.cancel_scope.cancel()
    assert len(ticked) >= 20
    if threads:
        assert all(ticked), ticked
    else:
        assert not any(ticked), ticked
    arr = np.load(stage.root / "playment" / "mask" / "labels" / "f-0.npy")
    assert arr.size == 1_500_000


# -- parallel and ranged fetches give the serial path's bytes --------------------------------


async def test_parallel_frames_and_threads_write_the_serial_paths_arrays(stage: Stage) -> None:
    frames = [
        LabelFrame(f"f-{i}", stage.put(f"m{i}.json", mask_text(200_000 + i * 7919, seed=i)), "mask")
        for i in range(6)
    ]
    serial = stage.output("serial", threads=0, concurrency=1, part_bytes=MIB)
    parallel = stage.output("parallel", threads=2, concurrency=4, part_bytes=MIB)
    with anyio.fail_after(60):
        await serial.label_frames(frames)
        await parallel.label_frames(frames)
    a = tree(stage.root / "playment" / "serial")
    b = tree(stage.root / "playment" / "parallel")
    assert len(a) == 6 and a == b
    assert {k: v.as_json() for k, v in serial.entries.items()} == {
        k: v.as_json() for k, v in parallel.entries.items()
    }


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def test_a_large_file_in_ranged_parts_is_the_whole_files_bytes(stage: Stage) -> None:
    body = blob(5 * MIB + 123, 1)
    md5 = hashlib.md5(body).digest()
    files = [
        RemoteFile("outputs/big.bin", stage.put("big.bin", body), size=len(body), md5=md5),
        RemoteFile("outputs/small.bin", stage.put("small.bin", b"tiny"), size=4),
    ]
    whole = stage.output("whole", threads=1, concurrency=1, part_bytes=64 * MIB)
    parts = stage.output("parts", threads=2, concurrency=4, part_bytes=MIB)
    with anyio.fail_after(60):
        await whole.download_files(files)
        assert stage.gets("big.bin") == 1
        await parts.download_files(files)
    assert stage.gets("big.bin") == 1 + 6  # six ranged parts of 1 MiB (the last one short)
    a = tree(stage.root / "playment" / "whole")
    b = tree(stage.root / "playment" / "parts")
    assert a == b and a["outputs/big.bin"] == body
    assert whole.entries["outputs/big.bin"] == parts.entries["outputs/big.bin"]
    assert parts.entries["outputs/big.bin"].sha256 == hashlib.sha256(body).hexdigest()


async def test_a_truncated_part_is_resumed_and_the_file_is_whole(stage: Stage) -> None:
    body = blob(4 * MIB, 2)
    resolve = stage.put("cut.bin", body)
    stage.emu.state.add_fault(
        FaultSpec(kind="truncate", provider="storage", match="cut.bin", count=2, fraction=0.3)
    )
    out = stage.output("cut", threads=2, concurrency=4, part_bytes=MIB)
    with anyio.fail_after(60):
        await out.download("cut.bin", resolve, size=len(body), md5=hashlib.md5(body).digest())
    assert stage.gets("cut.bin") == 4 + 2  # two parts cut short, each resumed once
    assert (stage.root / "playment" / "cut" / "cut.bin").read_bytes() == body


async def test_a_part_with_wrong_bytes_fails_the_md5_and_leaves_no_file(stage: Stage) -> None:
    body = blob(3 * MIB + 5, 3)
    listed = hashlib.md5(body).digest()
    damaged = bytearray(body)
    damaged[2 * MIB + 17] ^= 0xFF  # in the third part
    resolve = stage.put("bad.bin", bytes(damaged))
    out = stage.output("bad", threads=2, concurrency=4, part_bytes=MIB)
    with anyio.fail_after(60), pytest.raises(CorruptDownload, match=r"MD5 .* \(Content-MD5\)"):
        await out.download("bad.bin", resolve, size=len(body), md5=listed)
    assert tree(stage.root / "playment" / "bad") == {}  # neither the file nor a temporary one


async def test_a_file_larger_than_listed_is_refused_before_any_part(stage: Stage) -> None:
    body = blob(2 * MIB, 4)
    resolve = stage.put("long.bin", body)
    out = stage.output("long", threads=2, concurrency=4, part_bytes=MIB // 2)
    with anyio.fail_after(60), pytest.raises(CorruptDownload, match="listing"):
        # The listing says 1.5 MiB: storage's Content-Range says 2 MiB.
        await out.download("long.bin", resolve, size=3 * MIB // 2)
    assert tree(stage.root / "playment" / "long") == {}


async def test_a_file_over_the_byte_budget_is_refused_before_any_part(stage: Stage) -> None:
    body = blob(2 * MIB, 5)
    resolve = stage.put("huge.bin", body)
    out = stage.output("huge", threads=2, concurrency=4, part_bytes=MIB // 2)
    out.budget = ByteBudget(MIB, 1 << 40)
    with anyio.fail_after(60), pytest.raises(ProtocolError, match=r"harvest\.max_file_bytes"):
        await out.download("huge.bin", resolve, size=len(body))
    assert stage.gets("huge.bin") == 0


async def test_a_harvest_cut_off_mid_file_leaves_no_final_file(stage: Stage) -> None:
    """Cancelled while parts are in flight (what a stop or a lost lease does): nothing is
    left under the file's final name, and no temporary file either."""
    body = blob(6 * MIB, 6)
    resolve = stage.put("cut-off.bin", body)
    out = stage.output("cut-off", threads=2, concurrency=2, part_bytes=MIB)
    fed = anyio.Event()
    real_feed = out.offload.run

    async def run(fn: Any, *args: Any) -> Any:
        result = await real_feed(fn, *args)
        if getattr(fn, "__name__", "") == "feed":
            fed.set()
        return result

    out.offload.run = run  # type: ignore[method-assign]
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:

            async def fetch() -> None:
                await out.download("cut-off.bin", resolve, size=len(body))

            tg.start_soon(fetch)
            await fed.wait()
            tg.cancel_scope.cancel()
    assert tree(stage.root / "playment" / "cut-off") == {}


async def test_a_host_that_ignores_range_gets_the_file_in_one_piece(stage: Stage) -> None:
    """Storage answering 200 (the whole file) to a ranged request: the parts are dropped and
    the file is fetched whole, once."""
    body = blob(3 * MIB, 7)
    seen: list[str | None] = []

    async def whole(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Range"))
        return web.Response(body=body)

    async with serving(whole) as origin:

        async def resolve() -> str:
            return f"{origin}/f"

        out = stage.output("no-range", threads=2, concurrency=1, part_bytes=MIB)
        with anyio.fail_after(60):
            await out.download("f.bin", resolve, size=len(body), md5=hashlib.md5(body).digest())
    assert seen == ["bytes=0-1048575", None]  # one part tried (one stream at a time), then whole
    assert (stage.root / "playment" / "no-range" / "f.bin").read_bytes() == body
