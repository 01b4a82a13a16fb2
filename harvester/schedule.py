"""When each job is next due: the per-lane due-time queue, and the older poll-interval policy.

Pure: no tasks, no timers, time passed in. A lane keeps the steps that have a due time
(submit, reconcile, harvest, a retry's backoff, a cancel) in its ``DueQueue``; running jobs
wait for their polls in the poll scheduler (``harvester.pollsched``) instead. ``PollPolicy``
(intervals growing by a factor, or a provider's ladder) is how the engine polled before
that scheduler: the scheduling simulator runs it as the "before" strategy.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

__all__ = ["BENTLEY_LADDER", "DueQueue", "PollPolicy"]

#: Bentley asks clients to poll at 15, 30, 60, then every 120 s, and to restart that ladder
#: whenever the job's progress percentage changes.
BENTLEY_LADDER: tuple[float, ...] = (15.0, 30.0, 60.0, 120.0)


class PollPolicy:
    """How long to wait before polling a job again.

    Without a ladder the interval grows by ``factor`` while nothing changes and falls back to
    ``min_s`` on progress. With a ladder it walks the rungs instead and restarts at the first
    rung on progress. Every value gets multiplicative jitter of ``±jitter`` (so jobs submitted
    together drift apart) and is then clamped into ``[min_s, max_s]``; a ladder's rungs are
    the provider's own minimum waits, so their jitter only lengthens them (``+jitter``).
    """

    __slots__ = ("factor", "jitter", "ladder", "max_s", "min_s")

    def __init__(
        self,
        *,
        min_s: float,
        max_s: float,
        factor: float = 1.5,
        jitter: float = 0.1,
        ladder: Sequence[float] | None = None,
    ) -> None:
        if not (math.isfinite(min_s) and min_s > 0):
            raise ValueError(f"min_s must be > 0, got {min_s!r}")
        if not (math.isfinite(max_s) and max_s >= min_s):
            raise ValueError(f"max_s must be >= min_s ({min_s}), got {max_s!r}")
        if not (math.isfinite(factor) and factor >= 1):
            raise ValueError(f"factor must be >= 1, got {factor!r}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter!r}")
        self.min_s = float(min_s)
        self.max_s = float(max_s)
        self.factor = float(factor)
        self.jitter = float(jitter)
        self.ladder: tuple[float, ...] | None = None
        if ladder is not None:
            if not ladder or not all(math.isfinite(x) and x > 0 for x in ladder):
                raise ValueError(f"ladder must be non-empty positive seconds, got {ladder!r}")
            self.ladder = tuple(self._clamp(float(x)) for x in ladder)

    def first(self, rng: random.Random) -> float:
        """Delay before the first poll after a job is submitted or starts being tracked."""
        if self.ladder is not None:
            return self._jittered(self.ladder[0], rng, up_only=True)
        return self._jittered(self.min_s, rng)

    def next(self, previous: float, *, changed: bool, rng: random.Random) -> float:
        """Delay before the next poll, given the previous delay and whether the job moved."""
        if self.ladder is not None:
            if changed:
                return self._jittered(self.ladder[0], rng, up_only=True)
            rung = min(self._rung_of(previous) + 1, len(self.ladder) - 1)
            return self._jittered(self.ladder[rung], rng, up_only=True)
        if changed:
            return self._jittered(self.min_s, rng)
        return self._jittered(self._clamp(previous) * self.factor, rng)

    def _rung_of(self, previous: float) -> int:
        # The previous delay carries jitter, so find the nearest rung in ratio terms. Among
        # equal rungs (clamping can merge them) take the last, or the walk would never leave.
        ladder = self.ladder
        assert ladder is not None
        prev = max(previous, 1e-9)
        return min(range(len(ladder)), key=lambda i: (abs(math.log(prev / ladder[i])), -i))

    def _clamp(self, seconds: float) -> float:
        return min(max(seconds, self.min_s), self.max_s)

    def _jittered(self, seconds: float, rng: random.Random, *, up_only: bool = False) -> float:
        if self.jitter:
            seconds *= 1.0 + rng.uniform(0.0 if up_only else -self.jitter, self.jitter)
        return self._clamp(seconds)

    def __repr__(self) -> str:
        shape = f"ladder={self.ladder}" if self.ladder else f"factor={self.factor:g}"
        return (
            f"PollPolicy(min_s={self.min_s:g}, max_s={self.max_s:g}, {shape}, "
            f"jitter={self.jitter:g})"
        )


K = TypeVar("K", bound=Hashable)

# Below this many stale heap entries, compacting costs more than it saves.
_COMPACT_MIN = 1024


class DueQueue(Generic[K]):
    """Keys ordered by due time (ties in scheduling order), with move and remove in O(log n).

    ``_live`` maps each key to its current heap entry; a heap entry whose tuple is not the one
    in ``_live`` is stale (moved or discarded) and is skipped when it surfaces. The heap is
    rebuilt when stale entries outnumber live ones, so memory stays proportional to ``len``;
    so is ``_live`` once it has emptied (a dict keeps its largest table: 100,000 jobs loaded
    at once and moved on would leave 40 bytes each behind).
    """

    __slots__ = ("_heap", "_live", "_peak", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._live: dict[K, tuple[float, int, K]] = {}
        self._peak = 0  #: the most keys ``_live`` held since it was last rebuilt
        self._seq = itertools.count()

    def schedule(self, key: K, due_at: float) -> None:
        """Make ``key`` due at ``due_at``, replacing any earlier schedule of it."""
        if math.isnan(due_at):
            raise ValueError(f"due_at of {key!r} is NaN")
        entry = (due_at, next(self._seq), key)
        self._live[key] = entry
        self._peak = max(self._peak, len(self._live))
        heapq.heappush(self._heap, entry)
        self._maybe_compact()

    def discard(self, key: K) -> None:
        """Forget ``key`` if it is scheduled."""
        if self._live.pop(key, None) is not None:
            self._maybe_compact()

    def pop_due(self, now: float, limit: int) -> list[K]:
        """Remove and return up to ``limit`` keys due at or before ``now``, earliest first."""
        out: list[K] = []
        heap, live = self._heap, self._live
        while heap and len(out) < limit:
            entry = heap[0]
            if live.get(entry[2]) is not entry:
                heapq.heappop(heap)
                continue
            if entry[0] > now:
                break
            heapq.heappop(heap)
            del live[entry[2]]
            out.append(entry[2])
        if out:
            self._maybe_compact()
        return out

    def next_due(self) -> float | None:
        """The earliest due time, or None when empty."""
        heap, live = self._heap, self._live
        while heap and live.get(heap[0][2]) is not heap[0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def due_at(self, key: K) -> float | None:
        """When ``key`` is due, or None if it is not scheduled."""
        entry = self._live.get(key)
        return entry[0] if entry is not None else None

    def _maybe_compact(self) -> None:
        live = len(self._live)
        stale = len(self._heap) - live
        if stale > _COMPACT_MIN and stale > live:
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)
        if self._peak > _COMPACT_MIN and self._peak > 4 * live:
            self._live = dict(self._live)  # a copy is sized for what it holds
            self._peak = live

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def __repr__(self) -> str:
        return f"<DueQueue live={len(self._live)} heap={len(self._heap)} next={self.next_due()}>"
