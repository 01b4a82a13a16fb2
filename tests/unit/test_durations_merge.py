"""Sharing learned durations between processes (replicas): the merge arithmetic, pure.

Each process saves only what it learned since its last save (``pending``) into the stored
tables (``merge``), then takes the result as its own (``adopt``). Here "the store" is a
string passed around; ``tests/store`` and ``tests/replicas`` run the same on real databases.
"""

from __future__ import annotations

import pytest

from harvester import durations
from harvester.durations import BINS, MAX_CLASSES, OVERFLOW_CLASS, DurationStats, bin_of, merge


def _learn(stats: DurationStats, cls: str, *ds: float) -> None:
    """Jobs of ``cls`` that ran ``ds`` seconds each, seen alive at half their duration."""
    life = stats.life(cls)
    for d in ds:
        life.finished(life.alive(0, d / 2), d)


def _save(stats: DurationStats, stored: str | None) -> str:
    """One save as ``engine.learned`` does it, with the store's value in and out."""
    snap = stats.snapshot()
    base = DurationStats() if stored is None else DurationStats.from_bytes(stored.encode())
    merged = merge(base, stats.pending(snap))
    stats.adopt(merged, snap)
    return merged.to_bytes().decode()


def _load(stored: str) -> DurationStats:
    stats = DurationStats()
    stats.adopt(DurationStats.from_bytes(stored.encode()), stats.snapshot())
    return stats


def _finished(stored: str, cls: str = "playment") -> float:
    return DurationStats.from_bytes(stored.encode()).life(cls).finished_count


def test_merge_adds_counts_bin_by_bin_and_leaves_its_inputs_alone() -> None:
    stored = DurationStats()
    _learn(stored, "playment", 40.0, 40.0)
    _learn(stored, "bentley", 600.0)
    before = stored.to_bytes()
    pending = {"playment": ([0.0] * BINS, [0.0] * BINS), "modzy": ([0.0] * BINS, [0.0] * BINS)}
    pending["playment"][0][bin_of(40.0)] = 3.0
    pending["playment"][1][0] = 3.0
    pending["modzy"][0][bin_of(5.0)] = 1.0
    out = merge(stored, pending)
    assert stored.to_bytes() == before
    assert out.classes["playment"].events[bin_of(40.0)] == 2.0 + 3.0
    assert out.classes["playment"].reached[0] == 2.0 + 3.0
    assert out.classes["bentley"].events == stored.classes["bentley"].events
    assert out.classes["modzy"].finished_count == 1.0
    assert out.classes["playment"] is not stored.classes["playment"]


def test_two_replicas_samples_add_up_whichever_saves_last() -> None:
    a, b = DurationStats(), DurationStats()
    _learn(a, "playment", 40.0, 41.0, 42.0)  # a: 3 jobs
    _learn(b, "playment", 90.0, 91.0)  # b: 2 jobs
    _learn(b, "playment/wf", 90.0)  # and one of a type (also counted by its provider)
    stored = _save(a, None)
    stored = _save(b, stored)
    assert _finished(stored) == 3 + 2 + 1
    assert _finished(stored, "playment/wf") == 1
    # b now also knows a's jobs; a learns b's at its next save, with its own new ones
    assert b.life("playment").finished_count == 6
    _learn(a, "playment", 43.0)
    stored = _save(a, stored)
    assert _finished(stored) == 7 and a.life("playment").finished_count == 7
    assert a.life("playment/wf").parent is a.life("playment")
    # saving again with nothing new changes nothing, in the store or in either process
    assert a.pending(a.snapshot()) == {} and b.pending(b.snapshot()) == {}
    assert _save(a, stored) == stored
    assert _save(b, stored) == stored
    assert b.life("playment").finished_count == 7


def test_a_crash_between_saves_loses_only_the_unsaved_and_counts_nothing_twice() -> None:
    a = DurationStats()
    _learn(a, "playment", 40.0, 40.0)
    stored = _save(a, None)
    _learn(a, "playment", 40.0)  # learned, never saved: the process dies
    restarted = _load(stored)
    assert restarted.life("playment").finished_count == 2
    assert restarted.pending(restarted.snapshot()) == {}, "what was loaded is not pending"
    _learn(restarted, "playment", 50.0)
    stored = _save(restarted, stored)
    assert _finished(stored) == 3
    assert restarted.life("playment").reached[0] == 3


def test_what_is_learned_while_a_save_is_in_flight_is_kept_for_the_next() -> None:
    a, b = DurationStats(), DurationStats()
    _learn(b, "playment", 10.0, 10.0)
    stored = _save(b, None)
    _learn(a, "playment", 40.0)
    snap = a.snapshot()  # the save starts: this much goes to the store...
    merged = merge(DurationStats.from_bytes(stored.encode()), a.pending(snap))
    _learn(a, "playment", 80.0)  # ...while the event loop learns one more
    a.adopt(merged, snap)
    assert a.life("playment").finished_count == 2 + 1 + 1
    (events, _), *_ = a.pending(a.snapshot()).values()
    assert sum(events) == 1 and events[bin_of(80.0)] == 1  # only the one the store lacks
    assert _finished(_save(a, merged.to_bytes().decode())) == 4


def test_a_table_halved_between_saves_sends_its_increments_halved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(durations, "HALVE_AT", 16.0)
    a = DurationStats()
    _learn(a, "playment", *[40.0] * 10)
    stored = _save(a, None)
    _learn(a, "playment", *[40.0] * 10)
    life = a.life("playment")
    # the 16th job's sighting halved a's table (15 finished -> 7.5, reached 16 -> 8), then it
    # and 4 more finished
    assert life.halvings == 1 and (life.finished_count, life.reached[0]) == (12.5, 12.0)
    (events, reached), *_ = a.pending(a.snapshot()).values()
    # the base (10 saved) faded with the table, to 5: the rest is new
    assert (sum(events), reached[0]) == (12.5 - 5, 12.0 - 5)
    stored = _save(a, stored)
    # the stored table grew past 16 too (10 + 7.5 finished, 10 + 7 reached): halved like a
    # process's own, and the process takes that
    saved = DurationStats.from_bytes(stored.encode()).life("playment")
    assert (saved.finished_count, saved.reached[0]) == (17.5 / 2, 17.0 / 2)
    assert (life.finished_count, life.reached[0]) == (17.5 / 2, 17.0 / 2)
    assert a.pending(a.snapshot()) == {}


def test_the_stored_tables_stay_within_the_class_cap() -> None:
    stored = DurationStats()
    for i in range(MAX_CLASSES - 1):
        _learn(stored, f"p{i}", 10.0)
    mine = DurationStats()
    _learn(mine, "p0/new-type", 20.0)  # a new type: its provider (p0) counts it too
    _learn(mine, "newcomer", 30.0)  # a new provider: to the shared table
    out = merge(stored, mine.pending(mine.snapshot()))
    assert len(out.classes) == MAX_CLASSES
    assert "p0/new-type" not in out.classes and "newcomer" not in out.classes
    assert out.classes["p0"].finished_count == 2
    assert out.classes[OVERFLOW_CLASS].finished_count == 1
    DurationStats.from_bytes(out.to_bytes())  # still a valid document
    # and neither is sent again at the next save
    mine.adopt(out, mine.snapshot())
    assert mine.pending(mine.snapshot()) == {}
