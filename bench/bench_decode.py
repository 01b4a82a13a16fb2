"""Throughput of the mask decoder against the obvious alternatives, and its streaming memory.

    python bench/bench_decode.py [--json OUT] [--points N] [--runs R]

Builds two wrapped masks of 2,000,000 labels (0..59 and 0..65535, 20 per line like Playment's
files) and measures, best of R runs, MB of mask text per second for:

- ``MaskDecoder.feed`` in 1 MiB chunks (validation is always on),
- ``orjson.loads`` + ``np.array(..., dtype=np.uint32)``,
- ``np.fromstring(body, sep=",")`` on the text without brackets,
- the decoder's cost of validation, estimated by timing its validation steps alone.

Then streams a ~100 MB mask, generated chunk by chunk so the input is never held in memory,
through ``feed`` in a child process and reports its peak RSS growth (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harvester.decode import MaskDecoder

CHUNK = 1 << 20
PER_LINE = 20
#: decoder MB/s must be at least this many times each baseline's
TARGETS = {"orjson": 8.0, "fromstring": 3.0}


@dataclass
class Entry:
    name: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None
    target: float | None = None
    met: bool | None = None


def wrapped_mask(labels: np.ndarray[Any, Any]) -> bytes:
    """``[a, b, ...,\\n c, ...]`` with PER_LINE labels per line."""
    text = [str(v) for v in labels.tolist()]
    lines = [", ".join(text[i : i + PER_LINE]) for i in range(0, len(text), PER_LINE)]
    return ("[" + ",\n ".join(lines) + "]").encode()


def best_of(runs: int, fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Best time of each function over ``runs`` rounds. Rounds run every function once, in
    turn, so a noisy neighbour slows all of them alike instead of skewing one ratio."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def decode_stream(data: bytes) -> list[np.ndarray[Any, Any]]:
    view = memoryview(data)
    decoder = MaskDecoder()
    out = [decoder.feed(view[i : i + CHUNK]) for i in range(0, len(data), CHUNK)]
    out.append(decoder.finish())
    return out


def validation_only(data: bytes) -> None:
    """The passes the decoder makes only to validate, per 1 MiB block: the scan for bytes
    above '9', the count of bytes up to ' ' and the check that none is a control byte (the
    per-digit compares also find where numbers start, so parsing needs them anyway)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    for i in range(0, len(buf), CHUNK):
        block = buf[i : i + CHUNK]
        _ = int(block.max()) > 0x39
        _ = np.count_nonzero(block <= 0x20)
        _ = int((block ^ np.uint8(21)).min()) < 31


def measure(label: str, labels: np.ndarray[Any, Any], runs: int) -> list[Entry]:
    data = wrapped_mask(labels)
    mb = len(data) / 1e6
    got = np.concatenate(decode_stream(data))
    if not np.array_equal(got, labels):
        raise SystemExit(f"{label}: decoder output differs from the input labels")
    body = data.strip().strip(b"[]")

    def fromstring() -> object:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.fromstring(body, sep=",")

    times = best_of(
        runs,
        {
            "decoder": lambda: decode_stream(data),
            "orjson": lambda: np.array(orjson.loads(data), dtype=np.uint32),
            "fromstring": fromstring,
            "validation": lambda: validation_only(data),
        },
    )
    decoder_s, orjson_s = times["decoder"], times["orjson"]
    fromstring_s, check_s = times["fromstring"], times["validation"]

    dec = mb / decoder_s
    entries = [
        Entry(f"{label}: MaskDecoder.feed, 1 MiB chunks", dec, "MB/s"),
        Entry(f"{label}: orjson.loads + np.array", mb / orjson_s, "MB/s"),
        Entry(f"{label}: np.fromstring(sep=',')", mb / fromstring_s, "MB/s"),
    ]
    for base, secs in (("orjson", orjson_s), ("fromstring", fromstring_s)):
        ratio = dec / (mb / secs)
        entries.append(
            Entry(
                f"{label}: decoder vs {base}",
                ratio,
                "x",
                baseline=base,
                baseline_value=mb / secs,
                ratio=ratio,
                target=TARGETS[base],
                met=ratio >= TARGETS[base],
            )
        )
    entries.append(
        Entry(f"{label}: validation share of decode time", 100 * check_s / decoder_s, "%")
    )
    return entries


def generated_chunks(total: int, seed: int = 1) -> Iterator[bytes]:
    """A ~``total``-byte wrapped mask (labels 0..65535), one chunk at a time."""
    rng = np.random.default_rng(seed)
    yield b"["
    produced, first = 0, True
    while produced < total:
        block = rng.integers(0, 65536, 150_000)
        text = wrapped_mask(block)[1:-1]
        chunk = text if first else b",\n " + text
        first = False
        produced += len(chunk)
        for i in range(0, len(chunk), CHUNK):
            yield chunk[i : i + CHUNK]
    yield b"]"


def stream_rss(total: int, *, decode: bool) -> dict[str, float]:
    """In a child process: peak RSS growth (VmHWM) while streaming ``total`` generated bytes,
    through ``feed`` when ``decode``, else only generated (the generator's own share)."""

    def hwm_kib() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM in /proc/self/status")

    chunks = generated_chunks(total)
    decoder = MaskDecoder()
    # Warm up (the decoder's work buffers, the generator's first block) before the baseline.
    for _ in range(2):
        chunk = next(chunks)
        if decode:
            decoder.feed(chunk)
    before = hwm_kib()
    fed = 0
    for chunk in chunks:
        fed += len(chunk)
        if decode:
            decoder.feed(chunk)
    if decode:
        decoder.finish()
    return {"growth_mib": (hwm_kib() - before) / 1024, "fed_mb": fed / 1e6, "labels": decoder.count}


def child_rss(total: int, decode: bool) -> dict[str, float]:
    mode = "--child-decode" if decode else "--child-generate"
    child = subprocess.run(
        [sys.executable, __file__, mode, str(total)], check=True, capture_output=True, text=True
    )
    result: dict[str, float] = json.loads(child.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the entries here as JSON")
    parser.add_argument("--points", type=int, default=2_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--stream-mb", type=int, default=100)
    parser.add_argument("--child-decode", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-generate", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child_decode or args.child_generate:
        total = args.child_decode or args.child_generate
        print(json.dumps(stream_rss(total, decode=bool(args.child_decode))))
        return

    rng = np.random.default_rng(0)
    entries: list[Entry] = []
    for label, high in (("labels 0..59", 60), ("labels 0..65535", 65536)):
        labels = rng.integers(0, high, args.points).astype(np.uint32)
        entries += measure(label, labels, args.runs)

    total = args.stream_mb * 10**6
    rss = child_rss(total, decode=True)
    alone = child_rss(total, decode=False)
    entries += [
        Entry(
            f"streaming {rss['fed_mb']:.0f} MB ({rss['labels']:,.0f} labels): peak RSS growth",
            rss["growth_mib"],
            "MiB",
        ),
        Entry("  of which the chunk generator alone", alone["growth_mib"], "MiB"),
    ]

    width = max(len(e.name) for e in entries)
    print(f"{'measure':<{width}}  {'value':>10}  unit  target  met")
    for e in entries:
        target = f"{e.target:g}x" if e.target is not None else ""
        met = "" if e.met is None else ("yes" if e.met else "NO")
        print(f"{e.name:<{width}}  {e.value:>10.1f}  {e.unit:<4}  {target:>6}  {met}")
    if args.json:
        args.json.write_text(json.dumps([asdict(e) for e in entries], indent=2) + "\n")


if __name__ == "__main__":
    main()
