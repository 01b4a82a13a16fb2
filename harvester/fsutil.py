"""Files that appear whole or not at all, and only inside ``output.dir``.

Every output file is written under a temporary name beside its final one
(``.<name>.tmp-<random>``), fsynced, renamed over the final name, and the folder fsynced: a
reader never sees half a file, and a crash leaves only temporary names behind, which the
next harvest of that job sweeps away.

Nothing is written through a symlink. Folders below ``output.dir`` are walked one component
at a time with directory file descriptors (``open(name, O_NOFOLLOW, dir_fd=parent)``), and
files are created with ``O_EXCL | O_NOFOLLOW`` and renamed within their folder's descriptor,
so a symlink planted in the tree (``labels -> /etc``) cannot lead a write, a rename or a
delete outside it. A symlink met on the way to a folder is replaced by a real folder (only
the link is removed, never what it points to). ``output.dir`` itself may be a symlink or a
mount point: that is the user's choice of where the output lives.

``OSError`` while writing becomes ``OutputError`` here (``disk_errors``): a full or
read-only disk is nobody's job failure, and must never look like a network error.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

from harvester.errors import OutputError
from harvester.failpoints import failpoint
from harvester.logs import get_logger

TMP_MARK = ".tmp-"
PROBE = ".harvester-probe"
log = get_logger("harvester.fsutil")

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
#: AtomicFile reads back what ranged parts wrote out of order, to hash it in order
_NEW_RW = os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC


def tmp_name(name: str) -> str:
    return f".{name}{TMP_MARK}{secrets.token_hex(4)}"


def disk_message(exc: OSError, where: str) -> str:
    return f"cannot write {where}: {exc.strerror or type(exc).__name__}"


@contextlib.contextmanager
def disk_errors(where: str) -> Iterator[None]:
    """``OSError`` inside becomes ``OutputError`` naming ``where``."""
    try:
        yield
    except OSError as exc:
        raise OutputError(disk_message(exc, where), errno=exc.errno) from exc


def check_writable(root: Path) -> None:
    """Create ``root`` if needed and prove a file can be written, fsynced and removed there.

    Raises ``OutputError`` with one line saying why not (a file in its place, read-only,
    full, no permission).
    """
    where = f"output.dir {root}"
    if root.exists() and not root.is_dir():
        raise OutputError(f"{where} is not a folder")
    with disk_errors(where):
        root.mkdir(parents=True, exist_ok=True)
        dir_fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
        try:
            name = tmp_name(PROBE)
            fd = os.open(name, _NEW_FILE, 0o600, dir_fd=dir_fd)
            try:
                try:
                    write_all(fd, b"\0" * 4096)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Tree:
    """``output.dir``: opens folders below it without following a symlink."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open_dir(self, parts: Sequence[str]) -> int:
        """A descriptor of ``root/parts...`` (created as needed); the caller closes it."""
        shown = "/".join(parts) or "."
        with disk_errors(f"output.dir {self.root}"):
            try:
                fd = os.open(self.root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
            except FileNotFoundError:
                self.root.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
        try:
            for i, name in enumerate(parts):
                with disk_errors(f"{shown} in output.dir {self.root}"):
                    nxt = self._enter(fd, name, "/".join(parts[: i + 1]))
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def folder(self, parts: Sequence[str]) -> Iterator[int]:
        fd = self.open_dir(parts)
        try:
            yield fd
        finally:
            os.close(fd)

    def _enter(self, parent: int, name: str, shown: str) -> int:
        if name in ("", ".", "..") or "/" in name:
            raise OutputError(f"refusing the path component {name!r} in {shown}")
        for _ in range(3):
            try:
                return os.open(name, _DIR_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o777, dir_fd=parent)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    # no cause: ELOOP/ENOTDIR is how the O_NOFOLLOW open found the file
                    raise OutputError(
                        f"{shown} in output.dir {self.root} is a file where a folder belongs"
                    ) from None
                log.warning("replacing a symlink in the output tree", path=shown)
                os.unlink(name, dir_fd=parent)  # the link only, never what it points to
        raise OutputError(f"{shown} in output.dir {self.root} keeps changing under harvester")


def fsync_dir(dir_fd: int) -> None:
    os.fsync(dir_fd)


class AtomicFile:
    """``with AtomicFile(dir_fd, name) as f: f.write(...)``: renamed into place only on
    success, within the folder ``dir_fd`` (which the caller keeps open).

    Keeps a running sha256 and byte count of what was written, for the manifest. Writes go
    straight to the descriptor (no buffer), so a failed write is seen at once and nothing is
    left to flush while cleaning up after it.
    """

    def __init__(self, dir_fd: int, name: str, *, shown: str | None = None) -> None:
        self.dir_fd = dir_fd
        self.name = name
        self.shown = shown or name
        self.tmp = tmp_name(name)
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._fd = -1

    def __enter__(self) -> AtomicFile:
        with disk_errors(self.shown):
            self._fd = os.open(self.tmp, _NEW_RW, 0o644, dir_fd=self.dir_fd)
        return self

    def write(self, data: bytes | memoryview) -> None:
        with disk_errors(self.shown):
            write_all(self._fd, data)
        self.sha256.update(data)
        self.size += len(data)

    def write_at(self, data: bytes | memoryview, offset: int) -> None:
        """Write ``data`` at ``offset`` without hashing or counting it: a ranged part
        arriving out of order. Its bytes are hashed later, in order, by ``absorb``."""
        view = memoryview(data)
        with disk_errors(self.shown):
            while view:
                n = os.pwrite(self._fd, view, offset)
                view = view[n:]
                offset += n

    def read_at(self, size: int, offset: int) -> bytes:
        with disk_errors(self.shown):
            return os.pread(self._fd, size, offset)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        placed = False
        try:
            if exc_type is None:
                with disk_errors(self.shown):
                    os.fsync(self._fd)
                    fd, self._fd = self._fd, -1
                    os.close(fd)
                    failpoint("rename.before_replace")
                    os.replace(self.tmp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
                    placed = True
                    fsync_dir(self.dir_fd)
                failpoint("rename.after_replace")
        finally:
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                with contextlib.suppress(OSError):
                    os.close(fd)
            if not placed:
                with contextlib.suppress(OSError):
                    os.unlink(self.tmp, dir_fd=self.dir_fd)

    def abort(self) -> None:
        """Drop the temporary file (idempotent)."""
        if self._fd >= 0:
            self.__exit__(RuntimeError, RuntimeError("abort"), None)


def write_atomic(
    dir_fd: int, name: str, data: bytes, *, shown: str | None = None
) -> tuple[int, str]:
    """Write ``data`` to ``name`` in ``dir_fd`` atomically; returns (bytes, sha256 hex)."""
    with AtomicFile(dir_fd, name, shown=shown) as f:
        f.write(data)
    return f.size, f.sha256.hexdigest()


def sweep(dir_fd: int) -> int:
    """Remove the temporary files an interrupted harvest left, and every symlink, from the
    folder ``dir_fd`` and the folders below it (not following links)."""
    removed = 0
    with os.scandir(dir_fd) as entries:
        names = [(e.name, e.is_symlink(), e.is_dir(follow_symlinks=False)) for e in entries]
    for name, is_link, is_dir in names:
        if is_link or (not is_dir and TMP_MARK in name and name.startswith(".")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
            removed += 1
        elif is_dir:
            sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                removed += sweep(sub)
            finally:
                os.close(sub)
    return removed


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_at(dir_fd: int, name: str, chunk: int = 1 << 20) -> tuple[int, str] | None:
    """(bytes, sha256) of the regular file ``name`` in ``dir_fd``; None if it is missing,
    a symlink or not a regular file."""
    try:
        fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        h = hashlib.sha256()
        size = 0
        while block := os.read(fd, chunk):
            h.update(block)
            size += len(block)
        return size, h.hexdigest()
    finally:
        os.close(fd)
