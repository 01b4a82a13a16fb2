"""Turning a finished job into files: the ``HarvestIO`` adapters write through, plus the
manifest.

Layout: ``<output.dir>/<provider>/<job key>/`` holding what the adapter writes (job.json,
result.json, labels/<frame>.npy, classes.json, outputs/...) and, last, ``MANIFEST.json``
listing every file with its size and sha256 (and dtype/shape/min/max for label arrays). The
manifest is written only when everything else is in place, so its presence means "complete".
"""

from __future__ import annotations

import base64
import hashlib
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson

from harvester.clock import Clock
from harvester.config import HarvestConfig
from harvester.decode import MaskDecoder, PcdLabelDecoder, smallest_uint_dtype
from harvester.download import BufferSink, ByteBudget, stream_into
from harvester.errors import CorruptDownload, DecodeError, HarvesterError, ProtocolError
from harvester.failpoints import failpoint
from harvester.fsutil import AtomicFile, sweep_temporaries, tmp_name, write_atomic
from harvester.jobs import Job
from harvester.providers.base import LabelFormat, RequestSpec, Resolver, Response
from harvester.transport import Transport

MANIFEST = "MANIFEST.json"
MAX_FETCH_BYTES = 512 << 20
_RAW = np.dtype("<u4")  # staging dtype: every label the decoders accept fits
_CONVERT_BLOCK = 1 << 20  # elements converted per step when writing the final .npy


@dataclass
class ManifestEntry:
    bytes: int
    sha256: str
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "sha256": self.sha256, **self.extra}


class LabelSink:
    """Decoder -> a raw uint32 staging file; ``finish`` writes the final ``.npy``.

    Labels are staged on disk rather than in memory so a huge mask costs one chunk of RAM;
    the final dtype (the smallest that holds the largest label) is known only at the end.
    """

    def __init__(self, fmt: LabelFormat, staging: Path, where: str) -> None:
        self.fmt = fmt
        self.staging = staging
        self.where = where
        self._fh: BinaryIO = open(staging, "wb")  # noqa: SIM115 - closed in finish/close
        self._new_decoder()

    def _new_decoder(self) -> None:
        self.decoder: MaskDecoder | PcdLabelDecoder = (
            MaskDecoder() if self.fmt == "mask" else PcdLabelDecoder()
        )
        self.count = 0
        self.min_label: int | None = None
        self.decode_s = 0.0

    @property
    def offset(self) -> int:
        return int(self.decoder.offset)

    def feed(self, chunk: bytes) -> None:
        t0 = time.perf_counter()
        try:
            labels = self.decoder.feed(chunk)
        except DecodeError as exc:
            raise DecodeError(f"{self.where}: {exc.message}") from None
        self._write(labels)
        self.decode_s += time.perf_counter() - t0

    def _write(self, labels: np.ndarray[Any, Any]) -> None:
        if labels.size:
            low = int(labels.min())
            self.min_label = low if self.min_label is None else min(self.min_label, low)
            self._fh.write(labels.astype(_RAW, copy=False).tobytes())
            self.count += int(labels.size)

    def reset(self) -> None:
        self._fh.seek(0)
        self._fh.truncate()
        self._new_decoder()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self.staging.unlink(missing_ok=True)

    def finish(self, final: Path, dtype_choice: str) -> ManifestEntry:
        try:
            tail = self.decoder.finish()
        except DecodeError as exc:
            raise DecodeError(f"{self.where}: {exc.message}") from None
        self._write(tail)
        self._fh.flush()
        self._fh.close()
        max_label = self.decoder.max_label
        needed = smallest_uint_dtype(max(max_label, 0))
        dtype = needed if dtype_choice == "auto" else np.dtype(dtype_choice)
        if max_label > np.iinfo(dtype).max:
            raise DecodeError(
                f"{self.where}: label {max_label} does not fit {dtype} (output.label_dtype)"
            )
        failpoint("decode.finish")
        raw = (
            np.memmap(self.staging, dtype=_RAW, mode="r", shape=(self.count,))
            if self.count
            else np.zeros(0, dtype=_RAW)
        )
        with AtomicFile(final) as out:
            header = {
                "descr": np.lib.format.dtype_to_descr(dtype),
                "fortran_order": False,
                "shape": (self.count,),
            }
            out_fh = _HashingWriter(out)
            np.lib.format.write_array_header_1_0(out_fh, header)
            for start in range(0, self.count, _CONVERT_BLOCK):
                out.write(raw[start : start + _CONVERT_BLOCK].astype(dtype).tobytes())
        del raw
        self.staging.unlink(missing_ok=True)
        return ManifestEntry(
            out.size,
            out.sha256.hexdigest(),
            {
                "dtype": str(dtype),
                "shape": [self.count],
                "min": self.min_label if self.min_label is not None else None,
                "max": max_label if self.count else None,
            },
        )


