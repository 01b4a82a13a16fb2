"""Real disks that fill up or turn read-only: small tmpfs mounts (the tests run as root, as CI
does; without the right to mount they fail saying so rather than skip).

``tmpfs(path, size)`` mounts and always unmounts (lazily, so a file still open cannot keep
the mount behind); ``fill(folder)`` writes a filler file until the disk says ENOSPC, after
setting aside ``reserve`` bytes that ``free(reserve)`` hands back (a disk with a little room
left); ``remount(path, "ro")`` flips it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

_BLOCK = 1 << 16


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=20, check=False)
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()} -- these tests"
            " need root with the right to mount a tmpfs (CI runs as root)"
        )


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=20, check=False)


def remount(path: Path, *options: str) -> None:
    _run("mount", "-o", ",".join(("remount", *options)), str(path))


def fill(folder: Path, *, reserve: int = 0) -> tuple[Path, Path]:
    """Fill the disk of ``folder``; returns (filler, reserve file). Removing the reserve
    file leaves about ``reserve`` bytes free, removing the filler frees the disk."""
    spare = folder / "reserve.bin"
    spare.write_bytes(b"\1" * reserve)
    filler = folder / "filler.bin"
    block = b"\1" * _BLOCK
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (_BLOCK, 4096, 1):
            chunk = block[:size]
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return filler, spare


def temporaries(root: Path) -> list[str]:
    """Every temporary file harvester could have left under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp-" in p.name)
