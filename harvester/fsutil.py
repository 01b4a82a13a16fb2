"""Files that appear whole or not at all.

Every output file is written under a temporary name beside its final one
(``.<name>.tmp-<random>``), fsynced, renamed over the final name, and the folder fsynced: a
reader never sees half a file, and a crash leaves only temporary names behind, which the
next harvest of that job sweeps away.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from harvester.failpoints import failpoint

TMP_MARK = ".tmp-"


def tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}{TMP_MARK}{secrets.token_hex(4)}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """``with AtomicFile(path) as f: f.write(...)``: renamed into place only on success.

    Keeps a running sha256 and byte count of what was written, for the manifest.
    """

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = tmp_name(final)
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._fh: BinaryIO | None = None

    def __enter__(self) -> AtomicFile:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.tmp, "xb")
        return self

    def write(self, data: bytes | memoryview) -> None:
        assert self._fh is not None
        self._fh.write(data)
        self.sha256.update(data)
        self.size += len(data)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._fh is not None
        fh, self._fh = self._fh, None
        if exc_type is not None:
            fh.close()
            self.tmp.unlink(missing_ok=True)
            return
        try:
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fh.close()
        failpoint("rename.before_replace")
        self.tmp.replace(self.final)
        fsync_dir(self.final.parent)
        failpoint("rename.after_replace")


def write_atomic(final: Path, data: bytes) -> tuple[int, str]:
    """Write ``data`` to ``final`` atomically; returns (bytes, sha256 hex)."""
    with AtomicFile(final) as f:
        f.write(data)
    return f.size, f.sha256.hexdigest()


def sweep_temporaries(folder: Path) -> int:
    """Remove temporary files an interrupted harvest left in ``folder`` (recursively)."""
    removed = 0
    if not folder.is_dir():
        return 0
    for path in folder.rglob(f".*{TMP_MARK}*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
