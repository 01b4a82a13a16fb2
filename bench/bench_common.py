"""What every benchmark shares: figures, the emulator process, harvester runs, /proc readings.

Not a benchmark itself. Each ``bench_<name>.py`` is a script that ``bench/run.py`` starts in its
own process (so one benchmark's memory and CPU never leak into another's figures) with
``--json OUT`` and optionally ``--quick``; it writes a list of figures to OUT.

The emulator always runs in another process (``python -m harvester.cli emulator``), started by
``EmulatorProcess`` and terminated in its ``__exit__``. Harvester itself runs as the real command
line (``python -m harvester.cli harvest``) in a third process wherever a figure is about the
engine, so what is measured is what a user runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
API_KEY = "bench-key"
PROJECT = "bench"
#: the emulator route of one Playment job (what a poll hits), as /_emulator/stats names it
POLL_ENDPOINT = "GET /playment/v1/projects/{project_id}/jobs/{job_id}"


# -- figures -------------------------------------------------------------------------------


@dataclass
class Figure:
    """One line of BENCHMARKS.md and one entry of bench/results.json.

    ``ratio`` is always ``value / baseline_value``. ``target`` is a human-readable condition and
    ``met`` says whether it held (None: the figure has no target).
    """

    name: str
    value: float | None
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None
    target: str | None = None
    met: bool | None = None
    benchmark: str = ""
    #: how it was measured and, for a missed target, the measured reason
    note: str = ""
    #: supporting measurements (per-round values, CPU use ...), kept in results.json
    detail: dict[str, Any] = field(default_factory=dict)

    def with_ratio(self) -> Figure:
        if self.value is not None and self.baseline_value:
            self.ratio = self.value / self.baseline_value
        return self


def write_figures(path: Path, figures: Sequence[Figure]) -> None:
    path.write_bytes(
        orjson.dumps(
            [asdict(f) for f in figures], option=orjson.OPT_INDENT_2 | orjson.OPT_NAIVE_UTC
        )
    )


def bench_main(
    name: str,
    run: Callable[[argparse.Namespace, Path], list[Figure]],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """The command line every ``bench_<name>.py`` shares: ``--json OUT``, ``--quick``."""
    parser = argparse.ArgumentParser(description=f"harvester benchmark: {name}")
    parser.add_argument("--json", type=Path, help="write the figures here (a JSON list)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    with work_dir(name, keep=args.keep) as work:
        figures = run(args, work)
    for f in figures:
        f.benchmark = f.benchmark or name
        log(
            f"{f.name}: {fmt_value(f.value)} {f.unit}"
            + (f" (ratio {f.ratio:.3f})" if f.ratio else "")
        )
    if args.json:
        write_figures(args.json, figures)


@contextmanager
def work_dir(name: str, *, keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"harvester-bench-{name}-"))
    try:
        yield path
    finally:
        if keep:
            log(f"work directory kept: {path}")
        else:
            subprocess.run(["rm", "-rf", str(path)], check=False)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fmt_value(v: float | None) -> str:
    if v is None:
        return "n/a"
    if math.isfinite(v) and v == int(v) and abs(v) < 1e15:
        return f"{int(v):,}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:,.2f}"
    return f"{v:.3g}"


# -- /proc -----------------------------------------------------------------------------------


def proc_status_kb(pid: int | str, key: str) -> int:
    """A ``kB`` line of /proc/PID/status (VmRSS, VmHWM ...), in kB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU time a process has used (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rpartition(")")[2].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bare_interpreter_rss_kb(import_: str = "harvester.engine", runs: int = 3) -> int:
    """VmRSS of ``python -c "import <import_>"``: the floor a harvester process starts from."""
    code = (
        f"import {import_}\n"
        "for line in open('/proc/self/status'):\n"
        "    if line.startswith('VmRSS:'): print(line.split()[1])\n"
    )
    values = []
    for _ in range(runs):
        out = subprocess.run(
            [PYTHON, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            env=child_env(),
            cwd=tempfile.gettempdir(),
        )
        values.append(int(out.stdout.strip()))
    return min(values)


# -- the emulator process --------------------------------------------------------------------


def scenario_toml(
    *,
    job_duration_s: float,
    points_per_frame: int = 1000,
    rate_per_s: float = 0,
    seed: int = 1,
) -> str:
    return (
        f"seed = {seed}\n\n[playment]\n"
        f"job_duration_s = {job_duration_s!r}\n"
        f"points_per_frame = {points_per_frame}\n"
        f"\n[playment.rate_limit]\nrate_per_s = {rate_per_s!r}\n"
    )


class EmulatorProcess:
    """``python -m harvester.cli emulator --port 0 --scenario FILE`` in its own process."""

    def __init__(self, work: Path, scenario: str, name: str = "emulator") -> None:
        self.work = work
        self.scenario_path = work / f"{name}-scenario.toml"
        self.scenario_path.write_text(scenario)
        self.log_path = work / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.urls: dict[str, str] = {}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def origin(self) -> str:
        return self.urls["playment"].rsplit("/playment", 1)[0]

    def __enter__(self) -> EmulatorProcess:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "harvester.cli",
                "emulator",
                "--port",
                "0",
                "--scenario",
                str(self.scenario_path),
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=child_env(),
            cwd=self.work,
        )
        # A hung start would block readline() forever: kill it after a while instead.
        watchdog = threading.Timer(60, self.proc.kill)
        watchdog.start()
        try:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            watchdog.cancel()
            if not line:
                raise RuntimeError(
                    f"emulator exited before listening: {self.log_path.read_text()[-2000:]}"
                )
            self.urls = json.loads(line)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        self._log.close()


# -- talking to the emulator (bare aiohttp: no harvester code on this side) ---------------


async def emu_json(session: aiohttp.ClientSession, emu: EmulatorProcess, path: str) -> Any:
    async with session.get(emu.origin + "/_emulator" + path) as resp:
        resp.raise_for_status()
        return orjson.loads(await resp.read())


def emu_stats(emu: EmulatorProcess) -> Any:
    """The emulator's ``/_emulator/stats``, read from outside any event loop."""

    async def read() -> Any:
        async with aiohttp.ClientSession() as session:
            return await emu_json(session, emu, "/stats")

    return asyncio.run(read())


async def emu_post(
    session: aiohttp.ClientSession, emu: EmulatorProcess, path: str, doc: Any = None
) -> Any:
    async with session.post(
        emu.origin + "/_emulator" + path, data=orjson.dumps(doc) if doc is not None else None
    ) as resp:
        body = await resp.read()
        if resp.status >= 400:
            raise RuntimeError(f"POST /_emulator{path}: {resp.status} {body[:300]!r}")
        return orjson.loads(body)


async def emu_request_count(session: aiohttp.ClientSession, emu: EmulatorProcess) -> int:
    """How many requests the emulator has logged so far (the next record's index)."""
    stats = await emu_json(session, emu, "/stats")
    return int(stats["requests"])


async def emu_requests(
    session: aiohttp.ClientSession, emu: EmulatorProcess, since: int = 0
) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = await emu_json(session, emu, f"/requests?since={since}")
    return records


def job_body(ref: str, *, frames: int = 0) -> dict[str, Any]:
    """A Playment create body: an image job (``frames=0``) or a point cloud of N frames."""
    if frames == 0:
        data: dict[str, Any] = {"image_url": f"https://example.invalid/{ref}.png"}
    else:
        data = {
            "sensor_data": {
                "frames": [
                    {
                        "frame_id": f"frame-{i:03d}",
                        "ego_pose": {
                            "position": {"x": 0.5 * i, "y": 0.0, "z": 0.0},
                            "heading": {"w": 1.0, "x": 0.0, "y": 0.0, "z": 0.0},
                        },
                        "sensors": [
                            {
                                "sensor_id": "lidar",
                                "data_url": f"https://example.invalid/{ref}/{i}.pcd",
                            }
                        ],
                    }
                    for i in range(frames)
                ],
                "sensor_meta": [
                    {"id": "lidar", "name": "lidar", "state": "editable", "modality": "lidar"}
                ],
            }
        }
    return {"reference_id": ref, "data": data, "work_flow_id": "bench-flow"}


async def create_remote_jobs(
    emu: EmulatorProcess, n: int, *, prefix: str, concurrency: int = 64
) -> list[tuple[str, str]]:
    """Create ``n`` image jobs on the emulator with a bare aiohttp loop: [(reference, job_id)]."""
    url = f"{emu.urls['playment']}/v1/projects/{PROJECT}/jobs"
    out: list[tuple[str, str] | None] = [None] * n
    headers = {"x-api-key": API_KEY, "Content-Type": "application/json"}
    next_i = 0
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def worker() -> None:
            nonlocal next_i
            while next_i < n:
                i = next_i
                next_i += 1
                ref = f"{prefix}-{i:06d}"
                async with session.post(
                    url, data=orjson.dumps(job_body(ref)), headers=headers
                ) as resp:
                    doc = orjson.loads(await resp.read())
                    if resp.status != 200:
                        raise RuntimeError(f"create {ref}: {resp.status} {doc}")
                out[i] = (ref, doc["data"]["job_id"])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [x for x in out if x is not None]


# -- running harvester -----------------------------------------------------------------------


def harvester_config(
    work: Path,
    emu: EmulatorProcess,
    *,
    name: str,
    rate_per_s: float = 0,
    burst: int = 50,
    max_concurrency: int = 64,
    poll_min_s: float = 1.0,
    poll_max_s: float = 4.0,
    harvest_concurrency: int = 8,
    max_retries: int = 5,
    output: dict[str, str | int] | None = None,
) -> Path:
    """A config for a fresh store under ``work/name``; returns its path. ``output``: the
    ``[output]`` table (default: a local ``output`` folder beside the store)."""
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "harvester.toml"
    # json.dumps spells strings and ints as TOML does
    output_toml = "\n".join(
        f"{k} = {json.dumps(v)}" for k, v in (output or {"dir": "output"}).items()
    )
    path.write_text(
        f"""[store]
url = "sqlite://state.db"

[output]
{output_toml}

[providers.playment]
base_url = "{emu.urls["playment"]}"
api_key_env = "BENCH_PLAYMENT_KEY"
project_id = "{PROJECT}"
rate_per_s = {rate_per_s!r}
burst = {burst}
max_concurrency = {max_concurrency}
poll_min_s = {poll_min_s!r}
poll_max_s = {poll_max_s!r}
max_retries = {max_retries}
request_timeout_s = 60

[harvest]
concurrency = {harvest_concurrency}

[log]
level = "warning"
format = "json"
"""
    )
    return path


def child_env() -> dict[str, str]:
    """The environment of every process a benchmark starts: this checkout importable (after
    anything already on PYTHONPATH) and the emulator's API key."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT)])
    env["BENCH_PLAYMENT_KEY"] = API_KEY
    return env


def write_tracking_jobs(path: Path, jobs: Sequence[tuple[str, str]]) -> None:
    """A jobs file that tracks existing remote jobs (``job_id`` lines)."""
    with open(path, "wb") as fh:
        for ref, job_id in jobs:
            fh.write(
                orjson.dumps({"provider": "playment", "job_id": job_id, "reference_id": ref})
                + b"\n"
            )


def submit_tracking(config: Path, jobs: Sequence[tuple[str, str]]) -> float:
    """``harvester submit`` of a jobs file (beside ``config``) that tracks ``jobs``, existing
    remote jobs as (reference, job id): the store filled in its own process; returns the
    seconds the submit took."""
    jobs_file = config.parent / "jobs.jsonl"
    write_tracking_jobs(jobs_file, jobs)
    return harvester_submit(config, jobs_file)


def write_create_jobs(path: Path, refs: Iterable[str]) -> None:
    """A jobs file that creates one Playment job of one frame per reference."""
    with open(path, "wb") as fh:
        for ref in refs:
            body = job_body(ref, frames=1)
            payload = {"data": body["data"], "work_flow_id": body["work_flow_id"]}
            line = {"provider": "playment", "reference_id": ref, "payload": payload}
            fh.write(orjson.dumps(line) + b"\n")


def harvester_harvest(config: Path, jobs_file: Path, *, what: str) -> tuple[float, dict[str, Any]]:
    """``harvester harvest --json JOBS`` to its end (its log in ``harvester.log`` beside
    ``config``): the seconds it took and its summary; an error naming ``what`` with the log's
    tail when it does not exit 0."""
    log_path = config.parent / "harvester.log"
    cmd = [PYTHON, "-m", "harvester.cli", "harvest", "-c", str(config), "--no-progress", "--json"]
    t0 = time.perf_counter()
    with open(log_path, "wb") as log_fh:
        out = subprocess.run(
            [*cmd, str(jobs_file)],
            stdout=subprocess.PIPE,
            stderr=log_fh,
            env=child_env(),
            cwd=config.parent,
            timeout=600,
        )
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{what} exited {out.returncode}: {tail(log_path)}")
    summary: dict[str, Any] = orjson.loads(out.stdout)
    return seconds, summary


def harvester_submit(config: Path, jobs_file: Path) -> float:
    """``harvester submit``: fill the store in its own process; returns the seconds it took."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [PYTHON, "-m", "harvester.cli", "submit", "-c", str(config), str(jobs_file)],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=config.parent,
    )
    if out.returncode != 0:
        raise RuntimeError(f"harvester submit failed ({out.returncode}): {out.stderr[-2000:]}")
    return time.perf_counter() - t0


