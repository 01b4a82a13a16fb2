"""The server side of rate limiting: a token bucket that answers "yes" or "come back in N s".

Deliberately separate from ``harvester.ratelimit`` (the client's limiter): the emulator must
not share a misunderstanding with the code it tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    __slots__ = ("_burst", "_clock", "_level", "_rate", "_updated")

    def __init__(
        self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be > 0 (an unlimited API needs no bucket)")
        self._rate = rate_per_s
        self._burst = float(burst if burst > 0 else max(1.0, rate_per_s))
        self._clock = clock
        self._level = self._burst
        self._updated = clock()

    def take(self) -> float:
        """Take one token: 0.0 when granted, else the seconds until one would be."""
        now = self._clock()
        self._level = min(self._burst, self._level + (now - self._updated) * self._rate)
        self._updated = now
        if self._level >= 1.0:
            self._level -= 1.0
            return 0.0
        return (1.0 - self._level) / self._rate

    def __repr__(self) -> str:
        return f"<TokenBucket rate={self._rate}/s burst={self._burst:g} level={self._level:.2f}>"
