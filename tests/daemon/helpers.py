"""Helpers for the daemon tests: ``harvester run`` as a real subprocess with a small HTTP
client for its API, configs and jobs to feed it.

The emulator runs on the test's own event loop, so nothing here may block it: subprocesses
are awaited (``anyio.open_process``/``run_process``), never ``wait()``-ed synchronously.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from anyio.abc import Process

from harvester.emulator import Emulator
from harvester.fsutil import TMP_MARK

REPO = Path(__file__).resolve().parents[2]
API_KEY = "daemon-test-key"
#: the emulator's jobs finish fast and stay small, so a whole harvest takes about a second
FAST: dict[str, Any] = {"playment": {"job_duration_s": 0.5, "points_per_frame": 2000}}
START_S = 15.0  # bound on a daemon becoming ready (a cold interpreter imports numpy, aiohttp)
HARVEST_S = 20.0  # bound on a handful of jobs being harvested


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def job_line(reference_id: str, frames: int = 1) -> dict[str, Any]:
    return {
        "provider": "playment",
        "reference_id": reference_id,
        "payload": {
            "work_flow_id": "wf-1",
            "data": {
                "sensor_data": {
                    "frames": [
                        {"frame_id": f"f{i}", "ego_pose": {}, "sensors": []} for i in range(frames)
                    ],
                    "sensor_meta": [{"id": "lidar", "modality": "lidar"}],
                }
            },
        },
    }


def jsonl(lines: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def write_config(
    folder: Path,
    emu: Emulator,
    port: int,
    *,
    token_env: str | None = None,
    drain_grace_s: float = 10.0,
    harvest_concurrency: int = 4,
    server_extra: str = "",
) -> Path:
    token = f'token_env = "{token_env}"\n' if token_env else ""
    config = folder / "harvester.toml"
    config.write_text(
        f"""
[store]
url = "sqlite://state.db"

[output]
dir = "output"

[server]
listen = "127.0.0.1:{port}"
drain_grace_s = {drain_grace_s}
{token}{server_extra}
[harvest]
concurrency = {harvest_concurrency}

[log]
level = "info"
format = "json"

