"""Streaming signed-URL downloads: bounded memory, resume, re-sign on expiry.

A body flows chunk by chunk into a ``Sink`` (a decoder writing labels, a file, a bounded
buffer). On a transient failure the download resumes at the sink's offset with a ``Range``
request (the sink has consumed exactly that many bytes); a server that answers 200 instead of
206 makes the sink start over. A 401/403 from the storage host means the signature expired
or was refused: ask the resolver for a fresh URL. Credentials are never sent (``Transport.
open_stream``).

Every body is bounded in size and time. Size: a ``ByteBudget`` per job caps each file at the
smaller of ``harvest.max_file_bytes`` and what is left of ``harvest.max_job_bytes``, counted in
decoded bytes; more is a protocol error, not retried. (A size the provider declared is the
sink's to hold: a Bentley blob's listing, ``harvest.FileSink``; a PCD's ``POINTS``, its
decoder.) Time: besides the gap between chunks
(``request_timeout_s``), the whole body must arrive by ``request_timeout_s + bytes received /
min_bytes_per_s``, so a server trickling a byte at a time is cut off (and resumed, then
given up on) instead of holding the download for ever.

A sink whose ``feed`` blocks (decoding, hashing, writing) is fed in a worker thread
(``offload.Offload``), one chunk at a time, while the next chunk is read from the network:
at most one chunk waits, so memory stays flat and a slow disk or decoder slows the download
down rather than piling chunks up.

A ``span`` makes the download one ranged part of a larger file (``harvest.FileParts``): the
sink receives bytes ``span[0]..span[1]`` only, resumes inside them, and every answer must be
206 for exactly that range of a file of the expected ``total`` size.
"""

from __future__ import annotations

import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import anyio

from harvester.clock import Clock
from harvester.errors import (
    CorruptDownload,
    NetworkError,
    ProtocolError,
    ProviderUnavailable,
    RangeIgnored,
    RetryableError,
    StorageRefused,
)
from harvester.failpoints import failpoint
from harvester.logs import get_logger
from harvester.offload import Offload
from harvester.ratelimit import backoff_delay
from harvester.transport import StreamedAnswer, Transport, safe_url
from harvester.wire import Resolver

log = get_logger("harvester.download")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True, slots=True)
class ByteCap:
    limit: int  #: decoded bytes a file may have
    why: str  #: which rule set it, for the error


@dataclass(slots=True)
class ByteBudget:
    """What one job's downloads may still receive: per file, and all files together.

    A job's frames download concurrently, so the job-wide rule counts bytes as they arrive
    (``received``), not only once a file is complete: otherwise each of N concurrent files
    would see the whole remainder and together receive N times it."""

    max_file: int
    max_job: int
    received: int = 0  #: decoded bytes held by the job's downloads, complete or in progress

    def exceeded(self, file_bytes: int, more: int) -> ByteCap | None:
        """The rule that ``more`` bytes for a file already holding ``file_bytes`` would
        break, or None."""
        if file_bytes + more > self.max_file:
            return ByteCap(self.max_file, "harvest.max_file_bytes")
        if self.received + more > self.max_job:
            others = self.received - file_bytes
            return ByteCap(
                self.max_job - others,
                f"what harvest.max_job_bytes leaves after {others} bytes of this job's other files",
            )
        return None


class Sink(Protocol):
    #: whether ``feed`` does blocking work (then it runs in a worker thread)
    blocking: bool

    @property
    def offset(self) -> int:
        """Bytes consumed so far (where a resumed download must continue)."""

    def feed(self, chunk: bytes) -> None: ...

    def reset(self) -> None:
        """Forget everything consumed: the body starts again from byte 0."""


