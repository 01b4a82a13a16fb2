"""Harvests off the event loop and in parallel: loop lag, decode threads, a throttled link.

Three measurements, each with its baseline taken in the same run:

- **event loop lag while large masks are harvested**: the real ``Engine`` harvests Playment
  jobs with big point-cloud masks from the emulator (another process); a probe task on the
  engine's event loop sleeps 2 ms over and over and records how late it wakes. Baseline: the
  same run with ``Offload(0)``, everything on the loop as before. p99 and max, in ms.
- **decode throughput, 1 vs 2 worker threads**: four masks decoded at once through
  ``LabelSink`` (decode, staging writes, the final ``.npy``) as the harvest runs it, the
  chunks coming from memory. Reported as MB/s of mask text and the 2-thread/1-thread ratio
  (target about 2x on 2 cores). On a shared machine that wall-clock ratio mostly measures the
  other sessions, so two load-independent readings come with it (``gil_meter``): the same
  ratio with the time our threads sat queued behind other processes taken out, and the share
  of time the GIL is held while one thread decodes.
- **harvest throughput against a throttled storage host**: a Bentley job whose output holds
  large blobs, on an emulator storage host that sends each connection at most
  ``CONN_MB`` MB/s and all of them together at most ``LINK_MB`` MB/s (the link). Throughput is
  the blob bytes over the time they took (from the downloaded-bytes counter, sampled every
  10 ms), as a share of the link; target >= 0.9. Baseline: one blob at a time, each in one
  request (the serial path). The loop lag p99 while it runs is reported too.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from bench_common import EmulatorProcess, Figure, bench_main, job_body, log
from gil_meter import GilMeter, Split, ThreadTimes, calibrate

from harvester.config import Config, parse_config
from harvester.engine import Engine
from harvester.harvest import LabelSink
from harvester.jobs import JobState
from harvester.logs import configure
from harvester.offload import Offload, default_threads
from harvester.store.base import NewJob
from harvester.store.sqlite import SqliteStore

MB = 1e6
MIB = 1 << 20
CONN_MB = 4.0
LINK_MB = 16.0
PROBE_S = 0.002


def load() -> str:
    """The machine's load, which the lag and decode figures are sensitive to."""
    one, five, _ = os.getloadavg()
    return f"Load average when measured: {one:.1f} (1 min), {five:.1f} (5 min)."


# -- the loop-lag probe ------------------------------------------------------------------


class LagProbe:
    def __init__(self) -> None:
        self.lags: list[float] = []

    async def run(self) -> None:
        while True:
            t0 = time.perf_counter()
            await anyio.sleep(PROBE_S)
            self.lags.append(max(0.0, time.perf_counter() - t0 - PROBE_S))

    def p99_ms(self) -> float:
        return 1000 * float(np.percentile(self.lags, 99)) if self.lags else 0.0

    def max_ms(self) -> float:
        return 1000 * max(self.lags, default=0.0)


async def run_engine(
    cfg: Config,
    jobs: list[NewJob],
    provider: str,
    offload: Offload,
    during: Callable[[Engine], Coroutine[Any, Any, None]] | None = None,
) -> tuple[LagProbe, float]:
    """Harvest ``jobs`` with the real engine and a lag probe on its loop: (probe, seconds)."""
    assert cfg.store.path is not None
    probe = LagProbe()
    async with SqliteStore(cfg.store.path) as store:
        await store.add_jobs(jobs, now=0.0)
        engine = Engine(cfg, store, providers=[provider])
        engine.harvests.offload = offload
        t0 = time.perf_counter()
        with anyio.fail_after(600):
            async with anyio.create_task_group() as tg:
                tg.start_soon(probe.run)
                if during is not None:
                    tg.start_soon(during, engine)
                await engine.run()
                tg.cancel_scope.cancel()
        elapsed = time.perf_counter() - t0
        states = [j.state for j in await store.jobs()]
    if any(s != JobState.HARVESTED for s in states):
        raise RuntimeError(f"not every job harvested: {states}")
    return probe, elapsed


# -- (a) loop lag while large masks are harvested -----------------------------------------


