"""``output.dir`` in object storage: ``s3://bucket/prefix``, ``az://container/prefix``,
``gs://bucket/prefix``.

Built on ``obstore`` (the Rust ``object_store`` crate: S3, Azure Blob and GCS behind one API,
signing, retries and multipart uploads included) rather than hand-written SigV4/SAS code.

How the guarantees of a local ``output.dir`` carry over (``ObjectJobOutput``):

- A job is written exactly as for a local folder, into a local **staging** copy of its folder
  (``output.staging_dir``; sha256 and sizes are computed there while the downloads stream,
  the frames journal makes retries resume). Only when the folder is complete is it
  published: every file is uploaded under its final key, ``MANIFEST.json`` last.
- Each upload is one ``put``: a single PUT for a small file, a multipart (S3) / block-list
  (Azure) upload for a large one, committed by the store only when the last part is in. A
  reader never sees a partial object under its final name, and a crash mid-upload leaves none
  (the upload is aborted on an error; after a SIGKILL the store keeps only uncommitted parts,
  which the job's next publish aborts on S3, see ``harvester.objorphans``).
- The bytes uploaded are hashed while they stream and compared with what the staging copy
  recorded; a mismatch fails the part stream before the upload is committed.
- Memory: a file is read and sent in ``output.part_bytes`` parts, at most ``PART_CONCURRENCY`` in
  flight, whatever its size.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING

import obstore as obs
from obstore.exceptions import (
    BaseError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from obstore.store import AzureStore, GCSStore, S3Store

from harvester.config import Location, OutputConfig, parse_location
from harvester.errors import OutputError
from harvester.failpoints import failpoint
from harvester.logs import get_logger
from harvester.objorphans import S3Orphans

if TYPE_CHECKING:  # typing only: these exist in obstore's stubs, not at run time
    from obstore.store import (
        AzureConfig,
        ClientConfig,
        GCSConfig,
        ObjectStore,
        RetryConfig,
        S3Config,
    )

log = get_logger("harvester.objstore")

PART_CONCURRENCY = 2  #: parts of one file in flight at once
PROBE = ".harvester-probe"
_MAX_REASON = 300
#: obstore raises its own classes and, for some, Python's (FileNotFoundError, PermissionError)
_ERRORS = (BaseError, OSError)
_MISSING = (NotFoundError, FileNotFoundError)


def reason(exc: BaseException) -> str:
    """One line about an obstore error, without its debug dump."""
    if isinstance(exc, _MISSING):
        return "the bucket or container does not exist"
    if isinstance(exc, PermissionDeniedError | PermissionError):
        return "the store refused the request (permission denied)"
    if isinstance(exc, UnauthenticatedError):
        return "the store refused the credentials"
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    if "169.254.169.254" in first or "credential" in first.lower():
        first = f"no credentials found (set them in [output] or the environment): {first}"
    return first[:_MAX_REASON]


class Bucket:
    """The object store behind an ``output.dir`` URL; blocking calls (run them in a thread)."""

    def __init__(self, cfg: OutputConfig) -> None:
        assert cfg.url is not None
        self.cfg = cfg
        self.loc = parse_location(cfg.url)
        self.store = _make_store(self.loc, cfg)
        self.orphans = S3Orphans.for_output(self.loc, cfg) if self.loc.scheme == "s3" else None

    def __str__(self) -> str:
        return self.loc.url()

    def url(self, rel: str = "") -> str:
        return self.loc.url(rel)

    def _fail(self, exc: BaseException, rel: str, what: str) -> OutputError:
        # Raised ``from None`` by every caller: an obstore error's text is a debug dump of the
        # request, full URL included (an Azure SAS token is its query); ``reason`` keeps its
        # first line only.
        return OutputError(f"cannot {what} {self.url(rel)}: {reason(exc)}")

    # -- writes ---------------------------------------------------------------------------
    def put_bytes(self, rel: str, data: bytes) -> None:
        try:
            obs.put(self.store, rel, data, use_multipart=False)
        except _ERRORS as exc:
            raise self._fail(exc, rel, "write") from None

    def upload(self, fh: IO[bytes], rel: str, *, size: int, sha256: str) -> None:
        """Stream the open local file ``fh`` to ``rel``, committed only if its bytes are the
        ``size`` and ``sha256`` recorded when it was written (else ``OutputError``)."""
        part = self.cfg.part_bytes
        multipart = size > part
        parts = _Verified(fh, self.url(rel), size, sha256, part, multipart=multipart)
        try:
            obs.put(
                self.store,
                rel,
                iter(parts),
                use_multipart=multipart,
                chunk_size=part,
                max_concurrency=PART_CONCURRENCY,
            )
        except _ERRORS as exc:
            raise self._fail(exc, rel, "upload") from None

    def abort_orphans(self, rel: str) -> int:
        """Abort the multipart uploads an interrupted attempt left open under ``rel/`` (S3;
        see ``harvester.objorphans``); how many."""
        return self.orphans.abort_under(rel) if self.orphans is not None else 0

    def delete(self, rel: str) -> None:
        try:
            obs.delete(self.store, rel)
        except _MISSING:
            pass
        except _ERRORS as exc:
            raise self._fail(exc, rel, "delete") from None

    def probe(self) -> None:
        """Prove the bucket exists and takes writes: put, read back and delete a small
        object (``OutputError`` with one line saying why not)."""
        name = f"{PROBE}-{os.urandom(4).hex()}"
        self.put_bytes(name, b"\0" * 64)
        try:
            if self.read(name, 1024) != b"\0" * 64:
                raise OutputError(f"{self.url(name)} did not read back what was written")
        finally:
            self.delete(name)

    # -- reads ----------------------------------------------------------------------------
    def read(self, rel: str, limit: int) -> bytes | None:
        """The object's bytes (None if missing); ``OutputError`` if over ``limit``."""
        try:
            got = obs.get(self.store, rel)
            if got.meta["size"] > limit:
                raise OutputError(f"{self.url(rel)} is over {limit} bytes")
            return bytes(got.bytes())
        except _MISSING:
            return None
        except _ERRORS as exc:
            raise self._fail(exc, rel, "read") from None

    def chunks(self, rel: str) -> Iterator[bytes]:
        """The object's bytes as a stream of chunks (``OutputError`` if unreadable)."""
        try:
            for chunk in obs.get(self.store, rel).stream(min_chunk_size=1 << 20):
                yield bytes(chunk)
        except _ERRORS as exc:
            raise self._fail(exc, rel, "read") from None

    def listing(self, prefix: str) -> dict[str, int]:
        """Every object under ``prefix/`` by its key relative to ``prefix``, with its size."""
        out: dict[str, int] = {}
        try:
            for batch in obs.list(self.store, prefix):
                for meta in batch:
                    key = str(meta["path"])
                    if key.startswith(prefix + "/"):
                        out[key[len(prefix) + 1 :]] = int(meta["size"])
        except _ERRORS as exc:
            raise self._fail(exc, prefix, "list") from None
        return out