class BufferSink:
    """Collects a small body in memory, refusing to grow past ``limit`` bytes."""

    blocking = False

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self._parts: list[bytes] = []
        self._size = 0

    @property
    def offset(self) -> int:
        return self._size

    def feed(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self.limit:
            raise ProtocolError(f"{self.what} is larger than {self.limit} bytes")
        self._parts.append(chunk)

    def reset(self) -> None:
        self._parts.clear()
        self._size = 0

    def value(self) -> bytes:
        return b"".join(self._parts)


async def stream_into(
    transport: Transport,
    resolve: Resolver,
    sink: Sink,
    *,
    what: str,
    job: str | None,
    clock: Clock,
    budget: ByteBudget,
    chunk_bytes: int = 1 << 20,
    max_failures: int = 5,
    max_resolves: int = 5,
    rng: random.Random | None = None,
    offload: Offload | None = None,
    span: tuple[int, int] | None = None,
    total: int | None = None,
) -> None:
    """Download the body behind ``resolve()`` into ``sink``, within ``budget`` (decoded
    bytes); what the sink holds stays counted in the budget once the body is complete.

    ``offload`` runs a blocking sink's ``feed`` off the event loop (None: on it). ``span``
    (half-open, with the file's ``total`` size) asks for that part of the file only."""
    rng = rng or random.Random()
    url = await resolve()
    resolves, failures = 1, 0
    held = _Held()
    first, end = span if span is not None else (0, None)
    try:
        while True:
            try:
                offset = sink.offset
                async with transport.open_stream(
                    url, offset=first + offset, end=end, job=job
                ) as resp:
                    status = resp.status
                    if status in (401, 403):
                        if resolves >= max_resolves:
                            # Transient for the job: the harvest is retried later (with its own
                            # attempt budget) rather than hammering the resolver now.
                            raise StorageRefused(
                                f"storage refused {what} {resolves} times in a row (HTTP {status})"
                                f" at {safe_url(url)}",
                                provider=transport.name,
                                job=job,
                                status=status,
                            )
                        log.info(
                            "signed URL refused, re-resolving",
                            provider=transport.name,
                            job=job,
                            what=what,
                            status=status,
                            url=safe_url(url),
                        )
                        url = await resolve()
                        resolves += 1
                        continue
                    if status >= 500 or status == 429:
                        raise ProviderUnavailable(
                            f"storage answered HTTP {status} for {what}",
                            provider=transport.name,
                            job=job,
                            status=status,
                        )
                    if status == 206 and (offset or span is not None):
                        _check_range(
                            resp.headers.get("Content-Range", ""),
                            first + offset,
                            end,
                            total,
                            what,
                            transport.name,
                            job,
                        )
                    elif status == 200:
                        if span is not None:
                            raise RangeIgnored(
                                f"storage answered {what} whole (HTTP 200) to a ranged request",
                                provider=transport.name,
                                job=job,
                                status=status,
                            )
                        if offset:
                            sink.reset()  # the server ignored Range: start over
                    else:
                        raise ProtocolError(
                            f"storage answered HTTP {status} for {what} at {safe_url(url)}",
                            provider=transport.name,
                            job=job,
                            status=status,
                        )
                    # this attempt may have started over (sink.reset): hold what it holds
                    budget.received += sink.offset - held.bytes
                    held.bytes = sink.offset
                    await _receive(
                        resp,
                        sink,
                        held,
                        budget=budget,
                        transport=transport,
                        clock=clock,
                        what=what,
                        job=job,
                        url=url,
                        chunk_bytes=chunk_bytes,
                        offload=offload,
                    )
                return
            except StorageRefused:
                raise
            except (NetworkError, ProviderUnavailable) as exc:
                failures += 1
                if failures > max_failures:
                    raise
                delay = backoff_delay(failures - 1, base=0.2, cap=10.0, rng=rng)
                log.info(
                    "download interrupted, resuming",
                    provider=transport.name,
                    job=job,
                    what=what,
                    offset=sink.offset,
                    attempt=f"#{failures + 1}/{max_failures + 1}",
                    error=str(exc),
                    delay_s=round(delay, 3),
                )
                # A resume not yet sent is dropped at once when the process stops.
                await transport.limiter.pause_until(clock.monotonic() + delay)
            except RetryableError:
                raise
    except BaseException:
        budget.received -= held.bytes  # the partial file is removed: its bytes are free again
        raise


@dataclass(slots=True)
class _Held:
    bytes: int = 0  #: what a download counts in ``budget.received``: what its sink holds


async def _receive(
    resp: StreamedAnswer,
    sink: Sink,
    held: _Held,
    *,
    budget: ByteBudget,
    transport: Transport,
    clock: Clock,
    what: str,
    job: str | None,
    url: str,
    chunk_bytes: int,
    offload: Offload | None,
) -> None:
    """One answer's body into ``sink``, each chunk counted against ``budget`` as it arrives,
    the whole body by its deadline."""
    base = sink.offset
    allowance = transport.cfg.request_timeout_s
    rate = transport.cfg.min_bytes_per_s
    start = clock.monotonic()
    received = 0

    def take(chunk: bytes) -> None:
        """Count a chunk read off the network, before the sink gets it."""
        nonlocal received
        cap = budget.exceeded(base + received, len(chunk))
        if cap is not None:
            raise ProtocolError(
                f"{what} is larger than {cap.limit} bytes ({cap.why})",
                provider=transport.name,
                job=job,
            )
        budget.received += len(chunk)
        held.bytes += len(chunk)
        received += len(chunk)
        metric.inc(len(chunk))
        body_deadline.deadline = start + allowance + received / rate

    def read() -> Awaitable[bytes]:
        return resp.content.read(chunk_bytes)

    async def feed(chunk: bytes) -> None:
        assert offload is not None
        await offload.run(sink.feed, chunk)

    metric = transport.metrics.bytes_downloaded.labels(transport.name)
    with clock.move_on_at(start + allowance) as body_deadline:
        if offload is None or offload.inline or not sink.blocking:
            while chunk := await read():
                take(chunk)
                sink.feed(chunk)
                failpoint("download.chunk")
        else:
            await _overlapped(read, take, feed)
    if body_deadline.cancelled_caught:
        raise NetworkError(
            f"{what} too slow: {received} bytes in"
            f" {clock.monotonic() - start:.1f} s from {safe_url(url)}, below"
            f" providers.{transport.name}.min_bytes_per_s = {rate:g}",
            provider=transport.name,
            job=job,
        )
    # Chunks read but never fed (the sink failed) are not the sink's.
    budget.received += sink.offset - held.bytes
    held.bytes = sink.offset


def _check_range(
    header: str,
    first: int,
    end: int | None,
    total: int | None,
    what: str,
    provider: str,
    job: str | None,
) -> None:
    """A 206's ``Content-Range`` must start at ``first`` (and, for a part, end at ``end`` of
    a file of ``total`` bytes)."""
    match = _CONTENT_RANGE.match(header)
    if not match or int(match.group(1)) != first:
        raise ProtocolError(
            f"storage resumed {what} at the wrong offset", provider=provider, job=job, status=206
        )
    if end is not None and int(match.group(2)) != end - 1:
        raise ProtocolError(
            f"storage answered {what} with bytes {match.group(1)}-{match.group(2)}, not"
            f" {first}-{end - 1}",
            provider=provider,
            job=job,
            status=206,
        )
    if total is not None and match.group(3) != str(total):
        # Replaced since it was listed: fetched again, listing and all, on the next attempt.
        raise CorruptDownload(
            f"{what}: storage says the file has {match.group(3)} bytes, the listing {total}",
            provider=provider,
            job=job,
        )


async def _overlapped(
    read: Callable[[], Awaitable[bytes]],
    take: Callable[[bytes], None],
    feed: Callable[[bytes], Awaitable[None]],
) -> None:
    """Read chunks and ``feed`` each, chunk k being fed while chunk k+1 is read: one chunk
    waits at most. The first error (reading, ``take`` or ``feed``) is raised as is, once the
    chunk being fed is done (a sink's offset then counts exactly what it consumed)."""
    send, recv = anyio.create_memory_object_stream[bytes](0)
    failed: list[Exception] = []

    async def consume(scope: anyio.CancelScope) -> None:
        async with recv:
            try:
                async for chunk in recv:
                    await feed(chunk)
                    failpoint("download.chunk")
            except Exception as exc:
                failed.append(exc)
                scope.cancel()  # stop reading: nothing more can be fed

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume, tg.cancel_scope)
        async with send:
            try:
                while chunk := await read():
                    take(chunk)
                    await send.send(chunk)
            except Exception as exc:
                failed.append(exc)  # the consumer finishes its chunk, then sees the end
    if failed:
        raise failed[0]
