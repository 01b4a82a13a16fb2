"""One engine per sqlite store: an OS lock on a file beside the database.

Two engines on one sqlite file (two ``harvester harvest``, or one beside ``harvester run``)
each take the other's in-flight creates for lost answers: one ends them in error, the other
sends them again. So ``harvest`` and ``run`` hold ``<db>.lock`` with ``flock`` for as long as
they work; a second one is refused at once with the holder's pid, host, command and start
time, which the holder writes into the file. ``submit``, ``status`` and ``copy-store``'s
target do not take it: they never talk to a provider, and SQLite serialises their writes.

``flock`` belongs to the open file, so the kernel drops it when the holder dies, even by
SIGKILL: there is never a stale lock to clean up, and the file itself stays (deleting it
would let a third process lock a new file while the second still holds the old one).
PostgreSQL stores take no lock: replicas share that table by leases (``harvester.replica``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson

from harvester.config import StoreConfig
from harvester.errors import StoreError

__all__ = ["engine_lock", "lock_path"]

#: the most of the holder's description read back (it is a few hundred bytes)
_MAX_INFO = 64 * 1024


def lock_path(db: Path) -> Path:
    return db.with_name(db.name + ".lock")


@contextlib.contextmanager
def engine_lock(cfg: StoreConfig, command: str | None = None) -> Iterator[None]:
    """Hold the engine lock of ``cfg``'s sqlite store for the block; ``StoreError`` (one
    line naming the holder) if another process holds it. No-op for a shared store."""
    if cfg.path is None:
        yield
        return
    path = lock_path(cfg.path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StoreError(f"{path}: cannot open the engine lock: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreError(f"{path}: cannot lock: {exc.strerror or exc}") from exc
            # no cause: EWOULDBLOCK is how flock says "held", which the message says
            raise StoreError(
                f"{cfg.path}: the job store is in use by {_holder(fd)}; only one harvester"
                " harvest or run may work on a sqlite store at a time (submit and status"
                " work beside it)"
            ) from None
        _describe_self(fd, command)
        yield
    finally:
        # Closing drops the lock. The description stays: it is only read while locked.
        os.close(fd)


def _describe_self(fd: int, command: str | None) -> None:
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command or " ".join(["harvester", *sys.argv[1:]]),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    data = orjson.dumps(info)
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _holder(fd: int) -> str:
    try:
        info = orjson.loads(os.pread(fd, _MAX_INFO, 0))
    except (OSError, orjson.JSONDecodeError):
        info = None
    if not isinstance(info, dict):
        # Locked a moment ago and not described yet.
        return "another process (it has not said which yet)"
    return (
        f"pid {info.get('pid')} on {info.get('host')} ({info.get('command')!s},"
        f" since {info.get('since')})"
    )
