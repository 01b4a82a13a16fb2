"""How long a provider's jobs take, learned online: a life table per (provider, job type).

Pure: no I/O, time passed in. Each class of jobs keeps two counts per age bin, on fixed
log-spaced bins (4 per octave, 1 s to 2**22 s, about 48 days; under 1 s is one bin):

- ``reached[b]``: jobs seen alive at (or finishing at) an age of at least the bin's start;
- ``events[b]``: jobs that finished inside the bin.

``events / reached`` is the chance that a job that got this old finishes within the bin, the
life-table (actuarial) estimate of the hazard. Unlike a plain histogram of finished durations
it is not fooled by the jobs still running: a batch whose short jobs finished first does not
look short, because its long jobs are still counted as at risk. Jobs that are inside a bin
right now count half, the life table's usual correction for withdrawals.

A class costs two fixed arrays whatever the number of jobs, counts are halved once they grow
large (so old behaviour fades), and the number of classes is capped; ``to_bytes`` /
``from_bytes`` keep the tables in the store across restarts.

Several processes (replicas) learn at once and share one stored document. Each keeps, beside
its tables, the counts it last saw stored (its *base*); what it learned since is ``pending``
(tables minus base). A save folds only that into what is stored now, in one transaction
(``merge``), and the process then takes the merged tables as its own and as its new base
(``adopt``). So every replica's samples add up instead of the last writer's winning, the store
keeps one bounded document, and a crash between saves loses at most what was pending: nothing
saved is ever counted twice.

Classes are named ``provider`` or ``provider/type`` (the type as the adapter names it from a
poll's answer: Bentley's job type, Modzy's model and version, Playment's workflow). What a
typed class learns is learned by its provider's table too, and where the typed class has
seen too few jobs at an age (a new model, a rare job type) its hazard there is the
provider's: a type gets its own timing only where it has the samples for it.

What the scheduler reads is ``G(age) = integral of hazard(u) ** alpha du``, the *cumulative
root hazard*: a job last seen alive at age ``a`` is due when ``G`` has grown by the lane's
constant ``c`` since ``a``. With ``alpha = 1/2`` this is the square-root law for polling
(intervals proportional to ``1 / sqrt(hazard)``, which minimises the mean detection delay
for a given number of polls); while nothing is known the hazard is flat and every job gets
the same interval: round robin. ``halving`` reads the plain cumulative hazard: the age by
which a job seen running at ``a`` has more likely finished than not.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

__all__ = [
    "BINS",
    "EDGES",
    "MAX_CLASSES",
    "Counts",
    "DurationStats",
    "Life",
    "Pending",
    "bin_of",
    "merge",
]

BINS_PER_OCTAVE = 4
OCTAVES = 22
#: bin b covers [EDGES[b], EDGES[b + 1]); the last bin is open-ended
EDGES: tuple[float, ...] = (
    0.0,
    *(2.0 ** (k / BINS_PER_OCTAVE) for k in range(OCTAVES * BINS_PER_OCTAVE + 1)),
)
BINS = len(EDGES)
#: width used for the open-ended last bin's hazard rate
_WIDTHS: tuple[float, ...] = tuple(
    (EDGES[b + 1] - EDGES[b]) if b + 1 < BINS else EDGES[b] for b in range(BINS)
)
#: distinct job classes kept; later ones share one table (a job type per job must not grow
#: memory without bound)
MAX_CLASSES = 256
OVERFLOW_CLASS = "*"
#: a bin's hazard is trusted once this many jobs were at risk in it
MIN_AT_RISK = 8.0
#: counts are halved when this many jobs have been seen, so memory of the past fades
HALVE_AT = float(2**20)
#: hazard (1/s) of a bin where jobs were at risk and none finished: small, never zero, so
#: the cumulative hazard keeps growing and every job is polled again eventually
MIN_HAZARD = 1e-7
_LN2 = math.log(2)
FORMAT = "harvester-durations"
VERSION = 1


def bin_of(age: float) -> int:
    """The bin an age (seconds) falls in."""
    if not age >= 1.0:  # also NaN
        return 0
    if math.isinf(age):
        return BINS - 1
    b = min(1 + int(BINS_PER_OCTAVE * math.log2(age)), BINS - 1)
    # log2 rounding at an edge: settle on the bin whose range holds the age
    if age < EDGES[b]:
        b -= 1
    elif b + 1 < BINS and age >= EDGES[b + 1]:
        b += 1
    return b


class Life:
    """One class's life table and, rebuilt lazily, its cumulative root hazard."""

    __slots__ = (
        "_g_edges",
        "_h_edges",
        "_learned",
        "_parent_mark",
        "_rates",
        "_slopes",
        "_updates",
        "alpha",
        "events",
        "halvings",
        "inside",
        "parent",
        "prior",
        "reached",
    )

    def __init__(self, *, alpha: float, prior: float, parent: Life | None = None) -> None:
        self.alpha = alpha
        self.prior = prior  #: hazard (1/s) assumed where nothing is known yet
        #: the provider's table, for a typed class: it learns everything this one does, and
        #: stands in at the ages where this one has too few jobs
        self.parent = parent
        self._parent_mark = 0.0  #: the parent's job count when the slopes were last built
        self.events = [0.0] * BINS
        self.reached = [0.0] * BINS
        #: how many times the counts were halved (a save scales its base to match)
        self.halvings = 0
        #: tracked jobs whose last sighting is in each bin (not stored: they are live)
        self.inside = [0] * BINS
        self._slopes: list[float] = []
        self._g_edges: list[float] = []
        self._learned = False  #: the last build had finished jobs to go on (not the prior)
        self._rates: list[float] = []  #: the hazard per bin, as last built
        self._h_edges: list[float] = []  #: the cumulative hazard at each bin's start
        self._updates = 0

    # -- learning ----------------------------------------------------------------------
    def alive(self, seen: int, age: float) -> int:
        """A job counted up to bin ``seen - 1`` was alive at ``age``; returns its new ``seen``."""
        upto = bin_of(age) + 1
        if upto > seen:
            self._reach(seen, upto)
            self._move(seen, upto)
            if self.parent is not None:
                self.parent.alive(seen, age)
            return upto
        return seen

    def finished(self, seen: int, duration: float) -> None:
        """A job counted up to bin ``seen - 1`` finished after ``duration`` seconds."""
        b = bin_of(duration)
        if b + 1 > seen:
            self._reach(seen, b + 1)
        self.events[b] += 1.0
        self._move(seen, 0)
        self._updates += 1
        if self.parent is not None:
            self.parent.finished(seen, duration)

    def finished_within(self, seen: int, lo: float, hi: float) -> None:
        """A job counted up to bin ``seen - 1`` was last seen running at age ``lo`` and
        seen finished at ``hi``: it ended somewhere between (the provider does not say when).

        Within a bin or two the middle is close enough. A wider interval (a job not polled
        for long: a starved budget, a restart) is shared out over the bins it spans as this
        table says a job alive at ``lo`` ends by ``hi`` (one step of the self-consistent
        estimate for interval-censored durations). Put at the middle instead, a finish seen
        an hour late would teach that jobs end half an hour after their last poll, and the
        scheduler would spend polls on jobs that two-mode durations make unlikely to end."""
        b_lo, b_hi = bin_of(lo), bin_of(hi)
        if b_hi - b_lo <= 1:
            self.finished(seen, (lo + hi) / 2)
            return
        self._built()
        s_lo, s_hi = self._survival(lo), self._survival(hi)
        mass = s_lo - s_hi
        if not mass > 1e-12 * s_lo:
            self.finished(seen, (lo + hi) / 2)  # the table says it cannot: no shape to use
            return
        if b_lo + 1 > seen:
            self._reach(seen, b_lo + 1)
        reached, events = self.reached, self.events
        for b in range(b_lo, b_hi + 1):
            start = max(lo, EDGES[b])
            end = min(hi, EDGES[b + 1]) if b + 1 < BINS else hi
            if b > b_lo:
                reached[b] += (self._survival(start) - s_hi) / mass  # alive when it began
            events[b] += (self._survival(start) - self._survival(end)) / mass
        self._move(seen, 0)
        self._updates += 1
        if self.parent is not None:
            self.parent.finished_within(seen, lo, hi)

    def _survival(self, age: float) -> float:
        # from the table as last built (``_built``)
        b = bin_of(age)
        return math.exp(-(self._h_edges[b] + self._rates[b] * (age - EDGES[b])))

    def withdrawn(self, seen: int) -> None:
        """A job stopped being tracked without finishing (failed, cancelled, dropped)."""
        self._move(seen, 0)
        if self.parent is not None:
            self.parent.withdrawn(seen)

    def adopt(self, seen: int) -> None:
        """A job of the parent's, counted there up to bin ``seen - 1``, turns out to be of
        this class (its first answer named its type): counted here too, not twice there."""
        if seen > 0:
            self._reach(0, seen)
            self._move(0, seen)

    def _reach(self, lo: int, hi: int) -> None:
        reached = self.reached
        for b in range(lo, hi):
            reached[b] += 1.0
        self._updates += 1
        if reached[0] >= HALVE_AT:
            self.events = [x / 2 for x in self.events]
            self.reached = [x / 2 for x in self.reached]
            self.halvings += 1

    def _move(self, seen: int, upto: int) -> None:
        inside = self.inside
        if seen > 0 and inside[seen - 1] > 0:
            inside[seen - 1] -= 1
        if upto > 0:
            inside[upto - 1] += 1

    # -- reading -----------------------------------------------------------------------
    @property
    def learned(self) -> bool:
        """Are its hazards built from finished jobs (not the prior alone)?"""
        self._built()
        return self._learned

    @property
    def finished_count(self) -> float:
        return sum(self.events)

    def hazards(self) -> list[float]:
        """Hazard rate (1/s) per bin: learned where enough jobs were at risk; elsewhere the
        parent's (a typed class's provider), else beyond the oldest such bin the last
        learned rate carries on; the prior where nothing is known."""
        fallback = self.parent.hazards() if self.parent is not None else None
        if sum(self.events) == 0:
            # nothing learned: the provider's, or every age alike (round robin)
            return fallback if fallback is not None else [self.prior] * BINS
        out: list[float] = []
        last: float | None = None
        for b in range(BINS):
            at_risk = self.reached[b] - 0.5 * self.inside[b]
            if at_risk >= MIN_AT_RISK:
                h = min(self.events[b] / at_risk, 0.999)
                rate = max(-math.log1p(-h) / _WIDTHS[b], MIN_HAZARD)
                last = rate
            elif fallback is not None:
                rate = fallback[b]
            elif last is not None:
                rate = last
            else:
                rate = self.prior  # younger than anything learned (a class with no jobs yet)
            out.append(rate)
        return out

    def survival(self, age: float) -> float:
        """The chance a job of this class is still running at ``age`` (from the hazards)."""
        rates = self.hazards()
        total, b = 0.0, 0
        while b < BINS and EDGES[b] < age:
            hi = min(age, EDGES[b + 1]) if b + 1 < BINS else age
            total += rates[b] * (hi - EDGES[b])
            b += 1
        return math.exp(-total)

    def _built(self) -> tuple[list[float], list[float]]:
        # Rebuilt after a twentieth more observations than it has seen (at least 16): cheap
        # per poll, and fresh while the table is young. The parent's too, for a typed class
        # (it stands in where this one knows too little).
        parent = self.parent
        if (
            not self._slopes
            or self._updates >= max(16.0, 0.05 * self.reached[0])
            or (
                parent is not None
                and abs(parent.reached[0] - self._parent_mark)
                >= max(16.0, 0.05 * self._parent_mark)
            )
        ):
            if parent is not None:
                self._parent_mark = parent.reached[0]
            self._rates = self.hazards()
            self._learned = sum(self.events) > 0 or (parent is not None and parent.learned)
            self._slopes = [r**self.alpha for r in self._rates]
            self._g_edges = _cumulative(self._slopes)
            self._h_edges = _cumulative(self._rates)
            self._updates = 0
        return self._slopes, self._g_edges

    def g(self, age: float) -> float:
        """Cumulative root hazard up to ``age``."""
        slopes, edges = self._built()
        age = max(age, 0.0)
        b = bin_of(age)
        return edges[b] + slopes[b] * (age - EDGES[b])

    def advance(self, age: float, c: float) -> float:
        """The age at which the cumulative root hazard has grown by ``c`` since ``age``."""
        slopes, edges = self._built()
        return _advance(edges, slopes, max(age, 0.0), c)

    def halving(self, age: float) -> float:
        """The age by which a job seen running at ``age`` has finished more likely than not:
        where the cumulative hazard has grown by ln 2 (its survival halved) since ``age``."""
        self._built()
        return _advance(self._h_edges, self._rates, max(age, 0.0), _LN2)

    def due(self, age: float, c: float) -> float:
        """``min(advance(age, c), halving(age))``, in one go."""
        slopes, edges = self._built()
        age = max(age, 0.0)
        return min(_advance(edges, slopes, age, c), _advance(self._h_edges, self._rates, age, _LN2))

    def slope(self, age: float) -> float:
        """``hazard(age) ** alpha``: how fast ``g`` grows at ``age``."""
        return self._built()[0][bin_of(age)]

    def to_json(self) -> dict[str, list[float]]:
        return {"events": _rounded(self.events), "reached": _rounded(self.reached)}