def playment_config(work: Path, emu: EmulatorProcess, name: str, concurrency: int) -> Config:
    os.environ["BENCH_PLAYMENT_KEY"] = "bench-key"
    folder = work / name
    folder.mkdir()
    doc: dict[str, Any] = {
        "store": {"url": "sqlite://state.db"},
        "output": {"dir": "out"},
        "harvest": {"concurrency": concurrency, "frame_concurrency": 2},
        "providers": {
            "playment": {
                "base_url": emu.urls["playment"],
                "api_key_env": "BENCH_PLAYMENT_KEY",
                "project_id": "bench",
                "rate_per_s": 0,
                "poll_min_s": 0.1,
                "poll_max_s": 0.2,
                "request_timeout_s": 60,
            }
        },
    }
    return parse_config(doc, source=folder / "harvester.toml")


def loop_lag(args: argparse.Namespace, work: Path) -> list[Figure]:
    n_jobs, frames, points = (2, 2, 300_000) if args.quick else (6, 2, 2_000_000)
    scenario = (
        "seed = 1\n[playment]\njob_duration_s = 0.2\n"
        f"points_per_frame = {points}\nnum_labels = 60\n"
    )
    runs: dict[str, LagProbe] = {}
    with EmulatorProcess(work, scenario, name="emu-masks") as emu:
        for label, offload in (("on the loop", Offload(0)), ("worker threads", Offload())):
            cfg = playment_config(work, emu, label.replace(" ", "-"), concurrency=4)
            jobs = []
            for i in range(n_jobs):
                ref = f"{label[:2]}-{i}"
                body = job_body(ref, frames=frames)
                payload = {"data": body["data"], "work_flow_id": body["work_flow_id"]}
                jobs.append(NewJob("playment", ref, ref, None, payload, "bench"))
            probe, secs = anyio.run(run_engine, cfg, jobs, "playment", offload)
            runs[label] = probe
            log(
                f"masks {label}: {secs:.1f} s, lag p99 {probe.p99_ms():.1f} ms,"
                f" max {probe.max_ms():.1f} ms over {len(probe.lags)} probes"
            )
    before, after = runs["on the loop"], runs["worker threads"]
    what = f"{n_jobs} jobs x {frames} frames of {points:,} points"
    note = (
        f"real Engine harvesting {what} from the emulator (another process); a task on the"
        f" engine's loop sleeps {PROBE_S * 1000:g} ms and records how late it wakes."
        f" Baseline: Offload(0), decoding and writes on the loop (before this change)."
        f" Worker threads: {default_threads()}. {load()}"
    )
    return [
        Figure(
            name="event loop lag p99 while large masks are harvested",
            value=round(after.p99_ms(), 2),
            unit="ms",
            baseline="decode and writes on the event loop",
            baseline_value=round(before.p99_ms(), 2),
            note=note,
            detail={"probes": [len(before.lags), len(after.lags)]},
        ).with_ratio(),
        Figure(
            name="event loop lag max while large masks are harvested",
            value=round(after.max_ms(), 2),
            unit="ms",
            baseline="decode and writes on the event loop",
            baseline_value=round(before.max_ms(), 2),
            note=note,
        ).with_ratio(),
    ]


# -- (b) decode throughput with 1 and 2 worker threads ------------------------------------


def mask_chunks(points: int, seed: int, chunk: int = MIB) -> list[bytes]:
    labels = np.random.default_rng(seed).integers(0, 60, points)
    body = ("[" + ", ".join(map(str, labels.tolist())) + "]").encode()
    return [body[i : i + chunk] for i in range(0, len(body), chunk)]


