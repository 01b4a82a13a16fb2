"""Peak memory and speed of publishing one 100 MB label array to object storage (Azurite).

    .venv/bin/python bench/measure_objstore_upload.py [--mb 100]

Writes a file of that size, starts Azurite (npm ``azurite``; as the tests do) on loopback,
and uploads the file with ``Bucket.upload`` exactly as a harvest publishes a ``.npy``
(multipart/block upload of ``output.part_bytes`` parts, re-hashed as it streams). Peak
resident memory is read from ``VmHWM`` after resetting it (``/proc/self/clear_refs``) just
before the upload, so the figure is the upload's own high-water mark, not the set-up's.
Azurite runs in its own process: what it holds does not count.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # tests/ is no package: reach its azurite/

from azurite.server import ACCOUNT, ACCOUNT_KEY, Azurite  # noqa: E402

from harvester.config import parse_config  # noqa: E402
from harvester.objstore import Bucket  # noqa: E402


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    args = ap.parse_args()
    size = args.mb * 1_000_000
    from azure.storage.blob import BlobServiceClient

    server = Azurite("azurite-blob")
    server.start()
    try:
        BlobServiceClient(server.account_url, credential=ACCOUNT_KEY).create_container("bench")
        os.environ["BENCH_AZ_KEY"] = ACCOUNT_KEY
        cfg = parse_config(
            {
                "output": {
                    "dir": "az://bench/run",
                    "endpoint": server.account_url,
                    "account_name": ACCOUNT,
                    "account_key_env": "BENCH_AZ_KEY",
                }
            },
            source=Path(tempfile.gettempdir()) / "bench.toml",
        )
        bucket = Bucket(cfg.output)
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
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
            before = rss_kib("VmRSS")
            t0 = time.perf_counter()
            bucket.upload(fh, "labels/f-000.npy", size=size, sha256=h.hexdigest())
            seconds = time.perf_counter() - t0
            peak = rss_kib("VmHWM")
        print(
            f"uploaded {args.mb} MB in {seconds:.2f} s ({size / seconds / 1e6:.0f} MB/s) to"
            f" Azurite; part size {cfg.output.part_bytes >> 20} MiB; peak RSS {peak >> 10} MiB,"
            f" {(peak - before) >> 10} MiB above the {before >> 10} MiB before the upload"
        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