def _cumulative(rates: list[float]) -> list[float]:
    """The integral of a per-bin rate at each bin's start."""
    out, acc = [], 0.0
    for b in range(BINS):
        out.append(acc)
        acc += rates[b] * _WIDTHS[b]
    return out


def _advance(edges: list[float], rates: list[float], age: float, c: float) -> float:
    """The age at which the integral of ``rates`` (``edges``: its value at each bin's
    start) has grown by ``c`` since ``age``."""
    b = bin_of(age)
    value = edges[b] + rates[b] * (age - EDGES[b]) + c
    if b + 1 >= BINS or value < edges[b + 1]:
        return EDGES[b] + (value - edges[b]) / rates[b]  # still inside the same bin
    b = bisect.bisect_right(edges, value, lo=b + 1) - 1
    return EDGES[b] + (value - edges[b]) / rates[b]


def _rounded(xs: list[float]) -> list[float]:
    return [round(x, 3) for x in xs]


class Counts(NamedTuple):
    """One class's counts at one moment, and how often its table had been halved by then."""

    events: tuple[float, ...]
    reached: tuple[float, ...]
    halvings: int


#: per class, the ``events`` and ``reached`` counts learned and not saved yet
Pending = dict[str, tuple[list[float], list[float]]]
_NONE = Counts((0.0,) * BINS, (0.0,) * BINS, 0)


