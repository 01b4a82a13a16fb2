"""Which running job a poll goes to, decided when the limiter has a token for it.

Pure: no tasks, no timers, time passed in. A lane asks ``pick(now)`` each time its limiter
would admit a request (late binding: the choice is made when the token exists, not when a
timer was set) and reports the answer with ``polled``, ``finished`` or ``defer``.

Two rules, one structure:

- **The floor.** A job is never polled sooner than its floor after its last poll:
  ``poll_min_s``, or for a provider with a polling ladder (Bentley: 15/30/60/120 s, back to
  the first rung when progress moves) its current rung, whatever budget is spare. Jobs
  waiting out their floor sit in a heap by the time they become eligible.
- **The order.** Among eligible jobs the one with the earliest *key* goes first. A job last
  seen running at age ``a`` gets the key ``origin + G⁻¹(G(a) + c)``, where ``G`` is its
  class's cumulative root hazard (``harvester.durations``): the jobs most likely to have
  finished since their last poll come first, and with nothing learned every key is ``last
  poll + constant``: the longest-unpolled job first, round robin. A job that reports progress
  (Bentley's percentage, Modzy's completed/total) gets a hazard of 1 / its extrapolated
  remaining time instead.

When the budget has room every eligible job is picked as soon as a token comes: each is
polled at its floor. When it does not, tokens go in key order, and ``c`` is the square-root
law's constant, ``sum(hazard ** alpha) / rate`` over the jobs: the intervals it gives spend
the rate exactly, and minimise the mean detection delay for it (with ``alpha = 1/2``). No
key is later than the moment the job has more likely finished than not since it was last
seen (its survival halved): when the budget is short, ``c`` is large and every key would
otherwise fall on the cap below, and a job that has probably finished (a short job of two
modes, never polled yet) would wait its turn behind one that probably has not (a long job
already seen past the short mode). So that a hazard learned wrong cannot park a job, no key
is later than round robin would poll it (``stretch`` times the cycle ``jobs / rate``; twice
that for a job reporting progress).

``budget_share`` < 1 keeps polls to that share of the provider's rate (a key shared with
other clients, or paid per request): ``pick`` returns None when the share is spent. Every
operation is O(log n) in the number of jobs (amortised: keys are recomputed in bulk only
after about as many polls as there are jobs).

A hundred thousand jobs are held in little memory: a job is a slot number in parallel
arrays of its times and counts (no object of its own), and a heap entry is one int, its time
in microseconds above the slot number (the exact time stays in the slot's array: the entry
only orders).
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

from harvester.durations import DurationStats, Life
from harvester.ratelimit import TokenBucket

__all__ = ["PollScheduler"]

#: a job's key: hashable (the scheduler never orders keys: ties fall back on slot numbers)
K = TypeVar("K", bound=Hashable)

#: a heap entry is ``int(time * 1e6) << _SLOT_BITS | slot``: microseconds order the heap
#: (ties below that fall back on the slot; eligibility is judged on the exact time)
_SLOT_BITS = 32
_SLOT_MASK = (1 << _SLOT_BITS) - 1


class PollScheduler(Generic[K]):
    """The running jobs of one lane and which of them the next poll goes to."""

    __slots__ = (
        "_at",
        "_bucket",
        "_c",
        "_c_at_rekey",
        "_c_min",
        "_entry",
        "_free",
        "_keys",
        "_last",
        "_life",
        "_life_ix",
        "_lives",
        "_origin",
        "_picks_since_rekey",
        "_progress",
        "_rate",
        "_ready",
        "_rung",
        "_seen",
        "_share",
        "_slope",
        "_slope_sum",
        "_slots",
        "_unseen",
        "_waiting",
        "floor_s",
        "ladder",
        "stats",
        "stretch",
        "stretch_progress",
    )

    def __init__(
        self,
        *,
        floor_s: float,
        ladder: Sequence[float] | None = None,
        stats: DurationStats | None = None,
        rate_per_s: float = 0.0,
        burst: float = 1.0,
        budget_share: float = 1.0,
        stretch: float = 1.0,
        stretch_progress: float = 2.0,
    ) -> None:
        if not (math.isfinite(floor_s) and floor_s > 0):
            raise ValueError(f"floor_s must be > 0, got {floor_s!r}")
        if not 0 < budget_share <= 1:
            raise ValueError(f"budget_share must be in (0, 1], got {budget_share!r}")
        if ladder is not None and not (ladder and len(ladder) < 256 and all(x > 0 for x in ladder)):
            raise ValueError(f"ladder must be 1-255 positive seconds, got {ladder!r}")
        self.floor_s = float(floor_s)
        self.ladder = tuple(max(float(x), self.floor_s) for x in ladder) if ladder else None
        self.stats = stats if stats is not None else DurationStats()
        self.stretch = stretch
        self.stretch_progress = stretch_progress
        #: the polls' rate, for the round-robin cycle that caps every interval
        self._share = budget_share
        self._rate = rate_per_s * budget_share if 0 < rate_per_s < math.inf else 0.0
        self._bucket: TokenBucket | None = None
        if budget_share < 1 and 0 < rate_per_s < math.inf:
            share = rate_per_s * budget_share
            self._bucket = TokenBucket(share, max(1.0, burst * budget_share))
        # A job is a slot: its number in ``_slots``, and its values at that index in each
        # array below (freed slots are reused, so the arrays never outgrow the busiest time).
        self._slots: dict[K, int] = {}
        self._keys: list[K | None] = []
        self._free: list[int] = []
        self._origin = array("d")  #: when its duration started counting (monotonic)
        self._last = array("d")  #: when it was last seen running
        self._slope = array("d")  #: its hazard ** alpha when last seen (its share of ``c``)
        self._progress = array("d")  #: percent reported, NaN while none
        self._at = array("d")  #: when it is eligible (exact: its heap entry only orders)
        #: its live heap entry, the very int in the heap (an entry that is not is stale:
        #: moved or removed since); None while it is in flight
        self._entry: list[int | None] = []
        self._rung = array("B")
        self._seen = array("B")  #: life-table bins counted for it so far
        #: 1 while a job resumed after a restart has not been seen running since (when it
        #: was last seen, and so its duration, is not known)
        self._unseen = array("B")
        self._life = array("B")  #: its class's table: an index into ``_lives``
        self._lives: list[Life] = []  #: at most ``durations.MAX_CLASSES`` (256)
        self._life_ix: dict[Life, int] = {}
        self._waiting: list[int] = []  #: entries by the time each becomes eligible
        self._ready: list[int] = []  #: entries by key time
        #: c never below a thousandth of what gives a job of the prior hazard its floor
        self._c_min: float = self.floor_s * self.stats.prior**self.stats.alpha / 1000
        self._c = self._c_min
        self._c_at_rekey = self._c
        self._picks_since_rekey = 0
        #: sum over jobs of hazard ** alpha, each as of its last poll
        self._slope_sum = 0.0

    def set_rate(self, rate_per_s: float) -> None:
        """The provider's rate changed (replicas share one limit, and the share moves)."""
        share = self._share
        self._rate = rate_per_s * share if 0 < rate_per_s < math.inf else 0.0
        if self._bucket is not None and self._rate:
            self._bucket.rate_per_s = self._rate

    @property
    def rate_per_s(self) -> float:
        """The rate polls may use (the provider's times ``budget_share``); 0: unlimited."""
        return self._rate

    # -- the jobs --------------------------------------------------------------------------
    def add(
        self,
        key: K,
        now: float,
        *,
        cls: str = "",
        origin: float | None = None,
        last_poll: float | None = None,
    ) -> None:
        """Track a running job. ``origin``: when its run began (the provider's start time if
        it gives one, else submission; default now). ``last_poll``: when it was last seen
        running (a create answer counts); None makes it eligible at once."""
        if key in self._slots:
            raise ValueError(f"{key!r} is already scheduled")
        origin = now if origin is None else min(origin, now)
        last = origin if last_poll is None else last_poll
        i = self._new_slot(key, self._class_ix(cls), origin, last)
        if last_poll is None:
            self._push_waiting(i, now)
        else:
            self._seen[i] = self._lives[self._life[i]].alive(0, last_poll - origin)
            self._push_waiting(i, last_poll + self._floor(i))
        self._set_slope(i)

    def resume(self, key: K, now: float, *, cls: str = "", index: int = 0, total: int = 1) -> None:
        """Track a running job loaded at a restart (``index`` of ``total`` loaded together):
        when it was last polled, and when it began, are not known here (its first answer
        says, through ``polled``'s or ``finished``'s ``origin``).

        With a rate the job is eligible at once: the limiter spaces the first polls, and
        they go in key order like any. Without one, the first polls are spread evenly over
        one floor, as they are in the steady state where each job is polled once a floor,
        instead of all of them at once.
        """
        if not 0 <= index < total:
            raise ValueError(f"index must be in [0, {total}), got {index}")
        if key in self._slots:
            raise ValueError(f"{key!r} is already scheduled")
        i = self._new_slot(key, self._class_ix(cls), now, now)
        self._unseen[i] = 1
        spread = 0.0 if self._rate else self._floor(i) * index / total
        self._push_waiting(i, now + spread)
        self._set_slope(i)

    def remove(self, key: K) -> None:
        """Stop tracking a job that did not finish (failed, cancelled, given up, dropped)."""
        i = self._slots.pop(key, None)
        if i is not None:
            self._lives[self._life[i]].withdrawn(self._seen[i])
            self._free_slot(i)

    def floor_of(self, key: K) -> float:
        """The shortest interval ``key`` may be polled at now."""
        return self._floor(self._slots[key])

    # -- the answers -----------------------------------------------------------------------
    def polled(
        self,
        key: K,
        now: float,
        *,
        progress: float | None = None,
        changed: bool = False,
        origin: float | None = None,
        cls: str | None = None,
    ) -> None:
        """A poll answered: still running. ``progress`` in percent if the provider says;
        ``changed`` if anything else moved (restarts a polling ladder); ``origin`` if the
        provider says when the job began running (Cognite's startTime, after its queue);
        ``cls`` if its answer names its class (``provider/type``: see ``_set_class``)."""
        i = self._slots[key]
        if origin is not None:
            self._origin[i] = min(origin, now)
        if cls is not None:
            self._set_class(i, cls)
        self._unseen[i] = 0
        self._seen[i] = self._lives[self._life[i]].alive(self._seen[i], now - self._origin[i])
        if progress is not None and progress != self._progress[i]:
            changed = True
            self._progress[i] = progress
        if self.ladder is not None:
            self._rung[i] = 0 if changed else min(self._rung[i] + 1, len(self.ladder) - 1)
        self._last[i] = now
        self._set_slope(i)
        self._push_waiting(i, now + self._floor(i))

    def finished(
        self,
        key: K,
        now: float,
        *,
        finished_at: float | None = None,
        origin: float | None = None,
        cls: str | None = None,
    ) -> None:
        """A poll saw the job end (success: its duration is learned). ``finished_at``: the
        provider's own end time, on this clock, if it gives one; ``origin`` and ``cls`` as
        for ``polled``."""
        i = self._slots.pop(key)
        if cls is not None:
            self._set_class(i, cls)
        if self._unseen[i] and (finished_at is None or origin is None):
            # Found finished at its first poll after a restart, and the provider does not
            # say when it ran: a guess would teach the table a duration nobody saw.
            self._lives[self._life[i]].withdrawn(self._seen[i])
            self._free_slot(i)
            return
        if origin is not None:
            self._origin[i] = min(origin, now)
        origin = self._origin[i]
        hi = now - origin
        life = self._lives[self._life[i]]
        if finished_at is None:  # somewhere since the last poll
            life.finished_within(self._seen[i], min(self._last[i] - origin, hi), hi)
        else:
            life.finished(self._seen[i], min(max(finished_at - origin, 0.0), hi))
        self._free_slot(i)

    def defer(self, key: K, until: float) -> None:
        """Not eligible before ``until`` (a failed poll's backoff, a closed gate)."""
        if not math.isfinite(until):
            raise ValueError(f"defer {key!r} until {until!r}: not a time")
        self._push_waiting(self._slots[key], until)

    # -- the choice ------------------------------------------------------------------------
    def pick(self, now: float) -> K | None:
        """The job a limiter token just granted at ``now`` should poll, or None if no job is
        eligible (or the polls' budget share is spent). The job is in flight until one of
        ``polled``, ``finished``, ``defer`` or ``remove`` is called for it."""
        bucket = self._bucket
        if bucket is not None and bucket.time_until(1, now) > 0:
            return None
        if not self._rate and not self._ready:
            return self._pick_unlimited(now)
        self._promote(now)
        ready, entries = self._ready, self._entry
        while ready:
            entry = heapq.heappop(ready)
            i = entry & _SLOT_MASK
            if entries[i] is not entry:
                continue  # stale: moved or removed since
            entries[i] = None
            self._after_pick()
            if bucket is not None:
                bucket.take(1, now)
            return self._keys[i]
        return None

    def _pick_unlimited(self, now: float) -> K | None:
        # No rate to share out: every eligible job is polled at once, so the one that became
        # eligible first goes first, straight from the floor's heap.
        i = self._pop_eligible(now)
        return None if i is None else self._keys[i]

    def next_eligible(self, now: float) -> float | None:
        """When ``pick`` could next return a job (``now`` if it can now), None if no job is
        waiting (all in flight, or none)."""
        self._promote(now)
        ready, waiting = self._ready, self._waiting
        while ready and self._stale(ready[0]):
            heapq.heappop(ready)
        while waiting and self._stale(waiting[0]):
            heapq.heappop(waiting)
        if ready:
            at = now
        elif waiting:
            at = self._at[waiting[0] & _SLOT_MASK]
        else:
            return None
        if self._bucket is not None:
            at = max(at, now + self._bucket.time_until(1, now))
        return at

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    # -- inside ----------------------------------------------------------------------------
    def _class_ix(self, cls: str) -> int:
        life = self.stats.life(cls)
        ix = self._life_ix.get(life)
        if ix is None:
            ix = self._life_ix[life] = len(self._lives)
            self._lives.append(life)  # DurationStats keeps at most 256: ix fits a byte
        return ix

    def _set_class(self, i: int, cls: str) -> None:
        # A job is added under its provider's class until an answer names its type; then
        # it moves to that type's table (counted there from its first bin; its provider's
        # table, the type's parent, already has it). Other moves are not made: a job's
        # class does not change.
        current = self._lives[self._life[i]]
        if current.parent is not None:
            return  # typed already (the usual case: every poll's answer names it again)
        life = self.stats.life(cls)
        if life.parent is current:
            life.adopt(self._seen[i])
            self._life[i] = self._class_ix(cls)

    def _new_slot(self, key: K, life: int, origin: float, last: float) -> int:
        if self._free:
            i = self._free.pop()
            self._keys[i] = key
            self._origin[i], self._last[i], self._progress[i] = origin, last, math.nan
            self._slope[i] = 0.0
            self._entry[i] = None
            self._rung[i] = self._seen[i] = self._unseen[i] = 0
            self._life[i] = life
        else:
            i = len(self._keys)
            if i > _SLOT_MASK:
                raise ValueError(f"more than {_SLOT_MASK + 1} jobs in one lane")
            self._keys.append(key)
            self._origin.append(origin)
            self._last.append(last)
            self._progress.append(math.nan)
            self._slope.append(0.0)
            self._at.append(0.0)
            self._entry.append(None)
            self._rung.append(0)
            self._seen.append(0)
            self._unseen.append(0)
            self._life.append(life)
        self._slots[key] = i
        return i

    def _free_slot(self, i: int) -> None:
        self._slope_sum -= self._slope[i]
        self._slope[i] = 0.0
        self._entry[i] = None
        self._keys[i] = None
        self._free.append(i)

    def _floor(self, i: int) -> float:
        if self.ladder is None:
            return self.floor_s
        return self.ladder[min(self._rung[i], len(self.ladder) - 1)]

    def _stale(self, entry: int) -> bool:
        return self._entry[entry & _SLOT_MASK] is not entry

    def _push_waiting(self, i: int, at: float) -> None:
        self._at[i] = at
        entry = self._entry[i] = int(at * 1e6) << _SLOT_BITS | i
        heapq.heappush(self._waiting, entry)
        self._compact()

    def _pop_eligible(self, now: float) -> int | None:
        """The slot of the waiting job eligible earliest, taken off its heap, if by ``now``."""
        waiting, entries = self._waiting, self._entry
        while waiting:
            entry = waiting[0]
            i = entry & _SLOT_MASK
            if entries[i] is not entry:
                heapq.heappop(waiting)  # stale: moved or removed since
                continue
            if self._at[i] > now:
                return None
            heapq.heappop(waiting)
            entries[i] = None
            return i
        return None

    def _promote(self, now: float) -> None:
        entries, ready = self._entry, self._ready
        while (i := self._pop_eligible(now)) is not None:
            entry = entries[i] = int(self._key_time(i) * 1e6) << _SLOT_BITS | i
            heapq.heappush(ready, entry)

    def _remaining(self, i: int) -> float | None:
        """Seconds left by the job's own progress report, if it gives one."""
        p = self._progress[i]  # NaN (none) fails the test below
        age = self._last[i] - self._origin[i]
        if 0 < p < 100 and age > 0:
            return max(age * (100 - p) / p, 1e-3)
        return None

    def _set_slope(self, i: int) -> None:
        if not self._rate:
            return  # no budget to share out: c is not needed
        remaining = self._remaining(i)
        if remaining is not None:
            slope = float(remaining**-self.stats.alpha)
        else:
            slope = self._lives[self._life[i]].slope(self._last[i] - self._origin[i])
        self._slope_sum += slope - self._slope[i]
        self._slope[i] = slope

    def _c_now(self) -> float:
        # The square-root law's constant: intervals c / hazard**alpha spend exactly the
        # rate when c = sum(hazard**alpha) / rate (the Lagrange multiplier of "minimise the
        # mean delay for R polls a second"). Unlimited rate: the floor is all there is.
        if not self._rate:
            return self._c_min
        return max(self._slope_sum / self._rate, self._c_min)

    def _key_time(self, i: int) -> float:
        last = self._last[i]
        if not self._rate:
            # No rate limit: every eligible job is polled at once, so the order is only a
            # tie-break, and the longest-unpolled first is the cheapest.
            return last
        remaining = self._remaining(i)
        c = self._c_now()
        if remaining is not None:
            key = last + c * float(remaining**self.stats.alpha)
            stretch = self.stretch_progress
        else:
            life = self._lives[self._life[i]]
            if not life.learned:
                # Nothing learned yet: every job alike, round robin. Keyed at its last poll
                # (not a cycle later), so that it is not put behind the jobs keyed once
                # finishes were learned: a batch keyed before its first finish does not
                # wait behind every re-poll.
                return last
            # The square-root law's time, but never past the moment the job has more likely
            # finished than not since it was last seen: when the budget is short (c large),
            # a job that has probably finished goes before one that probably has not,
            # instead of both waiting out a round-robin pass.
            origin = self._origin[i]
            key = origin + life.due(last - origin, c)
            stretch = self.stretch
        # No job waits much longer than round robin would make it: the hazard moves polls
        # earlier for the likely-finished, it never parks the unlikely for good.
        cycle = max(self.floor_s, len(self._slots) / self._rate)
        return min(key, last + stretch * cycle)

    def _after_pick(self) -> None:
        # Keys already in the heap were made with an older c; once c has moved by more
        # than a factor 2, and only after about as many picks as there are ready jobs,
        # they are all made again.
        self._c = self._c_now()
        self._picks_since_rekey += 1
        if self._picks_since_rekey >= len(self._ready) and abs(
            math.log(self._c / self._c_at_rekey)
        ) > math.log(2):
            self._rekey()

    def _rekey(self) -> None:
        """Recompute every ready job's key with today's ``c`` and tables (O(n), done only
        after about n picks, so O(1) per pick)."""
        entries = self._entry
        fresh: list[int] = []
        for entry in self._ready:
            if self._stale(entry):
                continue
            i = entry & _SLOT_MASK
            new = entries[i] = int(self._key_time(i) * 1e6) << _SLOT_BITS | i
            fresh.append(new)
        heapq.heapify(fresh)
        self._ready = fresh
        self._slope_sum = math.fsum(self._slope)  # no float drift (free slots hold 0)
        self._c_at_rekey = self._c
        self._picks_since_rekey = 0

    def _compact(self) -> None:
        # Stale entries (a job deferred or removed while it waited) are dropped when they
        # surface; rebuild when they outnumber the live ones, so memory stays O(jobs).
        total = len(self._waiting) + len(self._ready)
        if total > 2 * len(self._slots) + 1024:
            self._waiting = [e for e in self._waiting if not self._stale(e)]
            heapq.heapify(self._waiting)
            self._ready = [e for e in self._ready if not self._stale(e)]
            heapq.heapify(self._ready)
