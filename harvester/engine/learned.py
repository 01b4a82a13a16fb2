"""The learned job durations in the store: loaded at start, merged into it at each save.

The poll schedulers' tables (``harvester.durations``) are one store meta value. A save folds
only what this process learned since its last save or load into the value as stored *now*,
in one ``Store.update_meta`` transaction (PostgreSQL: the row locked ``FOR UPDATE``; sqlite:
an immediate transaction), then takes the merged tables as its own. So replicas sharing a
PostgreSQL store add up their samples instead of the last save overwriting the others', and
each also learns what the others did; on sqlite (one process) it is the same path.

Why a merge into one value rather than a value per replica merged at load: the store keeps one
document of bounded size however many replicas have come and gone (replica ids are new per
process), and there is nothing to garbage-collect. A replica that crashes between saves loses
only its unsaved counts, and nothing saved is counted twice: its next process starts from the
stored value as its base. (An answer lost after PostgreSQL committed a save would count that
save's increments again at the next one: a handful of samples in a table that halves its counts
past a million, against a scheme that needed per-replica bookkeeping forever.)
"""

from __future__ import annotations

from harvester.durations import DurationStats, merge
from harvester.errors import StoreError
from harvester.logs import get_logger
from harvester.store.base import Store

__all__ = ["DURATIONS_META", "LearnedDurations"]

log = get_logger("harvester.engine")

#: the store meta entry that keeps the learned job durations
DURATIONS_META = "poll.durations"
_WHERE = f"store meta {DURATIONS_META}"


class LearnedDurations:
    """``stats`` (the engine's tables) kept in ``store``; a broken stored value is reported
    and learning starts afresh (it is a cache), a store error skips a save (retried later)."""

    def __init__(self, store: Store, stats: DurationStats) -> None:
        self.store = store
        self.stats = stats
        self._seen: str | None = None  #: the stored value as last loaded, read or written

    def _parse(self, value: str) -> DurationStats:
        return DurationStats.from_bytes(value.encode(), alpha=self.stats.alpha, where=_WHERE)

    async def load(self) -> None:
        """The tables as the store holds them (left by the last run, or by other replicas)."""
        snap = self.stats.snapshot()
        value = await self.store.get_meta(DURATIONS_META)
        if value is None or value == self._seen:
            return
        try:
            saved = self._parse(value)
        except ValueError as exc:
            log.warning("learned job durations not loaded; learning afresh", error=str(exc))
            return
        self.stats.adopt(saved, snap)
        self._seen = value

    async def save(self, *, refresh: bool = False) -> None:
        """Fold what was learned here since the last save into the stored tables. With
        nothing new, ``refresh`` still picks up what other replicas saved meanwhile."""
        snap = self.stats.snapshot()
        pending = self.stats.pending(snap)
        if not pending:
            if refresh:
                try:
                    await self.load()
                except StoreError as exc:
                    log.warning("learned job durations not read", error=str(exc))
            return
        merged: list[DurationStats] = []
        broken: list[str] = []

        def update(stored: str | None) -> str:
            base = DurationStats(alpha=self.stats.alpha, prior=self.stats.prior)
            if stored is not None:
                try:
                    base = self._parse(stored)
                except ValueError as exc:
                    broken.append(str(exc))
            merged[:] = [merge(base, pending)]
            return merged[0].to_bytes().decode()

        try:
            value = await self.store.update_meta(DURATIONS_META, update)
        except StoreError as exc:
            log.warning("learned job durations not saved", error=str(exc))
            return
        if broken:
            log.warning("unreadable learned job durations replaced", error=broken[-1])
        self.stats.adopt(merged[0], snap)
        self._seen = value
