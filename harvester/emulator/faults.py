"""Which injected faults hit which request.

A fault is live in its window ``[start, start + duration)`` while it has firings left; a live
fault fires with its probability, drawn from one seeded RNG, so a scenario replayed with the
same request sequence fails the same requests. ``slow`` faults add up and let the request go on;
the first other fault that fires decides the answer.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from harvester.emulator.scenario import FaultSpec


@dataclass(slots=True)
class _Live:
    spec: FaultSpec
    starts_at: float
    ends_at: float
    fired: int = 0

    def applies(self, provider: str, path: str, now: float) -> bool:
        s = self.spec
        return (
            s.provider == provider
            and self.starts_at <= now < self.ends_at
            and (s.count is None or self.fired < s.count)
            and s.match in path
        )


@dataclass(frozen=True, slots=True)
class Decision:
    delay_s: float = 0.0
    fault: FaultSpec | None = None  # the non-slow fault that fired, if any

    @property
    def kinds(self) -> list[str]:
        out = ["slow"] if self.delay_s > 0 else []
        return [*out, self.fault.kind] if self.fault else out


class FaultBook:
    def __init__(self, seed: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rng = random.Random(f"{seed}:faults")
        self._clock = clock
        self._live: list[_Live] = []

    def add(self, spec: FaultSpec) -> None:
        """Schedule ``spec`` with its ``start_s`` counted from now."""
        start = self._clock() + spec.start_s
        end = start + spec.duration_s if math.isfinite(spec.duration_s) else math.inf
        self._live.append(_Live(spec, start, end))

    def clear(self) -> None:
        self._live.clear()

    def decide(self, provider: str, path: str) -> Decision:
        now = self._clock()
        delay = 0.0
        for live in self._live:
            if not live.applies(provider, path, now):
                continue
            if live.spec.probability < 1.0 and self._rng.random() >= live.spec.probability:
                continue
            live.fired += 1
            if live.spec.kind == "slow":
                delay += live.spec.delay_s
                continue
            return Decision(delay, live.spec)
        return Decision(delay, None)

    def snapshot(self) -> list[dict[str, object]]:
        now = self._clock()
        return [
            {
                **live.spec.to_json(),
                "starts_in_s": round(live.starts_at - now, 3),
                "ends_in_s": None if math.isinf(live.ends_at) else round(live.ends_at - now, 3),
                "fired": live.fired,
            }
            for live in self._live
        ]