async def decode_all(
    masks: list[list[bytes]], offload: Offload, folder: Path, times: ThreadTimes
) -> None:
    """Every mask through its own ``LabelSink`` at once; ``times`` spans the decoding (read
    before the loop ends, while its worker threads are still alive)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:

        async def one(i: int, chunks: list[bytes]) -> None:
            sink = await offload.run(LabelSink, "mask", fd, f"m{i}.npy", f"mask {i}", f"m{i}")
            try:
                for c in chunks:
                    await offload.run(sink.feed, c)
                await offload.run(sink.finish, "auto")
            finally:
                sink.close()

        with times:
            async with anyio.create_task_group() as tg:
                for i, chunks in enumerate(masks):
                    tg.start_soon(one, i, chunks)
    finally:
        os.close(fd)


class DecodeRun:
    """One timed decode of every mask: MB of mask text, and its threads' times."""

    def __init__(self, mb: float, split: Split, wall: float) -> None:
        self.mb = mb
        self.split = split
        self.wall = wall

    @classmethod
    def threads(cls, masks: list[list[bytes]], threads: int, folder: Path) -> DecodeRun:
        """Every mask decoded in this process with ``threads`` worker threads."""
        folder.mkdir()
        times = ThreadTimes()
        anyio.run(decode_all, masks, Offload(threads), folder, times)
        return cls(mask_mb(masks), times.split, times.wall)

    @property
    def rate(self) -> float:
        """MB/s of wall time."""
        return self.mb / self.wall

    @property
    def cores_wanted(self) -> float:
        """Mean number of our threads on a core or queued for one: how many could run at
        once, whatever else the machine runs."""
        return (self.split.cpu + self.split.queued) / self.wall

    @property
    def unloaded_rate(self) -> float:
        """MB/s had no other process wanted our cores: the threads ready as often as they
        were, and every ready moment spent on a core, so the run takes cpu / cores_wanted.
        Conservative: while a queued thread holds the GIL the other waits, and that wait
        stays in."""
        return self.mb * self.cores_wanted / self.split.cpu


def mask_mb(masks: list[list[bytes]]) -> float:
    return sum(len(c) for m in masks for c in m) / MB


def decode_in_child(
    masks: list[list[bytes]], conn: Connection, start: Barrier, folder: Path
) -> None:
    """A ``ProcessPair`` process: each time the parent asks, decode ``masks`` with 1 worker
    thread, starting together with the other process; answer (cpu, queued, wall)."""
    configure("error", "json")
    folder.mkdir()
    r = 0
    while conn.recv():
        start.wait(timeout=60)
        run = DecodeRun.threads(masks, 1, folder / str(r))
        conn.send((run.split.cpu, run.split.queued, run.wall))
        r += 1


class ProcessPair:
    """Two processes, each decoding half the masks with 1 worker thread, started together:
    the work of ``DecodeRun.threads(masks, 2, ...)`` with no GIL shared. What they reach is
    what 2 cores give this decoder on this machine, whatever the GIL costs threads."""

    def __init__(self, masks: list[list[bytes]], folder: Path) -> None:
        ctx = multiprocessing.get_context("spawn")  # fork would copy our threads' held locks
        self.mb = mask_mb(masks)
        # kept while the children live: they attach to its semaphore as they start
        self.start = ctx.Barrier(2)
        half = len(masks) // 2
        self.conns: list[Connection] = []
        self.procs: list[BaseProcess] = []
        folder.mkdir()
        for i, part in enumerate((masks[:half], masks[half:])):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=decode_in_child,
                args=(part, theirs, self.start, folder / f"p{i}"),
                daemon=True,
            )
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)

    def run(self) -> DecodeRun:
        for conn in self.conns:
            conn.send(True)
        answers: list[tuple[float, float, float]] = []
        for conn in self.conns:
            if not conn.poll(300):
                raise RuntimeError("a decoding process did not answer within 300 s")
            answers.append(conn.recv())
        split = Split(sum(a[0] for a in answers), sum(a[1] for a in answers))
        # they start together (a barrier), so the run lasts as long as the slower one
        return DecodeRun(self.mb, split, max(a[2] for a in answers))

    def __enter__(self) -> ProcessPair:
        return self

    def __exit__(self, *exc: object) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(False)
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(10)


def unloaded_vs_one(
    name: str, runs: list[float], one: list[float], ratio: float, **more: Any
) -> Figure:
    """A figure of load-free MB/s (medians) against 1 worker thread's, and their ratio."""
    return Figure(
        name=name,
        value=round(float(np.median(runs)), 1),
        unit="MB/s",
        baseline="1 worker thread, load taken out",
        baseline_value=round(float(np.median(one)), 1),
        ratio=round(ratio, 3),
        **more,
    )


