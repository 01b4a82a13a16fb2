"""What the suite needs from the machine (PostgreSQL, Azurite, a container engine, a browser):
skipped with the reason on a developer's machine that lacks it, a failure where the
``HARVESTER_REQUIRE_*`` variable says it must be there (``.ci/run`` sets them all)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn, Protocol, TypeVar

import pytest


def unavailable(need: str, require_env: str, why: str) -> NoReturn:
    """Stop the test: ``need`` (e.g. "Azurite") is missing because ``why``."""
    if os.environ.get(require_env):
        pytest.fail(f"{need} is required here ({require_env} is set) but {why}")
    pytest.skip(f"needs {need}: {why}")


class _Server(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


S = TypeVar("S", bound=_Server)


def start_for_session(server: S, config: pytest.Config) -> S:
    """Start ``server`` for the rest of the session: stopped at its end, or at once if the
    start fails half-way."""
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    config.add_cleanup(server.stop)
    return server


class ChildServer:
    """A server the tests run as a child process: in a scratch folder of its own (``root``,
    removed by ``stop``), its output in ``out``, in a session of its own so that ``stop``
    ends its whole process group and nothing else."""

    def __init__(self, prefix: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.out = self.root / "server.out"
        self._proc: subprocess.Popen[bytes] | None = None

    def spawn(self, args: Sequence[str]) -> subprocess.Popen[bytes]:
        with open(self.out, "wb") as out:
            self._proc = subprocess.Popen(
                args, cwd=self.root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self._proc

    def log(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def stop(self) -> None:
        try:
            end_group(self._proc)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def end_group(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """End a server started with ``start_new_session=True``: its whole process group, nothing
    else; SIGTERM, then SIGKILL if it has not gone within ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
