"""Harvesting to object storage next to local disk, and the memory of one 100 MB upload.

Servers, each in its own process or thread on loopback, started as ``tests/objstore`` starts
them: the emulator (``python -m harvester.cli emulator``), moto's threaded S3 server (in this
script's process; ``moto[server]``) and Azurite's blob service (npm ``azurite``, its own
process, blobs in memory).

- **Throughput**: ``harvester harvest -c CONFIG --json jobs.jsonl`` (the real command line,
  from an empty store to exit 0) on the same kind of jobs (point-cloud jobs of one frame of
  100,000 points, 2 s at the emulator, no faults, no rate limit, ``harvest.concurrency = 8``)
  with ``output.dir`` a local folder (the baseline), ``s3://`` on moto and ``az://`` on
  Azurite. Each round runs the three in turn with fresh jobs (same sizes, new references) and
  a fresh store; the figure is the best round of each (jobs / wall seconds). Every job must end
  harvested, and every job's ``MANIFEST.json`` must be in the bucket, read with the store's own
  client (boto3, azure-storage-blob), not harvester's.
- **Upload memory**: a child process (``bench_objstore.py upload-child``) writes a 100 MB
  file (20 MB with ``--quick``), resets its ``VmHWM`` (``/proc/self/clear_refs``) and publishes
  the file with ``Bucket.upload`` exactly as a harvest publishes a ``.npy`` (multipart / block
  upload of ``output.part_bytes`` = 8 MiB parts, two in flight, re-hashed as it streams). The
  figure is the growth of its peak RSS over the RSS before the upload; the server's memory is
  in another process and does not count.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from bench_common import (
    PYTHON,
    ROOT,
    EmulatorProcess,
    Figure,
    bench_main,
    child_env,
    emu_stats,
    harvester_config,
    harvester_harvest,
    log,
    scenario_toml,
    write_create_jobs,
)

# The tests' Azurite (tests/azurite, which imports tests.required). tests/ is a namespace
# package, and modzy-sdk's wheel installs a regular top-level ``tests`` package, which Python
# prefers wherever it is on the path: name ours explicitly.
_tests = types.ModuleType("tests")
_tests.__path__ = [str(ROOT / "tests")]
sys.modules["tests"] = _tests

from tests.azurite.server import ACCOUNT, ACCOUNT_KEY, Azurite  # noqa: E402

POINTS = 100_000
JOB_S = 2.0
S3_KEY_ID = "bench-s3-key-id"
S3_SECRET = "bench-s3-secret-0123456789"  # moto accepts any key
REGION = "us-east-1"
#: throughput to object storage, as a fraction of local disk's, on the same jobs
MIN_RATIO = 0.3
#: the same bound as the decoder's streaming memory (issue 8): growth below 64 MB
MAX_UPLOAD_GROWTH_MB = 64.0
SECRETS_ENV = {
    "BENCH_S3_KEY_ID": S3_KEY_ID,
    "BENCH_S3_SECRET": S3_SECRET,
    "BENCH_AZ_KEY": ACCOUNT_KEY,
}


@dataclass
class Target:
    """One ``output.dir``: its ``[output]`` table and how to count the manifests written."""

    name: str
    label: str
    output: dict[str, Any]
    client: Any = None
    bucket: str = ""

    def manifests(self, folder: Path, prefix: str) -> int:
        if self.name == "local":
            return sum(1 for _ in (folder / prefix).glob("playment/*/MANIFEST.json"))
        if self.name == "s3":
            n = 0
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix + "/"
            )
            for page in pages:
                n += sum(1 for o in page.get("Contents", []) if o["Key"].endswith("/MANIFEST.json"))
            return n
        return sum(
            1
            for b in self.client.list_blobs(name_starts_with=prefix + "/")
            if b.name.endswith("/MANIFEST.json")
        )


@contextmanager
def object_stores() -> Iterator[tuple[Target, Target]]:
    """moto's S3 server and Azurite, each with a fresh bucket / container."""
    import boto3
    from azure.storage.blob import BlobServiceClient
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    tag = secrets.token_hex(4)
    with ExitStack() as stack:
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        stack.callback(moto.stop)
        host, port = moto.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=S3_KEY_ID,
            aws_secret_access_key=S3_SECRET,
            region_name=REGION,
        )
        bucket = f"bench-{tag}"
        s3.create_bucket(Bucket=bucket)
        s3_target = Target(
            "s3",
            "s3:// on moto",
            {
                "endpoint": endpoint,
                "region": REGION,
                "access_key_id_env": "BENCH_S3_KEY_ID",
                "secret_access_key_env": "BENCH_S3_SECRET",
            },
            s3,
            bucket,
        )
        azurite = Azurite("azurite-blob")
        azurite.start()
        stack.callback(azurite.stop)
        service = BlobServiceClient(azurite.account_url, credential=ACCOUNT_KEY)
        container = service.create_container(f"bench-{tag}")
        az_target = Target(
            "az",
            "az:// on Azurite",
            {
                "endpoint": azurite.account_url,
                "account_name": ACCOUNT,
                "account_key_env": "BENCH_AZ_KEY",
            },
            container,
            f"bench-{tag}",
        )
        yield s3_target, az_target