def decode_threads(args: argparse.Namespace, work: Path) -> list[Figure]:
    points = 1_000_000 if args.quick else 5_000_000
    runs = 1 if args.quick else 7
    masks = [mask_chunks(points, seed=i) for i in range(4)]
    total_mb = mask_mb(masks)
    try:
        calibration: list[tuple[float, float]] | None = calibrate()
        meter_missing = ""
    except RuntimeError as exc:  # no C compiler or no interpreter headers on this machine
        calibration, meter_missing = None, str(exc).splitlines()[0][:200]
    best: dict[int, DecodeRun] = {}
    # 1 and 2: worker threads; 0: two processes of 1 worker thread each (no GIL shared)
    unloaded: dict[int, list[float]] = {1: [], 2: [], 0: []}
    held: dict[int, float] = {}
    with ProcessPair(masks, work / "decode-processes") as pair:
        for r in range(runs):
            for threads in (1, 2, 0):  # interleaved, so a change in load hits all alike
                if threads:
                    run = DecodeRun.threads(masks, threads, work / f"decode-{threads}-{r}")
                else:
                    run = pair.run()
                if threads not in best or run.rate > best[threads].rate:
                    best[threads] = run
                unloaded[threads].append(run.unloaded_rate)
                log(
                    f"decode with {f'{threads} thread(s)' if threads else '2 processes'}:"
                    f" {run.rate:.0f} MB/s, {run.unloaded_rate:.0f} MB/s unloaded, cpu"
                    f" {run.split.cpu:.2f} s, queued {run.split.queued:.2f} s, wall"
                    f" {run.wall:.2f} s"
                )
    for threads in (1, 2) if calibration is not None else ():
        # Separate runs: the sampler thread's own wakeups would show in the times above.
        with GilMeter() as meter:
            DecodeRun.threads(masks, threads, work / f"decode-gil-{threads}")
        held[threads] = meter.held
        log(f"GIL held {meter.held:.3f} of the time with {threads} thread(s)")
    ratio = best[2].rate / best[1].rate
    # Median of the pairs: a CPU-second buys less when other sessions share the caches, so
    # each 2-thread run is set against the 1-thread run just before it.
    unloaded_ratio = float(np.median(np.array(unloaded[2]) / np.array(unloaded[1])))
    process_ratio = float(np.median(np.array(unloaded[0]) / np.array(unloaded[1])))
    g = held.get(1)
    setup = (
        f"4 masks of {points:,} labels ({total_mb:.0f} MB of text) decoded at once through"
        f" LabelSink (decode, staging writes, final .npy), 1 MiB chunks from memory (a real"
        f" harvest's chunks are mostly 1 MiB too: aiohttp fills its buffer while a chunk is"
        f" decoded); best of {runs} interleaved runs. Cores available: {default_threads()}."
    )
    queued = {t: best[t].split.queued / best[t].wall for t in (1, 2)}
    figures = [
        Figure(
            name="decode throughput, 2 worker threads vs 1",
            value=round(best[2].rate, 1),
            unit="MB/s",
            baseline="1 worker thread",
            baseline_value=round(best[1].rate, 1),
            ratio=round(ratio, 3),
            target="about 2x on 2 cores (>= 1.6)",
            met=ratio >= 1.6,
            note=(
                f"{setup} Wall clock on a shared machine: in the best 2-thread run our threads"
                f" sat runnable but queued behind other processes {queued[2]:.2f} thread-seconds"
                f" per second ({queued[1]:.2f} with 1 thread); the next two figures are the"
                f" load-independent readings. {load()}"
            ),
            detail={"cpu_s": [best[t].split.cpu for t in (1, 2)]},
        ),
        unloaded_vs_one(
            "decode throughput, 2 worker threads vs 1, other processes' load taken out",
            unloaded[2],
            unloaded[1],
            unloaded_ratio,
            target="about 2x on 2 cores (>= 1.6)",
            met=unloaded_ratio >= 1.6,
            note=(
                f"{setup} From /proc/self/task/*/schedstat: each thread's time on a core and"
                f" time runnable but queued behind another process. A run takes cpu /"
                f" cores_wanted when nothing else runs, cores_wanted being (on-core + queued) /"
                f" wall: how many of our threads were ready at once, which the GIL bounds and"
                f" load does not. Cores wanted: {best[1].cores_wanted:.2f} with 1 thread,"
                f" {best[2].cores_wanted:.2f} with 2 (best wall-clock runs). MB/s are medians"
                f" of {runs} runs, the ratio the median of the {runs} interleaved pairs."
                f" Conservative: while a queued thread holds the GIL the other waits, and that"
                f" wait stays in. The same work in two processes (next figure, no GIL shared)"
                f" reached {process_ratio:.2f}x in the same rounds: threads get"
                f" {unloaded_ratio / process_ratio:.2f} of what the machine gives. {load()}"
            ),
            detail={
                "unloaded_mb_s": [unloaded[1], unloaded[2]],
                "cores_wanted": [best[t].cores_wanted for t in (1, 2)],
                "queued_s": [best[t].split.queued for t in (1, 2)],
            },
        ),
        unloaded_vs_one(
            "decode throughput, 2 processes vs 1 thread, load taken out (no GIL shared)",
            unloaded[0],
            unloaded[1],
            process_ratio,
            note=(
                f"{setup} The reference for the figure above: two processes (spawned once,"
                f" started together at a barrier each round), each decoding 2 of the 4 masks"
                f" with 1 worker thread, exactly as the 1-thread run does, in the same"
                f" interleaved rounds and taken out of load the same way (both processes'"
                f" threads summed, the slower one's wall). Nothing is shared but the machine,"
                f" so this ratio is what 2 cores give this decoder here; where threads reach"
                f" it, the GIL costs them nothing measurable. {load()}"
            ),
            detail={"unloaded_mb_s": unloaded[0], "cores_wanted": best[0].cores_wanted},
        ),
    ]
    gil_name = "GIL held while 1 worker thread decodes (share of wall time)"
    if g is None or calibration is None:
        figures.append(
            Figure(name=gil_name, value=None, unit="share", note=f"not measured: {meter_missing}")
        )
        return figures
    figures.append(
        Figure(
            name=gil_name,
            value=round(g, 3),
            unit="share",
            target="< 0.5 (two threads can then both run: at most 1/share, capped by cores)",
            met=g < 0.5,
            note=(
                f"{setup} A native thread (bench/gilsample.c) samples the interpreter's GIL"
                f" flag every 10-30 µs, jittered; calibrated in the same run against patterns"
                f" holding it "
                + ", ".join(f"{e:.2f} (read {m:.3f})" for e, m in calibration)
                + f". With 2 threads it is held {held[2]:.3f} of the time. Held and free time"
                f" stretch alike under load, so the share depends on it far less than wall"
                f" time does (it still moves by about 0.05 between runs). Two threads need the"
                f" GIL 2 x share of the time, well under 1: it does not serialise them. Smaller"
                f" chunks raise the share (measured 0.44 at 64 KiB, 0.71 at 16 KiB: the"
                f" decoder's fixed cost is ~30 µs per feed), but a harvest gets small chunks only"
                f" when the network is slower than decoding."
            ),
            detail={"held_2_threads": held[2], "calibration": calibration},
        )
    )
    return figures