[providers.playment]
base_url = "{emu.urls["playment"]}"
api_key_env = "PLAYMENT_API_KEY"
project_id = "proj-daemon"
rate_per_s = 0
poll_min_s = 0.2
poll_max_s = 1
request_timeout_s = 10
"""
    )
    return config


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HARVESTER_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PLAYMENT_API_KEY"] = API_KEY
    env.update(extra)
    return env


def daemon_argv(config: Path, nofile: int | None = None) -> list[str]:
    """``harvester run -c CONFIG``; with ``nofile``, under that open-files limit (soft and
    hard), set in the child before harvester is imported, as a container runtime would."""
    if nofile is None:
        return [sys.executable, "-m", "harvester.cli", "run", "-c", str(config)]
    code = (
        "import resource, runpy, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile}))\n"
        "sys.argv[0] = 'harvester'\n"
        "runpy.run_module('harvester.cli', run_name='__main__', alter_sys=True)\n"
    )
    return [sys.executable, "-c", code, "run", "-c", str(config)]


class DaemonProcess:
    """``harvester run`` in a subprocess, its stderr in a file, its API at ``self.base``."""

    def __init__(
        self,
        config: Path,
        port: int,
        session: aiohttp.ClientSession,
        env: dict[str, str],
        nofile: int | None = None,
    ) -> None:
        self.config = config
        self.port = port
        self.nofile = nofile
        self.base = f"http://127.0.0.1:{port}"
        self.session = session
        self.env = env
        self.log_path = config.parent / f"daemon-{port}.log"
        self.proc: Process | None = None
        self._log_file: Any = None
        self.logs_seen = 0

    def _open_log(self) -> Any:
        return open(self.log_path, "ab")  # closed in kill()

    async def start(self) -> None:
        self._log_file = self._open_log()
        self.proc = await anyio.open_process(
            daemon_argv(self.config, self.nofile),
            stdin=None,
            stdout=self._log_file,
            stderr=self._log_file,
            env=self.env,
            cwd=self.config.parent,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    async def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.session.get(self.base + path, **kw) as r:
            if r.content_type == "application/json":
                return r.status, await r.json()
            return r.status, await r.text()

    async def post(self, path: str, body: bytes, **kw: Any) -> tuple[int, Any]:
        async with self.session.post(self.base + path, data=body, **kw) as r:
            return r.status, await r.json()

    async def wait_ready(self, within: float = START_S) -> None:
        assert self.proc is not None
        with anyio.fail_after(within):
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
                try:
                    status, _ = await self.get("/readyz")
                    if status == 200:
                        return
                except aiohttp.ClientConnectionError:
                    pass
                await anyio.sleep(0.05)

    async def wait_not_ready(self, within: float = 3.0) -> dict[str, Any]:
        """The /readyz answer once it turns 503 (a signal is delivered asynchronously)."""
        with anyio.fail_after(within):
            while True:
                status, doc = await self.get("/readyz")
                if status == 503:
                    return dict(doc)
                await anyio.sleep(0.01)

    async def wait_job(self, key: str, state: str, within: float = HARVEST_S) -> dict[str, Any]:
        last: Any = None
        try:
            with anyio.fail_after(within):
                while True:
                    status, doc = await self.get(f"/jobs/playment/{key}")
                    last = doc
                    if status == 200 and doc["state"] == state:
                        return dict(doc)
                    await anyio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"job {key} never reached {state}: {last}\n{self.log()}") from None

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, within: float) -> int:
        assert self.proc is not None
        try:
            with anyio.fail_after(within):
                return await self.proc.wait()
        except TimeoutError:
            raise AssertionError(f"daemon still running after {within} s:\n{self.log()}") from None

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            with anyio.move_on_after(5, shield=True):
                await self.proc.wait()
        if self.proc is not None:
            await self.proc.aclose()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


StartDaemon = Callable[..., Awaitable[DaemonProcess]]
ReadyDaemon = Callable[..., Awaitable[DaemonProcess]]


async def emulator_stats(emu: Emulator, session: aiohttp.ClientSession) -> dict[str, Any]:
    """The emulator's evidence, read over HTTP as any other client would."""
    origin = emu.urls["playment"].removesuffix("/playment")
    async with session.get(f"{origin}/_emulator/stats") as r:
        assert r.status == 200
        return dict(await r.json())


def slow_storage(delay_s: float) -> dict[str, Any]:
    """Every signed-URL download takes ``delay_s``: a harvest stays in flight that long."""
    return {"faults": [{"kind": "slow", "provider": "storage", "delay_s": delay_s}]}


async def cli_process(
    *args: str,
    within_s: float = 30.0,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """``harvester ARGS`` in a subprocess, to its end within ``within_s``; its environment
    is ``child_env()`` unless ``env``. The exit code is the caller's to check."""
    argv = [sys.executable, "-m", "harvester.cli", *args]
    with anyio.fail_after(within_s):
        return await anyio.run_process(
            argv, env=child_env() if env is None else env, cwd=cwd, check=False
        )


async def store_status(config: Path) -> dict[str, Any]:
    """``harvester status --json --check`` of the store the stopped daemon left behind."""
    done = await cli_process("status", "-c", str(config), "--json", "--check")
    assert done.returncode == 0, done.stderr.decode()
    doc: dict[str, Any] = json.loads(done.stdout)
    assert doc["check"] == []
    return doc


async def check_nothing_lost(
    emu: Emulator, session: aiohttp.ClientSession, config: Path, jobs: int
) -> None:
    """After a stop and a restart that finished: each job created once, no partial file."""
    stats = await emulator_stats(emu, session)
    assert stats["playment"]["creates"] == jobs
    assert stats["playment"]["duplicate_creates"] == 0
    assert max(stats["playment"]["creates_by_reference"]["proj-daemon"].values()) == 1
    assert list((config.parent / "output").rglob(f"*{TMP_MARK}*")) == []