def run(args: argparse.Namespace, work: Path) -> list[Figure]:
    n = 60 if args.quick else 300
    rounds = 1 if args.quick else 2
    upload_mb = 20 if args.quick else 100
    os.environ.update(SECRETS_ENV)  # child_env() passes them on, by reference in the configs
    figures: list[Figure] = []
    with (
        object_stores() as (s3, az),
        EmulatorProcess(work, scenario_toml(job_duration_s=JOB_S, points_per_frame=POINTS)) as emu,
    ):
        targets = [Target("local", "local disk", {}), s3, az]
        times: dict[str, list[float]] = {t.name: [] for t in targets}
        for r in range(rounds):
            for t in targets:
                name = f"{t.name}-{r}"
                times[t.name].append(_harvest(work, emu, t, name, n))
        local_best = n / min(times["local"])
        for t in targets[1:]:
            best = n / min(times[t.name])
            ratio = best / local_best
            figures.append(
                Figure(
                    name=f"harvest throughput to {t.label} ({n} jobs, 1 frame of"
                    f" {POINTS:,} points)",
                    value=round(best, 2),
                    unit="jobs/s",
                    baseline="the same jobs to local disk",
                    baseline_value=round(local_best, 2),
                    target=f">= {MIN_RATIO:g}x local disk",
                    met=ratio >= MIN_RATIO,
                    note=(
                        f"`harvester harvest` from an empty store to exit 0, best of {rounds}"
                        f" round(s); wall seconds per round: {t.name}"
                        f" {', '.join(f'{x:.1f}' for x in times[t.name])}, local"
                        f" {', '.join(f'{x:.1f}' for x in times['local'])}. Each job publishes"
                        f" its .npy, result and MANIFEST.json (staged locally first);"
                        f" {ratio:.2f}x local"
                        + ("." if ratio >= MIN_RATIO else f", short of {MIN_RATIO:g}x.")
                    ),
                    detail={"seconds": times[t.name], "local_seconds": times["local"], "jobs": n},
                ).with_ratio()
            )
        for t in (s3, az):
            figures.append(_upload_memory(t, upload_mb))
    return figures


