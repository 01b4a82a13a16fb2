"""What the Bentley, Cognite and Modzy job models start from."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

from harvester.emulator.timefmt import Stamp

S = TypeVar("S")


class JobModel(Generic[S]):
    """A provider's jobs as a function of its scenario, the seed every draw derives from,
    and two clocks: ``clock`` (monotonic) times a job's progress, ``wall_clock`` gives the
    dates its documents show. ``_start`` sets up the model's own state."""

    def __init__(
        self,
        scenario: S,
        seed: int,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._s = scenario
        self._seed = seed
        self._clock = clock
        self._wall = wall_clock
        self._start()

    def _start(self) -> None:
        """The model's own state: its jobs, its id generator..."""

    def _stamp(self, mono: float | None = None) -> Stamp:
        """Now (or monotonic time ``mono``) on both clocks."""
        return Stamp(self._clock() if mono is None else mono, self._wall())