@contextmanager
def harvester_process(
    config: Path, *extra: str, log_name: str = "harvester.log"
) -> Iterator[subprocess.Popen[bytes]]:
    """``harvester harvest -c CONFIG`` running; stopped (SIGTERM, then SIGKILL) on exit."""
    log_path = config.parent / log_name
    with open(log_path, "wb") as log_fh:
        proc = subprocess.Popen(
            [PYTHON, "-m", "harvester.cli", "harvest", "-c", str(config), "--no-progress", *extra],
            stdout=log_fh,
            stderr=log_fh,
            env=child_env(),
            cwd=config.parent,
        )
        try:
            yield proc
        finally:
            stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
        return
    except subprocess.TimeoutExpired:
        pass
    proc.send_signal(signal.SIGTERM)  # a second signal: stop without draining
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def spawn(cmd: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` (starting a process does not wait for it)."""
    return subprocess.Popen(list(cmd), **kw)


def tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


async def playment_attachment(
    session: aiohttp.ClientSession, base: str, headers: dict[str, str], private_url: str
) -> bytes:
    """A result file the SDK way: the attachments API answers with a redirect to a signed URL
    on another host, followed by hand so the API key is not sent there."""
    async with session.get(
        f"{base}/v1/attachments",
        params={"url": private_url},
        headers=headers,
        allow_redirects=False,
    ) as resp:
        signed = resp.headers["Location"]
    async with session.get(signed) as resp:  # the storage host: not the API's budget
        resp.raise_for_status()
        return await resp.read()
