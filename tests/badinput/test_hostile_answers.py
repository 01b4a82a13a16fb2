"""Hostile provider answers: bodies without end, gzip bombs, more bytes than a job may have,
and signed URLs pointing at the machine's cloud metadata service.

One harvest through the engine against the emulator behind the bad-input proxy, which gives
each case's hostile answer to one job. Each such job ends in ``error`` after one answer (not
retried for ever) with one reason naming the limit or the refused address; its folder holds
no label array, no temporary file and no manifest; every other job is harvested. The run's
Python memory peak (tracemalloc) stays far below what the bombs inflate to, and no
connection was attempted to a link-local or metadata address (every socket connect of the
run is recorded, and any one off loopback is refused before it leaves this machine).
Files the job completed before the hostile one may stay (they are whole), the manifest does
not, so the folder never passes for a harvest.

Figures: the poll bomb is 128 MiB of JSON once inflated (from about 130 KB), the mask bomb
64 MiB of valid mask text; the endless bodies would stream 64 MiB each. The caps under test:
``max_answer_bytes`` 1 MiB, ``harvest.max_file_bytes`` 256 KiB, ``harvest.max_job_bytes``
384 KiB.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from harvester.config import parse_config
from harvester.decode import PcdLabelDecoder
from harvester.errors import ConfigError, DecodeError
from harvester.jobs import JobState
from harvester.netguard import url_reason
from harvester.verify import verify_outputs

from .helpers import secret_env
from .hostile import GOOD_JOBS, Case, Run, bomb, endless, gzip_of, harvest_through

MiB = 1 << 20
ANSWER_CAP = 1 * MiB
FILE_CAP = 256 << 10
JOB_CAP = 384 << 10
#: the run's Python allocation peak may not reach this (the bombs inflate to 64-128 MiB; the
#: peak was 21 MiB with one frame at a time, 42 MiB with harvest.frame_concurrency = 4, since
#: each frame in flight holds a 1 MiB read and its decoder's work arrays; 1,666 MiB uncapped)
MEMORY_BOUND = 64 * MiB
#: a host name the run's name lookups answer with the metadata address (as an
#: ``instance-data`` name does inside AWS)
METADATA_NAME = "instance-data.hostile.test"
#: a valid mask of ~200 KiB: one fits a file, two overrun the job's budget
MASK_200K = b"[" + b"1, " * (200_000 // 3) + b"1]"


@dataclass(frozen=True)
class Expect:
    case: Case
    says: tuple[str, ...]
    #: hostile answers the job may be given at most (1: not retried)
    served_at_most: int = 1


EXPECT = [
    Expect(Case("poll-gzip-bomb", "playment", "poll",
                serve=bomb(gzip_of(b'{"success": true, "data": {"x": "', b"0", 128 * MiB),
                           "application/json")),
           ("poll: answer", f"larger than {ANSWER_CAP} bytes", "max_answer_bytes")),
    Expect(Case("poll-endless", "cognite", "poll",
                serve=endless(b'{"jobId": 1, "status": "Running"', b" ", upto=64 * MiB,
                              content_type="application/json")),
           ("poll: answer", f"larger than {ANSWER_CAP} bytes", "max_answer_bytes")),
    Expect(Case("mask-endless", "playment", "mask-file",
                serve=endless(b"[", b"1, ", upto=64 * MiB)),
           ("labels/f-001.npy", f"larger than {FILE_CAP} bytes", "harvest.max_file_bytes")),
    Expect(Case("mask-gzip-bomb", "playment", "mask-file",
                serve=bomb(gzip_of(b"[", b"1, ", 64 * MiB))),
           ("labels/f-001.npy", f"larger than {FILE_CAP} bytes", "harvest.max_file_bytes")),
    Expect(Case("job-over-budget", "playment", "mask-files",
                serve=endless(MASK_200K, b" ", upto=0)),
           # the job's two frames download concurrently: whichever reaches the budget second
           # is the one refused, so the reason names f-000 or f-001
           ("playment job bad-job-over-budget: labels/f-00", ".npy is larger than",
            "harvest.max_job_bytes leaves after"), served_at_most=2),
    Expect(Case("to-metadata", "playment", "mask-file",
                location="http://169.254.169.254/latest/meta-data/iam/security-credentials/"),
           ("refusing to fetch http://169.254.169.254/latest/meta-data/iam/security-credentials/",
            "cloud metadata address", "allow_link_local")),
    Expect(Case("to-metadata-v6", "playment", "mask-file",
                location="http://[fd00:ec2::254]/latest/meta-data/"),
           ("refusing to fetch", "cloud metadata address (fd00:ec2::254)")),
    Expect(Case("to-link-local", "playment", "mask-file",
                location="http://169.254.10.1:8080/masks/1.txt"),
           ("refusing to fetch", "link-local address (169.254.10.1)")),
    Expect(Case("to-name-of-metadata", "playment", "mask-file",
                location=f"http://{METADATA_NAME}/latest/meta-data/"),
           (f"refusing to connect to http://{METADATA_NAME}/latest/meta-data/",
            f"{METADATA_NAME} resolves only to a cloud metadata address (169.254.169.254)")),
    Expect(Case("to-metadata-name", "playment", "mask-file",
                location="http://metadata.google.internal/computeMetadata/v1/"),
           ("refusing to fetch", "cloud metadata host (metadata.google.internal)")),
    Expect(Case("to-file-scheme", "playment", "mask-file", location="file:///etc/passwd"),
           ("non-HTTP",)),
]  # fmt: skip


@dataclass
class Result:
    run: Run
    peak_bytes: int
    connects: list[str]  #: every address a socket of the run connected (or tried) to
    lookups: list[str]  #: every host name the run resolved


async def _run(root: Path) -> Result:
    loop = asyncio.get_running_loop()
    connects: list[str] = []
    real_connect = loop.sock_connect

    async def recording_connect(sock: socket.socket, address: Any) -> None:
        host = str(address[0])
        connects.append(host)
        if not ipaddress.ip_address(host.split("%", 1)[0]).is_loopback:
            # Whatever the code under test does, nothing leaves this machine.
            raise ConnectionRefusedError(f"test: no connection to {host}")
        await real_connect(sock, address)

    lookups: list[str] = []
    real_getaddrinfo = loop.getaddrinfo

    async def fake_dns(host: Any, port: Any, **kw: Any) -> Any:
        lookups.append(str(host))
        if host == METADATA_NAME:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port))]
        return await real_getaddrinfo(host, port, **kw)

    loop.sock_connect = recording_connect  # type: ignore[method-assign]
    loop.getaddrinfo = fake_dns  # type: ignore[method-assign]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        run = await harvest_through(
            root,
            [e.case for e in EXPECT],
            provider_settings={"max_answer_bytes": ANSWER_CAP},
            harvest_settings={"max_file_bytes": FILE_CAP, "max_job_bytes": JOB_CAP},
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        del loop.sock_connect, loop.getaddrinfo
    return Result(run, peak - base, connects, lookups)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Result]:
    with secret_env():
        yield anyio.run(_run, tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("expect", [pytest.param(e, id=e.case.id) for e in EXPECT])
def test_hostile_answer_ends_its_job_in_error(result: Result, expect: Expect) -> None:
    case = expect.case
    bad = result.run.jobs[f"{case.provider}/{case.key}"]
    assert result.run.served.get(case.id), "the hostile answer was never asked for"
    assert bad.state == JobState.ERROR, (bad.state, bad.reason)
    reason = bad.reason or ""
    assert "\n" not in reason and len(reason) < 600, reason
    assert case.provider in reason and case.key in reason, reason
    for fragment in expect.says:
        assert fragment in reason, (fragment, reason)
    # A limit is a verdict on the answer, not a hiccup: asking again gets the same answer.
    assert result.run.served[case.id] <= expect.served_at_most, result.run.served
    folder = result.run.config.output.dir / case.provider / case.key
    names = [p.name for p in folder.rglob("*")] if folder.exists() else []
    assert "MANIFEST.json" not in names, names
    # The file it was fetching is not there, not even partly (the frame before it may be).
    assert not [n for n in names if ".tmp-" in n or n == "f-001.npy"], names


def test_memory_stays_bounded(result: Result) -> None:
    assert result.peak_bytes < MEMORY_BOUND, f"peak {result.peak_bytes / MiB:.1f} MiB"


def test_no_connection_to_link_local_or_metadata(result: Result) -> None:
    assert result.connects, "the recorder saw no connection at all"
    # The name case went through a real lookup (aiohttp's threaded resolver), not around it.
    assert METADATA_NAME in result.lookups, result.lookups
    refused = [
        h
        for h in result.connects
        if ipaddress.ip_address(h.split("%", 1)[0]).is_link_local
        or h in ("169.254.169.254", "fd00:ec2::254")
    ]
    assert refused == []
    assert {ipaddress.ip_address(h).is_loopback for h in result.connects} == {True}


def test_other_jobs_are_harvested(result: Result) -> None:
    for good in GOOD_JOBS:
        job = result.run.jobs[f"{good.provider}/{good.key}"]
        assert job.state == JobState.HARVESTED, (job.label, job.reason)
    assert verify_outputs(result.run.config.output.dir, result.run.jobs.values()).problems == []


def test_pcd_body_is_bounded_by_its_points() -> None:
    """The PCD variant declares its size: POINTS rows of that many values. A body that goes
    on (here: blank lines without end after 2 rows) is refused within that bound, long before
    harvest.max_file_bytes."""
    head = (
        b"VERSION .7\nFIELDS x y z label_key\nSIZE 4 4 4 4\nTYPE F F F U\nCOUNT 1 1 1 1\n"
        b"WIDTH 2\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS 2\nDATA ascii\n"
    )
    decoder = PcdLabelDecoder()
    decoder.feed(head + b"0 0 0 1\n0 0 0 2\n")
    fed = 0
    with pytest.raises(DecodeError, match=r"goes on past the \d+ bytes that POINTS 2") as info:
        while fed < 64 * MiB:
            decoder.feed(b"\n" * (64 << 10))
            fed += 64 << 10
    assert fed < 1 * MiB
    assert info.value.offset is not None and info.value.offset < len(head) + 1 * MiB


def test_allow_link_local_is_the_only_way_there(tmp_path: Path) -> None:
    """A private deployment serving from a link-local address says so in its config; without
    the switch such a base URL is a config error naming the key. Non-HTTP schemes stay
    refused either way."""
    metadata = "http://169.254.169.254/latest/meta-data/"
    assert url_reason(metadata, allow_link_local=False) is not None
    assert url_reason(metadata, allow_link_local=True) is None
    assert url_reason("http://127.0.0.1:8080/x", allow_link_local=False) is None
    assert url_reason("http://10.1.2.3/x", allow_link_local=False) is None
    assert url_reason("file:///etc/passwd", allow_link_local=True) is not None
    section = {"base_url": "http://169.254.10.1/playment", "project_id": "p",
               "api_key_env": "BI_PLAYMENT_KEY"}  # fmt: skip
    with pytest.raises(ConfigError, match=r"providers\.playment\.base_url is a link-local"):
        parse_config({"providers": {"playment": section}}, source=tmp_path / "c.toml")
    allowed = {"providers": {"playment": {**section, "allow_link_local": True}}}
    assert parse_config(allowed, source=tmp_path / "c.toml").providers["playment"].base_url
