"""How much of the time the GIL is held, and how our threads' time splits, independent of load.

Two load-independent readings the decode benchmark needs on a shared machine, where wall-clock
ratios between runs mostly measure the other sessions:

- ``GilMeter``: a native thread (``gilsample.c``, built here with the running interpreter's
  headers and ``cc``) samples the interpreter's GIL flag every 10-30 µs. The share of samples
  with the GIL held is a share of wall time, so a busy machine stretches held and free time
  alike. ``calibrate`` checks the meter against a known pattern before it is trusted.
- ``ThreadTimes``: every thread of this process from ``/proc/self/task/*/schedstat``: time on
  a core, and time *runnable but waiting for a core* (the run queue: other processes' load).
  What is left of a thread's life is time blocked (on the GIL, a lock, I/O).

Not a benchmark itself; Linux only (the /proc files); fails loudly without a C compiler.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_SOURCE = Path(__file__).resolve().parent / "gilsample.c"
_lib: ctypes.PyDLL | None = None


def _load() -> ctypes.PyDLL:
    global _lib
    if _lib is None:
        out = Path(tempfile.mkdtemp(prefix="gilsample-")) / "gilsample.so"
        include = sysconfig.get_paths()["include"]
        cc = os.environ.get("CC", "cc")
        cmd = [cc, "-O2", "-shared", "-fPIC", f"-I{include}", "-o", str(out), str(_SOURCE)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            raise RuntimeError(f"cannot build {_SOURCE.name} ({' '.join(cmd)}): {detail}") from exc
        # PyDLL: the calls keep the GIL (they only start and stop the sampler)
        _lib = ctypes.PyDLL(str(out))
    return _lib


class GilMeter:
    """``with GilMeter() as m: ...`` then ``m.held``: the share of samples with the GIL held."""

    def __init__(self, interval_us: float = 20.0) -> None:
        self.interval_ns = int(interval_us * 1000)
        self.held = float("nan")
        self.samples = 0

    def __enter__(self) -> GilMeter:
        if _load().gil_start(ctypes.c_long(self.interval_ns)) != 0:
            raise RuntimeError("cannot start the GIL sampler thread")
        return self

    def __exit__(self, *exc: object) -> None:
        out = (ctypes.c_longlong * 2)()
        _load().gil_stop(out)
        self.samples = out[1]
        self.held = out[0] / out[1] if out[1] else float("nan")


def calibrate(seconds: float = 0.3) -> list[tuple[float, float]]:
    """(expected, measured) held shares for known hold/release patterns; raises if grossly off
    (a wrong flag reads 0 or 1). Under load readings stray by a few hundredths: a pattern
    thread preempted on its way to release the GIL holds it longer than planned."""
    results = []
    for held_us, free_us in ((20, 180), (100, 100), (180, 20)):
        reps = int(seconds * 1e6 / (held_us + free_us))
        with GilMeter() as meter:
            _load().gil_pattern(
                ctypes.c_long(held_us * 1000), ctypes.c_long(free_us * 1000), ctypes.c_long(reps)
            )
        expected = held_us / (held_us + free_us)
        results.append((expected, meter.held))
        if abs(meter.held - expected) > 0.1:
            raise RuntimeError(
                f"GIL meter off: expected {expected:.2f} held, measured {meter.held:.2f}"
            )
    return results


@dataclass
class Split:
    """Seconds summed over threads: on a core, and runnable but waiting for one."""

    cpu: float = 0.0
    queued: float = 0.0


class ThreadTimes:
    """``with ThreadTimes() as t: ...`` then ``t.split``: this process's threads over the block
    (threads that start inside it count from zero; none may end inside it unseen, so worker
    threads must outlive the block)."""

    def __init__(self) -> None:
        self.split = Split()
        self.wall = 0.0
        self._start: dict[str, tuple[int, int]] = {}

    @staticmethod
    def _read() -> dict[str, tuple[int, int]]:
        times: dict[str, tuple[int, int]] = {}
        for task in Path("/proc/self/task").iterdir():
            try:
                fields = (task / "schedstat").read_text().split()
            except OSError:
                continue  # ended between listing and reading
            times[task.name] = (int(fields[0]), int(fields[1]))
        return times

    def __enter__(self) -> ThreadTimes:
        self._start = self._read()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        end = self._read()
        cpu = queued = 0
        for tid, (c, q) in end.items():
            c0, q0 = self._start.get(tid, (0, 0))
            cpu += c - c0
            queued += q - q0
        self.split = Split(cpu / 1e9, queued / 1e9)


if __name__ == "__main__":
    for expected, measured in calibrate():
        print(f"pattern holding the GIL {expected:.2f} of the time: measured {measured:.3f}")
    sys.exit(0)
