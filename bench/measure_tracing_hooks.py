"""What the tracing hooks cost on the poll hot path: ``with tracing.step("poll", job):``.

Times the hook around an empty body, per call, minus an empty call: with tracing off (what
every install without ``OTEL_*`` pays: a call returning the shared no-op, entered and left)
and on (the SDK, a synchronous processor into an in-memory exporter, cheaper than any real
export). Best of several rounds of N calls each: a busy machine only makes figures larger.

    .venv/bin/python bench/measure_tracing_hooks.py [--calls N] [--rounds R]

For scale: harvester polls about 10,000 times a second flat out (BENCHMARKS.md, row 17),
roughly 100 microseconds of its own CPU per poll.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

from harvester import tracing
from harvester.jobs import Job, JobState

JOB = Job("playment", "scan-0001", "scan-0001", "remote-1", JobState.RUNNING, 1.7e9, 1.7e9)


def hook() -> None:
    with tracing.step("poll", JOB):
        pass


def nothing() -> None:
    pass


def per_call(fn: Callable[[], None], calls: int, rounds: int) -> float:
    """Best seconds per call over ``rounds`` rounds (a busy machine only makes it slower)."""
    return min(timeit.repeat(fn, number=calls, repeat=rounds)) / calls


def main(calls: int, rounds: int) -> None:
    base = per_call(nothing, calls, rounds)
    off = per_call(hook, calls, rounds) - base
    on = float("nan")
    if tracing.AVAILABLE:
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        provider = tracing.new_provider()
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        tracing.setup(provider=provider)
        on = per_call(hook, max(calls // 20, 1), rounds) - base
        tracing.shutdown()
    print(f"hook, tracing off:      {off * 1e9:8.0f} ns per poll")
    print(f"hook, tracing on (SDK): {on * 1e9:8.0f} ns per poll")
    print(f"off, against ~100 us of harvester CPU per poll: {off / 100e-6:.2%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    main(args.calls, args.rounds)