# -- (c) throughput against a per-connection throttled storage host -----------------------

BENTLEY_PAYLOAD: dict[str, Any] = {
    "type": "Segmentation2D",
    "iTwinId": "itwin-1",
    "specifications": {
        "inputs": {"photos": "rd-1"},
        "outputs": ["segmentation2D"],
        "options": {},
    },
}


def bentley_config(
    work: Path, emu: EmulatorProcess, name: str, *, concurrency: int, part_bytes: int
) -> Config:
    os.environ["BENCH_BENTLEY_SECRET"] = "bench-bentley-secret"
    folder = work / name
    folder.mkdir()
    doc: dict[str, Any] = {
        "store": {"url": "sqlite://state.db"},
        "output": {"dir": "out"},
        "harvest": {"frame_concurrency": concurrency, "part_bytes": part_bytes},
        "providers": {
            "bentley": {
                "base_url": emu.urls["bentley"],
                "token_url": emu.urls["token"],
                "client_id": "bench",
                "client_secret_env": "BENCH_BENTLEY_SECRET",
                "rate_per_s": 0,
                "poll_min_s": 0.1,
                "poll_max_s": 0.2,
                "request_timeout_s": 60,
            }
        },
    }
    return parse_config(doc, source=folder / "harvester.toml")


class Throughput:
    """Samples the engine's downloaded-bytes counter: when the blobs' bytes flowed."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []

    async def watch(self, engine: Engine) -> None:
        counter = engine.metrics.bytes_downloaded.labels("bentley")
        while True:
            self.samples.append((time.perf_counter(), counter._value.get()))
            await anyio.sleep(0.01)

    def rate(self, total: float) -> float:
        """Bytes per second from the first sample with 1% of ``total`` to the first with 99%."""
        t_lo = next(t for t, b in self.samples if b >= 0.01 * total)
        t_hi = next(t for t, b in self.samples if b >= 0.99 * total)
        return 0.98 * total / (t_hi - t_lo)


def throttled(args: argparse.Namespace, work: Path) -> list[Figure]:
    parts, blob_mb = (4, 4) if args.quick else (4, 12)
    blob_bytes = blob_mb * MIB
    scenario = (
        "seed = 1\n[bentley]\njob_duration_s = 0.2\n"
        f"parts_per_output = {parts}\nblob_bytes = {blob_bytes}\n"
        f"[storage]\nconnection_bytes_per_s = {CONN_MB * MB}\n"
        f"link_bytes_per_s = {LINK_MB * MB}\n"
    )
    total = parts * blob_bytes
    shares: dict[str, float] = {}
    lag: dict[str, LagProbe] = {}
    with EmulatorProcess(work, scenario, name="emu-throttled") as emu:
        for label, concurrency, part_bytes in (
            ("serial", 1, 1 << 40),
            ("parallel", 8, 2 * MIB),
        ):
            cfg = bentley_config(work, emu, label, concurrency=concurrency, part_bytes=part_bytes)
            watch = Throughput()
            job = NewJob("bentley", f"b-{label}", f"b-{label}", None, BENTLEY_PAYLOAD, "bench")
            probe, secs = anyio.run(run_engine, cfg, [job], "bentley", Offload(), watch.watch)
            rate = watch.rate(total)
            shares[label] = rate / (LINK_MB * MB)
            lag[label] = probe
            log(
                f"throttled {label}: {rate / MB:.1f} MB/s = {shares[label]:.2f} of the link,"
                f" lag p99 {probe.p99_ms():.1f} ms ({secs:.1f} s in all)"
            )
    share = shares["parallel"]
    note = (
        f"Bentley job, {parts} blobs of {blob_mb} MiB; emulator storage capped at"
        f" {CONN_MB:g} MB/s per connection and {LINK_MB:g} MB/s for the link."
        f" Parallel: frame_concurrency 8, part_bytes 2 MiB. Serial: one blob at a time, whole."
        f" {load()}"
    )
    return [
        Figure(
            name="harvest throughput vs a per-connection-throttled storage host, share of link",
            value=round(share, 3),
            unit="share",
            baseline="one blob at a time, one request each",
            baseline_value=round(shares["serial"], 3),
            target=">= 0.9",
            met=share >= 0.9,
            note=note,
        ).with_ratio(),
        Figure(
            name="event loop lag p99 during the throttled harvest",
            value=round(lag["parallel"].p99_ms(), 2),
            unit="ms",
            baseline="serial harvest",
            baseline_value=round(lag["serial"].p99_ms(), 2),
            note=note,
        ).with_ratio(),
    ]


def run(args: argparse.Namespace, work: Path) -> list[Figure]:
    configure("error", "json")
    figures: list[Figure] = []
    for part in (decode_threads, loop_lag, throttled):
        figures += part(args, work)
    return figures


if __name__ == "__main__":
    bench_main("offload", run)