def _harvest(work: Path, emu: EmulatorProcess, t: Target, name: str, n: int) -> float:
    """One ``harvester harvest`` of ``n`` new jobs to ``t``; its wall seconds."""
    prefix = f"bench/{name}"
    if t.name == "local":
        output: dict[str, Any] = {"dir": "output"}
        place = work / name / "output"
    else:
        output = {
            "dir": f"{t.name}://{t.bucket}/{prefix}",
            "staging_dir": str(work / name / "staging"),
            **t.output,
        }
        place = Path()
    cfg = harvester_config(
        work, emu, name=name, rate_per_s=0, max_concurrency=64, poll_min_s=1.0, output=output
    )
    jobs_file = cfg.parent / "jobs.jsonl"
    write_create_jobs(jobs_file, (f"{name}-{i:05d}" for i in range(n)))
    seconds, summary = harvester_harvest(cfg, jobs_file, what=f"harvest to {t.label}")
    harvested = summary["providers"]["playment"].get("harvested", 0)
    manifests = t.manifests(place, "" if t.name == "local" else prefix)
    log(f"{t.label}: {harvested}/{n} harvested, {manifests} manifests, {seconds:.1f} s")
    if harvested != n or manifests != n:
        raise RuntimeError(f"{t.label}: {harvested}/{n} harvested, {manifests} manifests written")
    stats = emu_stats(emu)
    if stats["playment"]["duplicate_creates"]:
        raise RuntimeError(f"duplicate creates at the emulator: {stats['playment']}")
    return seconds


# -- one upload's memory ---------------------------------------------------------------------


def _upload_memory(t: Target, mb: int) -> Figure:
    out = subprocess.run(
        [
            PYTHON,
            __file__,
            "upload-child",
            orjson.dumps({**t.output, "dir": f"{t.name}://{t.bucket}/bench/upload"}).decode(),
            str(mb),
        ],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=tempfile.gettempdir(),
        timeout=300,
    )
    if out.returncode != 0:
        raise RuntimeError(f"upload to {t.label} failed: {out.stderr[-1500:]}")
    got = orjson.loads(out.stdout)
    growth_mb = got["growth_kib"] * 1024 / 1e6
    size_mb = got["bytes"] / 1e6
    return Figure(
        name=f"peak RSS growth while uploading a {mb} MB .npy to {t.label}",
        value=round(growth_mb, 1),
        unit="MB",
        baseline="the file's size",
        baseline_value=round(size_mb, 1),
        target=f"< {MAX_UPLOAD_GROWTH_MB:g} MB",
        met=growth_mb < MAX_UPLOAD_GROWTH_MB,
        note=(
            f"`Bucket.upload` in its own process: VmHWM reset just before the upload, then"
            f" {growth_mb:.1f} MB above the {got['before_kib'] * 1024 / 1e6:.0f} MB before;"
            f" {got['bytes'] / got['seconds'] / 1e6:.0f} MB/s ({got['seconds']:.2f} s), parts of"
            f" {got['part_bytes'] >> 20} MiB, the stored object listed at the same size."
        ),
        detail=got,
    ).with_ratio()


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def upload_child(output: dict[str, Any], mb: int) -> None:
    """Publish one ``mb`` MB file as a harvest does; print its peak-RSS figures as JSON."""
    from harvester.config import parse_config
    from harvester.objstore import Bucket

    cfg = parse_config({"output": output}, source=Path(tempfile.gettempdir()) / "bench.toml")
    bucket = Bucket(cfg.output)
    size = mb * 1_000_000
    with tempfile.TemporaryFile() as fh:
        h = hashlib.sha256()
        block = os.urandom(1 << 20)
        left = size
        while left:
            piece = block[: min(left, len(block))]
            fh.write(piece)
            h.update(piece)
            left -= len(piece)
        fh.flush()
        fh.seek(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
        before = _kib("VmRSS")
        t0 = time.perf_counter()
        bucket.upload(fh, "labels/f-000.npy", size=size, sha256=h.hexdigest())
        seconds = time.perf_counter() - t0
        peak = _kib("VmHWM")
    stored = bucket.listing("labels").get("f-000.npy")
    if stored != size:
        raise RuntimeError(f"the uploaded object has {stored} bytes, not {size}")
    doc = {
        "bytes": size,
        "seconds": round(seconds, 3),
        "before_kib": before,
        "peak_kib": peak,
        "growth_kib": peak - before,
        "part_bytes": cfg.output.part_bytes,
    }
    print(orjson.dumps(doc).decode())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "upload-child":
        upload_child(orjson.loads(sys.argv[2]), int(sys.argv[3]))
    else:
        bench_main("objstore", run)