class _HashingWriter:
    """Lets numpy's header writer go through AtomicFile (which hashes and counts)."""

    def __init__(self, target: AtomicFile) -> None:
        self.target = target

    def write(self, data: bytes) -> int:
        self.target.write(data)
        return len(data)


class FileSink:
    """A body streamed to a file under a temporary name, optionally held to the ``size`` and
    ``md5`` its listing announced. The MD5 is computed as the bytes stream (restarting when the
    body does), so the file is never read back; a body running past ``size`` stops at once."""

    def __init__(
        self,
        final: Path,
        *,
        size: int | None = None,
        md5: bytes | None = None,
        where: str = "",
        job: Job | None = None,
    ) -> None:
        self.final = final
        self.size = size
        self.md5 = md5
        self.where = where or final.name
        self.job = job
        self._open()

    def _open(self) -> None:
        self.file = AtomicFile(self.final)
        self.file.__enter__()
        self._hash = hashlib.md5(usedforsecurity=False) if self.md5 is not None else None

    @property
    def offset(self) -> int:
        return self.file.size

    def feed(self, chunk: bytes) -> None:
        if self.size is not None and self.file.size + len(chunk) > self.size:
            raise self._corrupt(f"storage sent more than the {self.size} bytes listed")
        self.file.write(chunk)
        if self._hash is not None:
            self._hash.update(chunk)

    def reset(self) -> None:
        self.file.__exit__(RuntimeError, RuntimeError("reset"), None)
        self._open()

    def check(self) -> None:
        """``CorruptDownload`` unless the body is the one the listing announced."""
        got = self.file.size
        if self.size is not None and got != self.size:
            raise self._corrupt(
                f"{got} bytes arrived, the listing says {self.size} (Content-Length)"
            )
        if self._hash is not None and self.md5 is not None:
            digest = self._hash.digest()
            if digest != self.md5:
                raise self._corrupt(
                    f"the bytes' MD5 is {_b64(digest)}, the listing says {_b64(self.md5)}"
                    " (Content-MD5)"
                )

    def _corrupt(self, detail: str) -> CorruptDownload:
        return CorruptDownload(
            f"{self.where}: {detail}",
            provider=self.job.provider if self.job else None,
            job=self.job.key if self.job else None,
        )

    def commit(self) -> ManifestEntry:
        self.file.__exit__(None, None, None)
        return ManifestEntry(self.file.size, self.file.sha256.hexdigest())

    def abort(self) -> None:
        if self.file.tmp.exists():
            self.file.__exit__(RuntimeError, RuntimeError("abort"), None)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _urls_in(value: Any, depth: int = 0) -> Iterator[str]:
    """Every http(s) URL string in a JSON value (bounded depth: payloads are ours to parse)."""
    if depth > 64:
        return
    if isinstance(value, str):
        if value.startswith(("http://", "https://")):
            yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _urls_in(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            yield from _urls_in(v, depth + 1)


class JobOutput:
    """One job's output folder; the ``HarvestIO`` an adapter's ``harvest`` writes through."""

    def __init__(
        self,
        root: Path,
        job: Job,
        *,
        transport: Transport,
        clock: Clock,
        label_dtype: str,
        chunk_bytes: int,
        payload: Mapping[str, Any] | None = None,
        rng: random.Random | None = None,
        budget: ByteBudget | None = None,
    ) -> None:
        self.job = job
        self.input_urls = frozenset(_urls_in(payload))
        self.relative = Path(job.provider) / job.key
        self.dir = root / self.relative
        self.transport = transport
        self.clock = clock
        self.label_dtype = label_dtype
        self.chunk_bytes = chunk_bytes
        self.rng = rng or random.Random()
        self.budget = budget or ByteBudget(
            HarvestConfig.max_file_bytes, HarvestConfig.max_job_bytes
        )
        self.entries: dict[str, ManifestEntry] = {}
        self.decode_s = 0.0
        self.dir.mkdir(parents=True, exist_ok=True)
        # An earlier attempt cut off after its manifest but before the store's commit left a
        # MANIFEST.json that would vouch for files this attempt is about to replace.
        (self.dir / MANIFEST).unlink(missing_ok=True)
        sweep_temporaries(self.dir)

    def _path(self, relpath: str) -> Path:
        parts = Path(relpath).parts
        if not parts or Path(relpath).is_absolute() or any(p in ("..", ".", "") for p in parts):
            raise ProtocolError(f"refusing to write outside the job folder: {relpath!r}")
        if relpath == MANIFEST:
            raise ProtocolError(f"{MANIFEST} is written by harvester itself")
        return self.dir / relpath

    async def request(self, spec: RequestSpec) -> Response:
        return await self.transport.call(spec, lambda r: r, job=self.job.key)

    async def fetch(self, resolve: Resolver, *, what: str) -> bytes:
        sink = BufferSink(MAX_FETCH_BYTES, what)
        await stream_into(
            self.transport,
            resolve,
            sink,
            what=what,
            job=self.job.key,
            clock=self.clock,
            budget=self.budget,
            chunk_bytes=self.chunk_bytes,
            rng=self.rng,
        )
        return sink.value()

    async def labels(
        self,
        name: str,
        resolve: Resolver,
        fmt: LabelFormat,
        *,
        frame: str | None = None,
        sensor_id: str | None = None,
    ) -> None:
        relpath = f"labels/{name}.npy"
        final = self._path(relpath)
        final.parent.mkdir(parents=True, exist_ok=True)
        where = f"{self.job.label} frame {frame if frame is not None else name}"
        if sensor_id is not None:
            where += f" sensor {sensor_id}"
        sink = LabelSink(fmt, tmp_name(final), where)
        try:
            await stream_into(
                self.transport,
                resolve,
                sink,
                what=relpath,
                job=self.job.key,
                clock=self.clock,
                budget=self.budget,
                chunk_bytes=self.chunk_bytes,
                rng=self.rng,
            )
            entry = sink.finish(final, self.label_dtype)
            # Which frame and sensor an array holds, so nobody has to parse file names.
            if frame is not None:
                entry.extra["frame"] = frame
            if sensor_id is not None:
                entry.extra["sensor_id"] = sensor_id
            self.entries[relpath] = entry
        except HarvesterError as exc:
            if exc.provider is None:
                exc.provider = self.job.provider
            if exc.job is None:
                exc.job = self.job.key
            raise
        finally:
            self.decode_s += sink.decode_s
            sink.close()

    async def download(
        self, relpath: str, resolve: Resolver, *, size: int | None = None, md5: bytes | None = None
    ) -> None:
        final = self._path(relpath)
        sink = FileSink(final, size=size, md5=md5, where=relpath, job=self.job)
        try:
            await stream_into(
                self.transport,
                resolve,
                sink,
                what=relpath,
                job=self.job.key,
                clock=self.clock,
                budget=self.budget,
                chunk_bytes=self.chunk_bytes,
                rng=self.rng,
            )
            sink.check()
            self.entries[relpath] = sink.commit()
        finally:
            sink.abort()

    def write_bytes(self, relpath: str, data: bytes) -> None:
        size, digest = write_atomic(self._path(relpath), data)
        self.entries[relpath] = ManifestEntry(size, digest)

    def write_json(self, relpath: str, obj: Any) -> None:
        self.write_bytes(relpath, orjson.dumps(obj, option=orjson.OPT_INDENT_2))

    def write_manifest(self, *, harvested_at: float) -> Path:
        manifest = {
            "provider": self.job.provider,
            "job_key": self.job.key,
            "reference_id": self.job.reference_id,
            "remote_id": self.job.remote_id,
            "harvested_at": harvested_at,
            "files": {k: self.entries[k].as_json() for k in sorted(self.entries)},
        }
        failpoint("harvest.before_manifest")
        write_atomic(self.dir / MANIFEST, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        failpoint("harvest.after_manifest")
        return self.relative
