"""Turning a finished job into files: the ``HarvestIO`` adapters write through, plus the
manifest.

Layout: ``<output.dir>/<provider>/<job key>/`` holding what the adapter writes (job.json,
result.json, labels/<frame>.npy, classes.json, outputs/...) and, last, ``MANIFEST.json``
listing every file with its size and sha256 (and dtype/shape/min/max for label arrays). The
manifest is written only when everything else is in place, so its presence means "complete".
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import mmap
import os
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import orjson

from harvester import tracing
from harvester.clock import Clock
from harvester.config import HarvestConfig
from harvester.decode import MaskDecoder, PcdLabelDecoder, smallest_uint_dtype
from harvester.download import BufferSink, ByteBudget, Sink, stream_into
from harvester.errors import CorruptDownload, DecodeError, HarvesterError, ProtocolError
from harvester.failpoints import failpoint
from harvester.fsutil import (
    AtomicFile,
    Tree,
    disk_errors,
    sha256_at,
    sweep,
    tmp_name,
    write_all,
    write_atomic,
)
from harvester.jobs import Job
from harvester.providers.base import LabelFormat, LabelFrame
from harvester.transport import Transport
from harvester.wire import RequestSpec, Resolver, Response

MANIFEST = "MANIFEST.json"
#: finished frames of an unfinished harvest (``JobOutput``); never in a complete folder
JOURNAL = ".frames-journal.jsonl"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_STAGING_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_JOURNAL_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
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
    Both files live in the folder ``dir_fd`` (``labels/``), reached without symlinks.
    """

    def __init__(self, fmt: LabelFormat, dir_fd: int, name: str, where: str, shown: str) -> None:
        self.fmt = fmt
        self.dir_fd = dir_fd
        self.name = name
        self.where = where
        self.shown = shown
        self.staging = tmp_name(name)
        with disk_errors(shown):
            self._fd = os.open(self.staging, _STAGING_FLAGS, 0o600, dir_fd=dir_fd)
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
            with disk_errors(self.shown):
                write_all(self._fd, labels.astype(_RAW, copy=False).tobytes())
            self.count += int(labels.size)

    def reset(self) -> None:
        with disk_errors(self.shown):
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
        self._new_decoder()

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(self.staging, dir_fd=self.dir_fd)

    def finish(self, dtype_choice: str) -> ManifestEntry:
        """Decode the tail and write the final ``.npy`` (blocking: run it in a thread)."""
        try:
            tail = self.decoder.finish()
        except DecodeError as exc:
            raise DecodeError(f"{self.where}: {exc.message}") from None
        self._write(tail)
        max_label = self.decoder.max_label
        needed = smallest_uint_dtype(max(max_label, 0))
        dtype = needed if dtype_choice == "auto" else np.dtype(dtype_choice)
        if max_label > np.iinfo(dtype).max:
            raise DecodeError(
                f"{self.where}: label {max_label} does not fit {dtype} (output.label_dtype)"
            )
        failpoint("decode.finish")
        with AtomicFile(self.dir_fd, self.name, shown=self.shown) as out:
            header = {
                "descr": np.lib.format.dtype_to_descr(dtype),
                "fortran_order": False,
                "shape": (self.count,),
            }
            np.lib.format.write_array_header_1_0(_HashingWriter(out), header)
            if self.count:
                # Mapped, not read: a huge mask costs one converted block of memory.
                with (
                    disk_errors(self.shown),
                    mmap.mmap(self._fd, self.count * _RAW.itemsize, access=mmap.ACCESS_READ) as mm,
                ):
                    raw = np.frombuffer(mm, dtype=_RAW, count=self.count)
                    block = raw[:0]
                    try:
                        for start in range(0, self.count, _CONVERT_BLOCK):
                            block = raw[start : start + _CONVERT_BLOCK]
                            out.write(block.astype(dtype).tobytes())
                    finally:
                        del raw, block  # the map cannot close while an array uses it
        self.close()
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
    """A body streamed to a file under a temporary name in the folder ``dir_fd``, optionally
    held to the ``size`` and ``md5`` its listing announced. The MD5 is computed as the bytes
    stream (restarting when the body does), so the file is never read back; a body running
    past ``size`` stops at once."""

    def __init__(
        self,
        dir_fd: int,
        name: str,
        shown: str,
        *,
        size: int | None = None,
        md5: bytes | None = None,
        where: str = "",
        job: Job | None = None,
    ) -> None:
        self.dir_fd = dir_fd
        self.name = name
        self.shown = shown
        self.size = size
        self.md5 = md5
        self.where = where or name
        self.job = job
        self._open()

    def _open(self) -> None:
        self.file = AtomicFile(self.dir_fd, self.name, shown=self.shown).__enter__()
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
        self.file.abort()
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
        """fsync and rename into place (blocking: run it in a thread)."""
        self.file.__exit__(None, None, None)
        return ManifestEntry(self.file.size, self.file.sha256.hexdigest())

    def abort(self) -> None:
        self.file.abort()


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
    """One job's output folder; the ``HarvestIO`` an adapter's ``harvest`` writes through.

    Every folder is opened from ``output.dir`` down without following symlinks
    (``fsutil.Tree``), per write, so nothing planted in the tree leads a write outside it.

    Frames are resumable: each label array renamed into place is recorded in the job
    folder's journal (``JOURNAL``, one JSON line appended per frame: its source, size,
    sha256). A later attempt on the same remote job keeps a frame whose file still has that
    size and sha256 instead of fetching it again. The line is written only once the array and
    its rename are fsynced, so it never vouches for a file a crash could lose; the line itself
    needs no fsync: lost or torn, it costs one fetch again. The journal is removed just before
    ``MANIFEST.json`` is written, so a complete folder never holds it.
    """

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
        frame_concurrency: int = 1,
        budget: ByteBudget | None = None,
    ) -> None:
        self.job = job
        self.input_urls = frozenset(_urls_in(payload))
        self.relative = Path(job.provider) / job.key
        self.root = root
        self.dir = root / self.relative
        self.tree = Tree(root)
        self.parts = (job.provider, job.key)
        self.transport = transport
        self.clock = clock
        self.label_dtype = label_dtype
        self.chunk_bytes = chunk_bytes
        self.frame_concurrency = max(1, frame_concurrency)
        self.rng = rng or random.Random()
        self.budget = budget or ByteBudget(
            HarvestConfig.max_file_bytes, HarvestConfig.max_job_bytes
        )
        self.entries: dict[str, ManifestEntry] = {}
        self.decode_s = 0.0
        #: frames kept from an earlier attempt / fetched by this one
        self.frames_kept = 0
        self.frames_fetched = 0
        with self.tree.folder(self.parts) as fd, disk_errors(str(self.dir)):
            # An earlier attempt cut off after its manifest but before the store's commit left
            # a MANIFEST.json that would vouch for files this attempt is about to replace.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(MANIFEST, dir_fd=fd)
            sweep(fd)
            self._journal = self._read_journal(fd)

    def _path(self, relpath: str) -> tuple[str, ...]:
        path = PurePosixPath(relpath)
        parts = path.parts
        if not parts or path.is_absolute() or any(p in ("..", ".", "") for p in parts):
            raise ProtocolError(f"refusing to write outside the job folder: {relpath!r}")
        if relpath in (MANIFEST, JOURNAL):
            raise ProtocolError(f"{relpath} is written by harvester itself")
        return parts

    # -- the journal of finished frames ---------------------------------------------------
    def _read_journal(self, fd: int) -> dict[str, dict[str, Any]]:
        try:
            jfd = os.open(JOURNAL, os.O_RDONLY | _NOFOLLOW, dir_fd=fd)
        except FileNotFoundError:
            return {}
        try:
            data = b"".join(iter(lambda: os.read(jfd, 1 << 20), b""))
        finally:
            os.close(jfd)
        kept: dict[str, dict[str, Any]] = {}
        for line in data.splitlines():
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a line torn by a crash: that frame is fetched again
            if isinstance(rec, dict) and rec.get("remote_id") == self.job.remote_id:
                kept[str(rec.get("path"))] = rec
        return kept

    def _journal_add(self, relpath: str, source: str, entry: ManifestEntry) -> None:
        rec = {
            "remote_id": self.job.remote_id,
            "path": relpath,
            "source": source,
            "label_dtype": self.label_dtype,
            "entry": entry.as_json(),
        }
        with self.tree.folder(self.parts) as fd, disk_errors(f"{self.dir}/{JOURNAL}"):
            jfd = os.open(JOURNAL, _JOURNAL_FLAGS, 0o644, dir_fd=fd)
            try:
                write_all(jfd, orjson.dumps(rec) + b"\n")  # one write: O_APPEND keeps it whole
            finally:
                os.close(jfd)

    def _kept(self, relpath: str, source: str | None, dir_fd: int, name: str) -> bool:
        """Whether the frame at ``relpath`` is on disk, whole, from ``source`` already."""
        rec = self._journal.get(relpath)
        if source is None or rec is None:
            return False
        entry = rec.get("entry")
        if (
            rec.get("source") != source
            or rec.get("label_dtype") != self.label_dtype
            or not isinstance(entry, dict)
        ):
            return False
        on_disk = sha256_at(dir_fd, name)
        if on_disk is None or on_disk != (entry.get("bytes"), entry.get("sha256")):
            return False
        extra = {k: v for k, v in entry.items() if k not in ("bytes", "sha256")}
        self.entries[relpath] = ManifestEntry(on_disk[0], on_disk[1], extra)
        return True

    async def _stream(self, resolve: Resolver, sink: Sink, what: str) -> None:
        """Download ``resolve()``'s body into ``sink`` under this job's budget and settings."""
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

    # -- HarvestIO ------------------------------------------------------------------------
    async def request(self, spec: RequestSpec) -> Response:
        return await self.transport.call(spec, lambda r: r, job=self.job.key)

    async def fetch(self, resolve: Resolver, *, what: str) -> bytes:
        sink = BufferSink(MAX_FETCH_BYTES, what)
        with tracing.span("download", file=what):
            await self._stream(resolve, sink, what)
        return sink.value()

    async def label_frames(self, frames: Sequence[LabelFrame]) -> None:
        todo = iter(frames)
        failed: list[HarvesterError] = []

        async def worker(scope: anyio.CancelScope) -> None:
            for f in todo:  # one shared iterator: each worker takes the next frame
                try:
                    await self.labels(
                        f.name,
                        f.resolve,
                        f.fmt,
                        source=f.source,
                        frame=f.frame_id,
                        sensor_id=f.sensor_id,
                    )
                except HarvesterError as exc:
                    # One clear error, not an ExceptionGroup: the engine classifies it.
                    failed.append(exc)
                    scope.cancel()
                    return

        async with anyio.create_task_group() as tg:
            for _ in range(min(self.frame_concurrency, len(frames))):
                tg.start_soon(worker, tg.cancel_scope)
        if failed:
            raise failed[0]

    async def labels(
        self,
        name: str,
        resolve: Resolver,
        fmt: LabelFormat,
        *,
        source: str | None = None,
        frame: str | None = None,
        sensor_id: str | None = None,
    ) -> None:
        relpath = f"labels/{name}.npy"
        where = f"{self.job.label} frame {frame if frame is not None else name}"
        if sensor_id is not None:
            where += f" sensor {sensor_id}"
        parts = self._path(relpath)
        shown = f"{self.dir}/{relpath}"
        try:
            with (
                tracing.span("decode", file=relpath),
                self.tree.folder(self.parts + parts[:-1]) as dir_fd,
            ):
                if relpath in self._journal and await anyio.to_thread.run_sync(
                    self._kept, relpath, source, dir_fd, parts[-1]
                ):
                    self.frames_kept += 1
                    return
                sink = LabelSink(fmt, dir_fd, parts[-1], where, shown)
                try:
                    await self._stream(resolve, sink, relpath)
                    # Converting, writing and fsyncing a big array would stall every other
                    # job's requests: a worker thread does it.
                    entry = await anyio.to_thread.run_sync(sink.finish, self.label_dtype)
                    # Which frame and sensor an array holds, so nobody has to parse names.
                    if frame is not None:
                        entry.extra["frame"] = frame
                    if sensor_id is not None:
                        entry.extra["sensor_id"] = sensor_id
                finally:
                    self.decode_s += sink.decode_s
                    sink.close()
            self.entries[relpath] = entry
            self.frames_fetched += 1
            if source is not None:
                await anyio.to_thread.run_sync(self._journal_add, relpath, source, entry)
        except HarvesterError as exc:
            if exc.provider is None:
                exc.provider = self.job.provider
            if exc.job is None:
                exc.job = self.job.key
            raise

    async def download(
        self, relpath: str, resolve: Resolver, *, size: int | None = None, md5: bytes | None = None
    ) -> None:
        parts = self._path(relpath)
        with (
            tracing.span("download", file=relpath),
            self.tree.folder(self.parts + parts[:-1]) as dir_fd,
        ):
            sink = FileSink(
                dir_fd,
                parts[-1],
                f"{self.dir}/{relpath}",
                size=size,
                md5=md5,
                where=relpath,
                job=self.job,
            )
            try:
                await self._stream(resolve, sink, relpath)
                sink.check()
                self.entries[relpath] = await anyio.to_thread.run_sync(sink.commit)
            finally:
                sink.abort()

    def write_bytes(self, relpath: str, data: bytes) -> None:
        parts = self._path(relpath)
        with (
            tracing.span("write", file=relpath),
            self.tree.folder(self.parts + parts[:-1]) as dir_fd,
        ):
            size, digest = write_atomic(dir_fd, parts[-1], data, shown=f"{self.dir}/{relpath}")
        self.entries[relpath] = ManifestEntry(size, digest)

    def write_json(self, relpath: str, obj: Any) -> None:
        self.write_bytes(relpath, orjson.dumps(obj, option=orjson.OPT_INDENT_2))

    def manifest_bytes(self, *, harvested_at: float) -> bytes:
        manifest = {
            "provider": self.job.provider,
            "job_key": self.job.key,
            "reference_id": self.job.reference_id,
            "remote_id": self.job.remote_id,
            "harvested_at": harvested_at,
            "files": {k: self.entries[k].as_json() for k in sorted(self.entries)},
        }
        return orjson.dumps(manifest, option=orjson.OPT_INDENT_2)

    async def publish(self, *, harvested_at: float) -> Path:
        """Complete the output (``MANIFEST.json`` last); returns its folder relative to
        ``output.dir``. An object-store output uploads the folder here (``objoutput``)."""
        return self.write_manifest(harvested_at=harvested_at)

    def write_manifest(self, *, harvested_at: float) -> Path:
        data = self.manifest_bytes(harvested_at=harvested_at)
        with tracing.step("write", self.job, file=MANIFEST), self.tree.folder(self.parts) as fd:
            with disk_errors(f"{self.dir}/{JOURNAL}"), contextlib.suppress(FileNotFoundError):
                os.unlink(JOURNAL, dir_fd=fd)
            failpoint("harvest.before_manifest")
            write_atomic(
                fd,
                MANIFEST,
                data,
                shown=f"{self.dir}/{MANIFEST}",
            )
        failpoint("harvest.after_manifest")
        return self.relative
