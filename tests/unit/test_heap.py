"""``harvester.heap``: decoding reuses its scratch memory instead of faulting it in per block.

Each case runs in a fresh interpreter (the thresholds are process-wide and stay once set)
that loads 1 MiB chunks of a mask, as a download's arrive (each a fresh allocation, no large
buffer freed before), and decodes them three times; the page faults of the second and third
pass are counted (``RUSAGE_THREAD``). With glibc's adaptive thresholds each block's
temporaries went back to the kernel and were faulted in again: hundreds of faults per MiB.
"""

from __future__ import annotations

import pickle
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harvester.heap import keep_scratch_memory

PROBE = r"""
import pickle, resource, sys
from harvester.decode import MaskDecoder
from harvester.heap import keep_scratch_memory

if sys.argv[2] == "keep":
    keep_scratch_memory()
with open(sys.argv[1], "rb") as f:
    chunks = pickle.load(f)
for rep in range(3):
    if rep == 1:
        start = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    decoder = MaskDecoder()
    for c in chunks:
        decoder.feed(c)
    decoder.finish()
print(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - start)
"""


def _faults_per_mib(chunks: Path, mib: float, mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(chunks), mode],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout) / (2 * mib)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_decoding_reuses_its_scratch_memory(tmp_path: Path) -> None:
    labels = np.random.default_rng(3).integers(0, 60, 4_000_000)
    body = ("[" + ", ".join(map(str, labels.tolist())) + "]").encode()
    chunks = tmp_path / "chunks.pickle"
    chunks.write_bytes(
        pickle.dumps([body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20)])
    )
    mib = len(body) / (1 << 20)
    kept = _faults_per_mib(chunks, mib, "keep")
    default = _faults_per_mib(chunks, mib, "default")
    # a MiB is 256 pages of 4 KiB: a few faults per MiB is noise, hundreds a refill
    assert kept < 8, (kept, default)
    assert default > 10 * max(kept, 1), (kept, default)


def test_setting_the_thresholds_is_idempotent() -> None:
    assert keep_scratch_memory() == keep_scratch_memory()