class _Verified:
    """A file's bytes in parts, hashed as they go; the stream fails before its end (so the
    upload is never committed) if they are not the bytes recorded."""

    def __init__(
        self, fh: IO[bytes], where: str, size: int, sha256: str, part: int, *, multipart: bool
    ) -> None:
        self.part = part
        self.multipart = multipart
        self.fh = fh
        self.where = where
        self.size = size
        self.sha256 = sha256

    def __iter__(self) -> Iterator[bytes]:
        h = hashlib.sha256()
        sent = 0
        while True:
            block = self.fh.read(self.part)
            if not block:
                break
            h.update(block)
            sent += len(block)
            if sent > self.size:
                break
            yield block
            if self.multipart:  # a single PUT reads every block before it sends anything
                failpoint("upload.part")
        if (sent, h.hexdigest()) != (self.size, self.sha256):
            raise OutputError(
                f"cannot upload {self.where}: its staged copy changed since it was written"
                f" ({sent} bytes read, {self.size} recorded)"
            )


def _make_store(loc: Location, cfg: OutputConfig) -> ObjectStore:
    client: ClientConfig = {"timeout": "120s", "connect_timeout": "10s"}
    if cfg.endpoint and cfg.endpoint.startswith("http://"):
        client["allow_http"] = True  # an emulator or an S3-compatible store on a private net
    retry: RetryConfig = {"max_retries": 3, "retry_timeout": timedelta(seconds=60)}
    prefix = loc.prefix or None
    if loc.scheme == "s3":
        s3: S3Config = {}
        if cfg.endpoint:
            s3["endpoint"] = cfg.endpoint
        if cfg.region:
            s3["region"] = cfg.region
        if cfg.access_key_id is not None:
            s3["access_key_id"] = cfg.access_key_id.reveal()
        if cfg.secret_access_key is not None:
            s3["secret_access_key"] = cfg.secret_access_key.reveal()
        return S3Store(
            loc.bucket, prefix=prefix, config=s3, client_options=client, retry_config=retry
        )
    if loc.scheme == "az":
        az: AzureConfig = {}
        if cfg.endpoint:
            az["endpoint"] = cfg.endpoint
        if cfg.account_name:
            az["account_name"] = cfg.account_name
        if cfg.account_key is not None:
            az["account_key"] = cfg.account_key.reveal()
        return AzureStore(
            loc.bucket, prefix=prefix, config=az, client_options=client, retry_config=retry
        )
    gs: GCSConfig = {}
    if cfg.endpoint:
        gs["base_url"] = cfg.endpoint
    if cfg.service_account_key is not None:
        gs["service_account_key"] = cfg.service_account_key.reveal()
    return GCSStore(loc.bucket, prefix=prefix, config=gs, client_options=client, retry_config=retry)


_BUCKETS: dict[OutputConfig, Bucket] = {}


def bucket_for(cfg: OutputConfig) -> Bucket | None:
    """The ``Bucket`` of an object-store ``output.dir`` (one per config), None for a local one."""
    if cfg.url is None:
        return None
    found = _BUCKETS.get(cfg)
    if found is None:
        found = _BUCKETS[cfg] = Bucket(cfg)
    return found


def output_place(cfg: OutputConfig) -> Path | Bucket:
    """Where the output lives: the local folder, or the bucket."""
    return bucket_for(cfg) or cfg.dir


def prove_output(cfg: OutputConfig) -> None:
    """``output.dir`` can be written: the local folder (for an object store, its staging
    folder) and the bucket (blocking; ``OutputError`` with one line)."""
    from harvester.fsutil import check_writable

    check_writable(cfg.dir)
    bucket = bucket_for(cfg)
    if bucket is not None:
        bucket.probe()


def remove_staged(folder: Path) -> None:
    """Drop a job's staging folder once it is published (never following a symlink)."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(folder)