def _gain(now: float, base: float) -> float:
    # Below a millionth of a job it is float error (stored values are rounded), not a sample:
    # left out, so a process that learned nothing writes nothing.
    d = now - base
    return d if d > 1e-6 else 0.0


def _added(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    return [x + y for x, y in zip(xs, ys, strict=True)]


def merge(
    stored: DurationStats, pending: Mapping[str, tuple[list[float], list[float]]]
) -> DurationStats:
    """``stored`` (what the store holds now) with ``pending`` (one process's unsaved counts)
    added: a new object, the inputs unchanged. Stays within MAX_CLASSES: a new typed class
    that does not fit is left out (its provider's table counts the same jobs), a new
    provider goes to the shared overflow table. A table grown past HALVE_AT is halved, as
    a process's own is, so the stored document stays bounded and old behaviour fades."""
    out = DurationStats(alpha=stored.alpha, prior=stored.prior)
    for name, life in stored.classes.items():
        copy = out.classes[name] = Life(alpha=out.alpha, prior=out.prior)
        copy.events, copy.reached = list(life.events), list(life.reached)
    for name in sorted(pending):
        events, reached = pending[name]
        target = out.classes.get(name)
        if target is None and len(out.classes) >= MAX_CLASSES - 1 and name != OVERFLOW_CLASS:
            if "/" in name:
                continue
            name = OVERFLOW_CLASS
            target = out.classes.get(name)
        if target is None:
            target = out.classes[name] = Life(alpha=out.alpha, prior=out.prior)
        target.events = _added(target.events, events)
        target.reached = _added(target.reached, reached)
        while target.reached[0] >= HALVE_AT:
            target.events = [x / 2 for x in target.events]
            target.reached = [x / 2 for x in target.reached]
    return out


class DurationStats:
    """The life tables of every job class one process knows."""

    __slots__ = ("_base", "alpha", "classes", "prior")

    def __init__(self, *, alpha: float = 0.5, prior: float = 1e-3) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if not (math.isfinite(prior) and prior > 0):
            raise ValueError(f"prior must be a hazard > 0 (1/s), got {prior!r}")
        self.alpha = alpha
        self.prior = prior
        self.classes: dict[str, Life] = {}
        #: per class, the counts as last saved or loaded (scaled to its halvings then)
        self._base: dict[str, Counts] = {}

    def life(self, cls: str) -> Life:
        """The table of ``cls`` (made on first use). ``provider/type`` is linked to the
        table of ``provider``; past MAX_CLASSES a new type shares its provider's table, and
        a new provider a shared one."""
        provider, typed, _ = cls.partition("/")
        parent = self.life(provider) if typed and cls != OVERFLOW_CLASS else None
        life = self.classes.get(cls)
        if life is None:
            if len(self.classes) >= MAX_CLASSES - 1 and cls != OVERFLOW_CLASS:
                return parent if parent is not None else self.life(OVERFLOW_CLASS)
            life = self.classes[cls] = Life(alpha=self.alpha, prior=self.prior, parent=parent)
        elif life.parent is not parent:
            life.parent = parent  # loaded from the store, or its provider's table replaced
            life._slopes = []
        return life

    # -- sharing the tables through the store ------------------------------------------
    def snapshot(self) -> dict[str, Counts]:
        """Every class's counts now: what a save folds in, and what ``adopt`` needs back."""
        return {
            name: Counts(tuple(life.events), tuple(life.reached), life.halvings)
            for name, life in self.classes.items()
        }

    def pending(self, snap: Mapping[str, Counts]) -> Pending:
        """What ``snap`` holds beyond the base: learned here and not saved yet (classes
        with nothing new are left out; empty: nothing to save)."""
        out: Pending = {}
        for name, now in snap.items():
            base = self._base.get(name, _NONE._replace(halvings=now.halvings))
            # halved since the base was taken: so was the base's share of the counts
            f = 0.5 ** (now.halvings - base.halvings)
            events = [_gain(x, b * f) for x, b in zip(now.events, base.events, strict=True)]
            reached = [_gain(x, b * f) for x, b in zip(now.reached, base.reached, strict=True)]
            if any(events) or any(reached):
                out[name] = (events, reached)
        return out

    def adopt(self, merged: DurationStats, snap: Mapping[str, Counts]) -> None:
        """Take ``merged`` (what the store holds once ``snap``'s pending counts are folded
        in, or simply what was loaded) as this process's tables and base, keeping what was
        learned here since ``snap`` was taken. The ``Life`` objects stay the same ones (the
        poll schedulers hold them); only their counts change."""
        for name, stored in merged.classes.items():
            life = self.life(name)
            if self.classes.get(name) is not life:
                continue  # past this process's cap: a shared table learns these jobs here
            then = snap.get(name, _NONE._replace(halvings=life.halvings))
            f = 0.5 ** (life.halvings - then.halvings)
            # now = merged + (what was learned since the snapshot), halvings since applied
            life.events = [
                max(0.0, x + (m - t) * f)
                for x, m, t in zip(life.events, stored.events, then.events, strict=True)
            ]
            life.reached = [
                max(0.0, x + (m - t) * f)
                for x, m, t in zip(life.reached, stored.reached, then.reached, strict=True)
            ]
            self._base[name] = Counts(
                tuple(m * f for m in stored.events),
                tuple(m * f for m in stored.reached),
                life.halvings,
            )
            life._slopes = []  # rebuilt from the new counts at the next read
        for name, then in snap.items():
            if name not in merged.classes:
                self._base[name] = then  # the store keeps no such table: not sent again

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "bins_per_octave": BINS_PER_OCTAVE,
            "octaves": OCTAVES,
            "classes": {k: v.to_json() for k, v in sorted(self.classes.items())},
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(
        cls, data: bytes, *, alpha: float = 0.5, prior: float = 1e-3, where: str = "stats"
    ) -> DurationStats:
        """Tables saved by ``to_bytes``; ValueError naming ``where`` and the field if not."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{where}: not JSON ({exc})") from None
        if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
            raise ValueError(f"{where}: not a {FORMAT} document")
        if doc.get("version") != VERSION:
            raise ValueError(f"{where}: version {doc.get('version')!r}, expected {VERSION}")
        if doc.get("bins_per_octave") != BINS_PER_OCTAVE or doc.get("octaves") != OCTAVES:
            raise ValueError(f"{where}: bins do not match ({BINS_PER_OCTAVE}/octave, {OCTAVES})")
        classes = doc.get("classes")
        if not isinstance(classes, Mapping) or len(classes) > MAX_CLASSES:
            raise ValueError(f"{where}: classes must be an object of at most {MAX_CLASSES}")
        out = cls(alpha=alpha, prior=prior)
        for name, table in classes.items():
            life = Life(alpha=alpha, prior=prior)
            for field in ("events", "reached"):
                values = table.get(field) if isinstance(table, Mapping) else None
                if (
                    not isinstance(values, list)
                    or len(values) != BINS
                    or not all(
                        isinstance(x, int | float)
                        and not isinstance(x, bool)
                        and math.isfinite(x)
                        and x >= 0
                        for x in values
                    )
                ):
                    raise ValueError(
                        f"{where}: classes.{name}.{field} must be {BINS} finite numbers >= 0"
                    )
                setattr(life, field, [float(x) for x in values])
            out.classes[str(name)] = life
        return out
