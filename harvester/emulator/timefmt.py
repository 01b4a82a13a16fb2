"""Wall-clock renderings of the emulator's monotonic time.

Job progress runs on the monotonic clock (a test may replace it, and NTP steps must not move
a job backwards); APIs show wall-clock timestamps. A ``Stamp`` taken at creation ties the two,
so every later moment of a job renders consistently in each provider's own format.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Stamp:
    mono: float
    wall: float

    @classmethod
    def now(cls, clock: Callable[[], float], wall_clock: Callable[[], float] = time.time) -> Stamp:
        return cls(clock(), wall_clock())

    def wall_at(self, mono: float) -> float:
        return self.wall + (mono - self.mono)


def epoch_ms(epoch: float) -> int:
    """Cognite's timestamps: integer milliseconds since the epoch."""
    return int(epoch * 1000)


def iso_z(epoch: float) -> str:
    """``2024-05-01T12:00:00.123Z`` (Bentley)."""
    ms = int(epoch * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{ms:03d}Z"


def iso_offset(epoch: float) -> str:
    """``2024-05-01T12:00:00.123+00:00`` (Modzy: ISO 8601 "YYYY-MM-DDThh:mm:ss.sTZD", whose
    TZD is ``+hh:mm``; its SDK's published messages read these as RFC 3339 timestamps)."""
    ms = int(epoch * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{ms:03d}+00:00"


def http_date(epoch: float) -> str:
    """``Wed, 01 May 2024 12:00:00 GMT`` (Azure's Last-Modified)."""
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(epoch))
