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
import functools
import hashlib
import mmap
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import anyio
import numpy as np
import orjson

from harvester import tracing
from harvester.clock import Clock
from harvester.config import HarvestConfig
from harvester.decode import MaskDecoder, PcdLabelDecoder, smallest_uint_dtype
from harvester.download import BufferSink, ByteBudget, Sink, stream_into
from harvester.errors import (
    CorruptDownload,
    DecodeError,
    HarvesterError,
    ProtocolError,
    RangeIgnored,
)
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
from harvester.heap import keep_scratch_memory
from harvester.jobs import Job
from harvester.logs import get_logger
from harvester.offload import Offload
from harvester.providers.base import LabelFormat, LabelFrame, RemoteFile
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
_HASH_BLOCK = 1 << 20  # bytes read back per step to hash ranged parts in order
log = get_logger("harvester.harvest")
T = TypeVar("T")


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
    Every method blocks (decoding, writing): the caller runs them in a worker thread.
    """

    blocking = True

    def __init__(self, fmt: LabelFormat, dir_fd: int, name: str, where: str, shown: str) -> None:
        self.fmt = fmt
        self.dir_fd = dir_fd
        self.name = name
        self.where = where
        self.shown = shown
        self.staging = tmp_name(name)
        # Set on the first label file, not at start: only decoding needs it (harvester.heap).
        keep_scratch_memory()
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
            # no cause: this is the same error, told where (the decoder's own is a repeat)
            raise DecodeError(f"{self.where}: {exc.message}") from None
        self._write(labels)
        self.decode_s += time.perf_counter() - t0

    def _write(self, labels: np.ndarray[Any, Any]) -> None:
        if labels.size:
            low = int(labels.min())
            self.min_label = low if self.min_label is None else min(self.min_label, low)
            with disk_errors(self.shown):
                write_all(self._fd, _bytes_of(labels.astype(_RAW, copy=False)))
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
            # no cause: this is the same error, told where (the decoder's own is a repeat)
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
                            out.write(_bytes_of(block.astype(dtype)))
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


def _bytes_of(array: np.ndarray[Any, Any]) -> memoryview:
    """The bytes of ``array`` without copying them: ``tobytes`` copies holding the GIL, which
    would keep another worker thread from decoding meanwhile (writes and hashing don't)."""
    contiguous: Any = np.ascontiguousarray(array)  # numpy's stubs don't declare the buffer
    return memoryview(contiguous).cast("B")


class _HashingWriter:
    """Lets numpy's header writer go through AtomicFile (which hashes and counts)."""

    def __init__(self, target: AtomicFile) -> None:
        self.target = target

    def write(self, data: bytes) -> int:
        self.target.write(data)
        return len(data)


class _Listed:
    """A file under a temporary name, held to the ``size`` and ``md5`` its listing
    announced (either may be unknown); ``commit`` renames it into place."""

    file: AtomicFile
    size: int | None
    md5: bytes | None
    _hash: Any  # hashlib's MD5 of the bytes in file order, when ``md5`` is known
    where: str
    job: Job | None

    def _corrupt(self, detail: str) -> CorruptDownload:
        return CorruptDownload(
            f"{self.where}: {detail}",
            provider=self.job.provider if self.job else None,
            job=self.job.key if self.job else None,
        )

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

    def commit(self) -> ManifestEntry:
        """fsync and rename into place (blocking: run it in a thread)."""
        self.file.__exit__(None, None, None)
        return ManifestEntry(self.file.size, self.file.sha256.hexdigest())

    def abort(self) -> None:
        self.file.abort()


class FileSink(_Listed):
    """A body streamed to a file under a temporary name in the folder ``dir_fd``, optionally
    held to the ``size`` and ``md5`` its listing announced. The MD5 is computed as the bytes
    stream (restarting when the body does), so the file is never read back; a body running
    past ``size`` stops at once. Every method but ``check`` blocks: run them in a thread."""

    blocking = True

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


class FileParts(_Listed):
    """A file of known ``size`` fetched as ranged parts in parallel, into one temporary file.

    Each part writes its bytes where they belong (``pwrite``). The sha256 for the manifest
    and the MD5 the listing announced are computed in file order all the same: bytes that
    arrive right where the hashed prefix ends are hashed at once; a part running ahead is
    read back from the file (the page cache, usually) once the prefix reaches it. So
    ``check`` holds the file to its listing exactly as ``FileSink`` does, without reading
    the whole file again. Parts of one file may be fed from several threads: a lock keeps
    the writes and the hashing in step. Every method blocks but ``part`` and ``check``.
    """

    def __init__(
        self,
        dir_fd: int,
        name: str,
        shown: str,
        *,
        size: int,
        part_bytes: int,
        md5: bytes | None,
        where: str,
        job: Job | None,
    ) -> None:
        self.size: int | None = size
        self.total = size
        self.part_bytes = part_bytes
        self.md5 = md5
        self.where = where
        self.job = job
        self.spans = [(a, min(a + part_bytes, size)) for a in range(0, size, part_bytes)]
        self.written = [0] * len(self.spans)
        self._hash = hashlib.md5(usedforsecurity=False) if md5 is not None else None
        self._lock = threading.Lock()
        self.file = AtomicFile(dir_fd, name, shown=shown).__enter__()

    def part(self, i: int) -> _Part:
        return _Part(self, i)

    def feed(self, i: int, chunk: bytes) -> None:
        with self._lock:
            start, end = self.spans[i]
            at = start + self.written[i]
            if at + len(chunk) > end:
                raise self._corrupt(f"storage sent more than bytes {start}-{end - 1}")
            self.file.write_at(chunk, at)
            self.written[i] += len(chunk)
            if at == self.file.size:
                self._absorb(chunk)
            self._catch_up()

    def _absorb(self, data: bytes) -> None:
        self.file.sha256.update(data)
        self.file.size += len(data)
        if self._hash is not None:
            self._hash.update(data)

    def _catch_up(self) -> None:
        """Hash what parts ahead of the prefix already wrote, up to the first gap."""
        while (pos := self.file.size) < self.total:
            i = pos // self.part_bytes
            done = self.spans[i][0] + self.written[i]
            if done <= pos:
                return
            while pos < done:
                block = self.file.read_at(min(_HASH_BLOCK, done - pos), pos)
                if not block:
                    raise self._corrupt(f"the file ends at {pos} bytes")
                self._absorb(block)
                pos += len(block)


class _Part:
    """The ``Sink`` of one ranged part of a ``FileParts``."""

    blocking = True

    def __init__(self, whole: FileParts, i: int) -> None:
        self.whole = whole
        self.i = i

    @property
    def offset(self) -> int:
        return self.whole.written[self.i]

    def feed(self, chunk: bytes) -> None:
        self.whole.feed(self.i, chunk)

    def reset(self) -> None:
        # stream_into never resets a ranged part: a whole answer is RangeIgnored instead.
        raise RangeIgnored(f"{self.whole.where}: storage sent the whole file for a part")


class _SharedUrl:
    """One signed URL for every part of a file: resolved once, and again only when storage
    refused the URL the asking part holds (not when another part got a fresh one since)."""

    def __init__(self, resolve: Resolver) -> None:
        self.resolve = resolve
        self.url: str | None = None
        self.lock = anyio.Lock()

    def for_part(self) -> Resolver:
        mine: str | None = None

        async def resolve() -> str:
            nonlocal mine
            async with self.lock:
                if self.url is None or (mine is not None and mine == self.url):
                    self.url = await self.resolve()
                mine = self.url
                return mine

        return resolve


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

    Nothing here blocks the event loop: decoding, hashing, writes, ``fsync`` and renames run
    in ``offload``'s worker threads, a chunk at a time. A job's files (label frames, blobs)
    download ``frame_concurrency`` at a time, and so do its streams: a file of known size
    above ``part_bytes`` is fetched as ranged parts in parallel (``FileParts``), which fills a
    link whose storage host throttles each connection.
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
        offload: Offload | None = None,
        part_bytes: int = HarvestConfig.part_bytes,
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
        self.part_bytes = max(1, part_bytes)
        self.rng = rng or random.Random()
        self.offload = offload or Offload()
        self.budget = budget or ByteBudget(
            HarvestConfig.max_file_bytes, HarvestConfig.max_job_bytes
        )
        self.entries: dict[str, ManifestEntry] = {}
        self.decode_s = 0.0
        #: frames kept from an earlier attempt / fetched by this one
        self.frames_kept = 0
        self.frames_fetched = 0
        self._journal: dict[str, dict[str, Any]] | None = None
        self._opening: anyio.Lock | None = None
        self._streams: anyio.CapacityLimiter | None = None

    async def _ready(self) -> None:
        """Prepare the folder once, before the first write (in a worker thread)."""
        if self._journal is not None:
            return
        if self._opening is None:
            self._opening = anyio.Lock()
        async with self._opening:
            if self._journal is None:
                self._journal = await self.offload.run(self._prepare)

    def _prepare(self) -> dict[str, dict[str, Any]]:
        with self.tree.folder(self.parts) as fd, disk_errors(str(self.dir)):
            # An earlier attempt cut off after its manifest but before the store's commit left
            # a MANIFEST.json that would vouch for files this attempt is about to replace.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(MANIFEST, dir_fd=fd)
            sweep(fd)
            return self._read_journal(fd)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await self.offload.run(fn)

    async def _cleanup(self, fn: Callable[[], object]) -> None:
        """Remove a temporary file even when cancelled (bounded: an unlink and a close)."""
        with anyio.CancelScope(shield=True):
            await self.offload.run(fn)

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
        rec = (self._journal or {}).get(relpath)
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

    async def _stream(
        self,
        resolve: Resolver,
        sink: Sink,
        what: str,
        *,
        span: tuple[int, int] | None = None,
        total: int | None = None,
    ) -> None:
        """Download ``resolve()``'s body into ``sink`` under this job's budget and settings,
        as one of at most ``frame_concurrency`` streams of this job at once."""
        if self._streams is None:
            self._streams = anyio.CapacityLimiter(self.frame_concurrency)
        async with self._streams:
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
                offload=self.offload,
                span=span,
                total=total,
            )

    async def _each(self, items: Sequence[T], do: Callable[[T], Awaitable[None]]) -> None:
        """``do`` every item, ``frame_concurrency`` at a time; the first failure stops the
        rest and is raised as is (one clear error, not an ExceptionGroup: the engine
        classifies it)."""
        todo = iter(items)
        failed: list[HarvesterError] = []

        async def worker(scope: anyio.CancelScope) -> None:
            for item in todo:  # one shared iterator: each worker takes the next item
                try:
                    await do(item)
                except HarvesterError as exc:
                    failed.append(exc)
                    scope.cancel()
                    return

        async with anyio.create_task_group() as tg:
            for _ in range(min(self.frame_concurrency, len(items))):
                tg.start_soon(worker, tg.cancel_scope)
        if failed:
            raise failed[0]

    async def _folder(self, parts: Sequence[str]) -> int:
        """A descriptor of the folder ``parts`` below ``output.dir`` (the caller closes it)."""
        return await self.offload.run(self.tree.open_dir, parts)

    # -- HarvestIO ------------------------------------------------------------------------
    async def request(self, spec: RequestSpec) -> Response:
        return await self.transport.call(spec, lambda r: r, job=self.job.key)

    async def fetch(self, resolve: Resolver, *, what: str) -> bytes:
        sink = BufferSink(MAX_FETCH_BYTES, what)
        with tracing.span("download", file=what):
            await self._stream(resolve, sink, what)
        return sink.value()

    async def label_frames(self, frames: Sequence[LabelFrame]) -> None:
        await self._ready()

        async def one(f: LabelFrame) -> None:
            await self.labels(
                f.name, f.resolve, f.fmt, source=f.source, frame=f.frame_id, sensor_id=f.sensor_id
            )

        await self._each(frames, one)

    async def download_files(self, files: Sequence[RemoteFile]) -> None:
        await self._ready()

        async def one(f: RemoteFile) -> None:
            await self.download(f.relpath, f.resolve, size=f.size, md5=f.md5)

        await self._each(files, one)

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
        await self._ready()
        relpath = f"labels/{name}.npy"
        where = f"{self.job.label} frame {frame if frame is not None else name}"
        if sensor_id is not None:
            where += f" sensor {sensor_id}"
        parts = self._path(relpath)
        shown = f"{self.dir}/{relpath}"
        try:
            with tracing.span("decode", file=relpath):
                dir_fd = await self._folder(self.parts + parts[:-1])
                try:
                    if relpath in (self._journal or {}) and await self.offload.run(
                        self._kept, relpath, source, dir_fd, parts[-1]
                    ):
                        self.frames_kept += 1
                        return
                    sink = await self._run(
                        functools.partial(LabelSink, fmt, dir_fd, parts[-1], where, shown)
                    )
                    try:
                        await self._stream(resolve, sink, relpath)
                        entry = await self.offload.run(sink.finish, self.label_dtype)
                        # Which frame and sensor an array holds, so nobody has to parse names.
                        if frame is not None:
                            entry.extra["frame"] = frame
                        if sensor_id is not None:
                            entry.extra["sensor_id"] = sensor_id
                    finally:
                        self.decode_s += sink.decode_s
                        await self._cleanup(sink.close)
                finally:
                    os.close(dir_fd)
            self.entries[relpath] = entry
            self.frames_fetched += 1
            if source is not None:
                await self.offload.run(self._journal_add, relpath, source, entry)
        except HarvesterError as exc:
            if exc.provider is None:
                exc.provider = self.job.provider
            if exc.job is None:
                exc.job = self.job.key
            raise

    async def download(
        self, relpath: str, resolve: Resolver, *, size: int | None = None, md5: bytes | None = None
    ) -> None:
        await self._ready()
        parts = self._path(relpath)
        shown = f"{self.dir}/{relpath}"
        with tracing.span("download", file=relpath):
            dir_fd = await self._folder(self.parts + parts[:-1])
            try:
                entry = None
                if size is not None and size > self.part_bytes:
                    try:
                        entry = await self._download_parts(
                            dir_fd, relpath, shown, resolve, size=size, md5=md5
                        )
                    except RangeIgnored:
                        log.info(
                            "storage ignores Range: fetching in one piece",
                            provider=self.job.provider,
                            job=self.job.key,
                            file=relpath,
                        )
                if entry is None:
                    sink = await self._run(
                        functools.partial(
                            FileSink,
                            dir_fd,
                            parts[-1],
                            shown,
                            size=size,
                            md5=md5,
                            where=relpath,
                            job=self.job,
                        )
                    )
                    try:
                        await self._stream(resolve, sink, relpath)
                        sink.check()
                        entry = await self._run(sink.commit)
                    finally:
                        await self._cleanup(sink.abort)
                self.entries[relpath] = entry
            finally:
                os.close(dir_fd)

    async def _download_parts(
        self,
        dir_fd: int,
        relpath: str,
        shown: str,
        resolve: Resolver,
        *,
        size: int,
        md5: bytes | None,
    ) -> ManifestEntry:
        if size > self.budget.max_file:
            # The parts could each fit; the file may not.
            raise ProtocolError(
                f"{relpath} is larger than {self.budget.max_file} bytes (harvest.max_file_bytes)",
                provider=self.job.provider,
                job=self.job.key,
            )
        name = PurePosixPath(relpath).name
        whole = await self._run(
            functools.partial(
                FileParts,
                dir_fd,
                name,
                shown,
                size=size,
                part_bytes=self.part_bytes,
                md5=md5,
                where=relpath,
                job=self.job,
            )
        )
        url = _SharedUrl(resolve)
        try:

            async def one(i: int) -> None:
                start, end = whole.spans[i]
                await self._stream(
                    url.for_part(),
                    whole.part(i),
                    f"{relpath} bytes {start}-{end - 1}",
                    span=(start, end),
                    total=size,
                )

            await self._each(range(len(whole.spans)), one)
            whole.check()
            return await self._run(whole.commit)
        finally:
            await self._cleanup(whole.abort)

    async def write_bytes(self, relpath: str, data: bytes) -> None:
        await self._ready()
        parts = self._path(relpath)
        with tracing.span("write", file=relpath):
            self.entries[relpath] = await self._run(
                functools.partial(self._write_file, parts, data, f"{self.dir}/{relpath}")
            )

    def _write_file(self, parts: tuple[str, ...], data: bytes, shown: str) -> ManifestEntry:
        with self.tree.folder(self.parts + parts[:-1]) as dir_fd:
            size, digest = write_atomic(dir_fd, parts[-1], data, shown=shown)
        return ManifestEntry(size, digest)

    async def write_json(self, relpath: str, obj: Any) -> None:
        await self.write_bytes(relpath, orjson.dumps(obj, option=orjson.OPT_INDENT_2))

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
        await self._ready()
        return await self._run(functools.partial(self.write_manifest, harvested_at=harvested_at))

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
