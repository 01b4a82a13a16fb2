"""The poll scheduler and its learned durations: pure, on hand-moved time."""

from __future__ import annotations

import math
import random

import pytest

from harvester import durations
from harvester.durations import BINS, MAX_CLASSES, DurationStats, bin_of
from harvester.pollsched import PollScheduler
from harvester.schedule import BENTLEY_LADDER


def _learned(durations: list[float], cls: str = "") -> DurationStats:
    """Tables that have seen these jobs run to the end, each polled every second."""
    stats = DurationStats()
    life = stats.life(cls)
    for d in durations:
        seen = 0
        for age in range(1, int(d)):
            seen = life.alive(seen, float(age))
        life.finished(seen, d)
    return stats


def _run(
    sched: PollScheduler[str],
    *,
    start: float,
    stop: float,
    rate: float,
    ends: dict[str, float] | None = None,
    progress: dict[str, float] | None = None,
) -> dict[str, list[float]]:
    """Offer a token every 1/rate s; poll what the scheduler picks; the times each job was
    polled. A job whose end has passed is reported finished."""
    polls: dict[str, list[float]] = {}
    for i in range(int((stop - start) * rate)):
        t = start + i / rate
        key = sched.pick(t)
        if key is not None:
            polls.setdefault(key, []).append(t)
            if ends is not None and ends.get(key, math.inf) <= t:
                sched.finished(key, t)
            else:
                sched.polled(key, t, progress=(progress or {}).get(key))
    return polls


def test_spare_budget_polls_every_job_at_its_floor() -> None:
    # 50 jobs at a 5 s floor want 10 polls/s; the budget is 1,000/s
    sched: PollScheduler[str] = PollScheduler(floor_s=5.0, rate_per_s=1000.0)
    for i in range(50):
        sched.add(f"j{i}", 0.0, last_poll=0.0)
    polls = _run(sched, start=0.0, stop=100.0, rate=1000.0)
    assert len(polls) == 50
    for times in polls.values():
        gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
        # never sooner than the floor, and no later than the tokens the others take first
        assert all(5.0 - 1e-9 <= g <= 5.0 + 50 / 1000 + 1e-9 for g in gaps), gaps
        assert len(times) >= 19


def test_nothing_learned_means_round_robin_longest_unpolled_first() -> None:
    sched: PollScheduler[str] = PollScheduler(floor_s=1.0, rate_per_s=1.0)
    for i, last in enumerate([30.0, 10.0, 20.0]):
        sched.add(f"j{i}", 40.0, origin=0.0, last_poll=last)
    assert [sched.pick(40.0), sched.pick(40.0), sched.pick(40.0)] == ["j1", "j2", "j0"]
    assert sched.pick(40.0) is None  # all three in flight


def test_saturated_budget_goes_to_the_job_most_likely_finished() -> None:
    # Learned: jobs of this class take 90-110 s. A job aged 95 is likely done; one aged 20
    # is certainly not, although it was polled longer ago.
    # 500 other jobs just polled: a round of everyone takes ~500 s at 1 poll/s.
    stats = _learned([90.0 + i % 21 for i in range(200)])
    sched: PollScheduler[str] = PollScheduler(floor_s=1.0, stats=stats, rate_per_s=1.0)
    plain: PollScheduler[str] = PollScheduler(floor_s=1.0, rate_per_s=1.0)
    for s in (sched, plain):
        for i in range(500):
            s.add(f"other{i}", 1000.0, origin=999.0, last_poll=999.5)
        s.add("old", 1000.0, origin=905.0, last_poll=995.0)
        s.add("young", 1000.0, origin=980.0, last_poll=990.0)
    assert sched.pick(1000.0) == "old"
    # with the same history but no tables, the longest-unpolled goes first
    assert plain.pick(1000.0) == "young"


def test_progress_brings_a_job_near_its_end_forward() -> None:
    # 500 jobs and 1 poll/s: a round of everyone takes ~500 s, and has for a while
    sched: PollScheduler[str] = PollScheduler(floor_s=1.0, rate_per_s=1.0)
    for i in range(500):
        sched.add(f"other{i}", 0.0, origin=0.0)
    _run(sched, start=0.0, stop=2000.0, rate=1.0)
    sched.add("slow", 2000.0, origin=1000.0, last_poll=1000.0)
    sched.add("fast", 2000.0, origin=1000.0, last_poll=1000.0)
    sched.polled("slow", 1100.0, progress=10.0)  # ~900 s to go
    sched.polled("fast", 1101.0, progress=95.0)  # ~5 s to go
    assert sched.pick(2000.0) == "fast"


def test_bentley_ladder_is_a_floor_whatever_the_budget() -> None:
    sched: PollScheduler[str] = PollScheduler(
        floor_s=15.0, ladder=BENTLEY_LADDER, rate_per_s=1000.0
    )
    sched.add("b", 0.0, last_poll=0.0)
    progress = {"b": 5.0}
    polls = _run(sched, start=0.0, stop=500.0, rate=1000.0, progress=progress)["b"]
    gaps = [round(b - a, 6) for a, b in zip([0.0, *polls], polls, strict=False)]
    # the first answer reports progress (a move: first rung again), then nothing moves
    assert gaps[:6] == [15.0, 15.0, 30.0, 60.0, 120.0, 120.0]
    # progress moves: back to the first rung
    sched.polled("b", 600.0, progress=40.0)
    assert sched.next_eligible(600.0) == 615.0
    assert sched.pick(614.999) is None
    assert sched.pick(615.0) == "b"


def test_the_ladder_holds_under_random_answers() -> None:
    rng = random.Random(7)
    sched: PollScheduler[int] = PollScheduler(floor_s=15.0, ladder=BENTLEY_LADDER, rate_per_s=50.0)
    last: dict[int, float] = {}
    rung: dict[int, float] = {}
    for k in range(200):
        sched.add(k, 0.0, last_poll=0.0)
        last[k], rung[k] = 0.0, 15.0
    t = 0.0
    while t < 3000.0:
        key = sched.pick(t)
        if key is not None:
            assert t - last[key] >= rung[key] - 1e-9, (key, t, last[key], rung[key])
            moved = rng.random() < 0.3
            sched.polled(key, t, changed=moved)
            last[key], rung[key] = t, sched.floor_of(key)
        t += 0.02


def test_budget_share_is_respected() -> None:
    sched: PollScheduler[int] = PollScheduler(
        floor_s=1.0, rate_per_s=100.0, burst=10, budget_share=0.25
    )
    for k in range(10_000):
        sched.add(k, 0.0)
    picked = 0
    t = 0.0
    for _ in range(10_000):  # the limiter offers 100 tokens/s for 100 s
        key = sched.pick(t)
        if key is not None:
            picked += 1
            sched.polled(key, t)
        t += 0.01
    assert picked <= 25 * 100 + 3  # the share's rate, plus its saved-up burst
    assert picked >= 25 * 100 - 1  # and the share is used
    assert sched.next_eligible(t) is not None


def test_defer_and_remove() -> None:
    sched: PollScheduler[str] = PollScheduler(floor_s=5.0)
    sched.add("a", 0.0)
    sched.add("b", 0.0)
    assert sched.pick(0.0) in ("a", "b")
    first = "a" if "a" not in [sched.pick(0.0)] else "b"
    sched.defer(first, 30.0)
    sched.remove("a" if first == "b" else "b")
    assert sched.next_eligible(1.0) == 30.0
    assert sched.pick(29.0) is None
    assert sched.pick(30.0) == first
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add(first, 31.0)


def test_the_life_table_is_not_fooled_by_jobs_still_running() -> None:
    # A batch with durations spread over 10-100 s, observed at t = 55: only the short half
    # has finished. A histogram of finished durations would say "jobs take ~30 s"; the
    # life table says only that half the jobs outlive 55 s.
    durations = [10.0 + 90.0 * i / 1000 for i in range(1000)]
    stats = DurationStats(alpha=1.0)
    sched: PollScheduler[int] = PollScheduler(floor_s=1.0, stats=stats)
    for k in range(len(durations)):
        sched.add(k, 0.0, origin=0.0, last_poll=0.0)
    t = 0.0
    while t < 55.0:
        t += 1.0
        while (k := sched.pick(t)) is not None:
            if durations[k] <= t:
                sched.finished(k, t, finished_at=durations[k])
            else:
                sched.polled(k, t)
    life = stats.life("")
    # G with alpha = 1 is the cumulative hazard: survival = exp(-G)
    survival_at_50 = math.exp(-life.g(50.0))
    assert survival_at_50 == pytest.approx(50 / 90, abs=0.05)


def test_stats_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durations, "HALVE_AT", 1000.0)
    stats = DurationStats()
    rng = random.Random(1)
    for i in range(300):
        life = stats.life(f"type-{i}")
        seen = life.alive(0, 10.0)
        life.finished(seen, rng.lognormvariate(5, 1))
    assert len(stats.classes) == MAX_CLASSES  # the rest share one table
    size_few = len(stats.to_bytes())
    big = stats.life("type-0")
    for _ in range(5000):
        big.finished(big.alive(0, 1.0), 1e6 * rng.random())
    assert all(len(x.events) == BINS and len(x.reached) == BINS for x in stats.classes.values())
    assert max(big.reached) < 1000  # halved as it grows
    assert len(stats.to_bytes()) < size_few * 1.1


def test_stats_round_trip_and_bad_input() -> None:
    stats = _learned([5.0 + i for i in range(60)], cls="playment/annotate")
    data = stats.to_bytes()
    back = DurationStats.from_bytes(data)
    assert back.to_bytes() == data
    a, b = stats.life("playment/annotate"), back.life("playment/annotate")
    for age in (0.5, 3.0, 20.0, 64.0, 1000.0):
        assert b.g(age) == pytest.approx(a.g(age), rel=1e-6)
        # advance() walks g forward: g grows by exactly c between the two ages
        later = a.advance(age, 0.05)
        assert later > age
        assert a.g(later) - a.g(age) == pytest.approx(0.05, rel=1e-6)
    # a job type's table comes with its provider's (which learns what the type does)
    assert set(back.classes) == {"playment", "playment/annotate"}
    broken = data.replace(b'"events":[', b'"events":[-1,', 1)
    with pytest.raises(ValueError, match=r"store meta: classes\.playment\.events"):
        DurationStats.from_bytes(broken, where="store meta")
    with pytest.raises(ValueError, match="not JSON"):
        DurationStats.from_bytes(b"{", where="x")


def test_bins_cover_their_ages() -> None:
    for age in [0.0, 0.99, 1.0, 1.19, 1.2, 2.0, 59.999, 60.0, 86400.0, 1e9, math.inf]:
        b = bin_of(age)
        assert 0 <= b < BINS
    assert bin_of(2.0) == bin_of(2.0000001) == 5
    assert bin_of(1.9999999) == 4


class _Counting(PollScheduler[int]):
    """Counts key computations: the per-job work a pick does."""

    calls = 0

    def _key_time(self, i: int) -> float:
        _Counting.calls += 1
        return super()._key_time(i)


def test_picking_stays_cheap_for_100k_jobs() -> None:
    """A pick costs O(log n): the same picks do about the same per-job work with 100,000
    jobs as with 1,000 (a scan per pick would multiply it by 100)."""
    counts = {}
    for n in (1_000, 100_000):
        sched = _Counting(floor_s=1.0, rate_per_s=10.0)
        for k in range(n):
            sched.add(k, 0.0, origin=0.0, last_poll=0.0)
        sched.next_eligible(2.0)  # every job becomes eligible once: n key computations
        _Counting.calls = 0
        for i in range(2_000):
            t = 2.0 + i * 0.1
            key = sched.pick(t)
            assert key is not None
            sched.polled(key, t)
        counts[n] = _Counting.calls
    assert counts[100_000] <= 2 * counts[1_000] + 100, counts


def test_jobs_resumed_at_a_restart_are_spread_over_one_floor_without_a_rate() -> None:
    sched: PollScheduler[str] = PollScheduler(floor_s=10.0)
    for i in range(5):
        sched.resume(f"j{i}", 100.0, index=i, total=5)
    assert sched.next_eligible(100.0) == 100.0
    eligible = []
    for t in [100.0 + x / 2 for x in range(40)]:
        while (key := sched.pick(t)) is not None:
            eligible.append((key, t))
    assert eligible == [(f"j{i}", 100.0 + 2.0 * i) for i in range(5)]
    with pytest.raises(ValueError):
        sched.resume("j9", 100.0, index=5, total=5)


def test_jobs_resumed_with_a_rate_are_eligible_at_once_for_the_limiter() -> None:
    sched: PollScheduler[str] = PollScheduler(floor_s=10.0, rate_per_s=2.0)
    for i in range(5):
        sched.resume(f"j{i}", 100.0, index=i, total=5)
    assert sorted(k for _ in range(5) if (k := sched.pick(100.0)) is not None) == [
        f"j{i}" for i in range(5)
    ]


def test_a_resumed_job_found_finished_at_its_first_poll_teaches_no_duration() -> None:
    stats = DurationStats()
    sched: PollScheduler[str] = PollScheduler(floor_s=1.0, stats=stats)
    for key in ("a", "b", "c"):
        sched.resume(key, 100.0, cls="p")
    assert {sched.pick(100.0) for _ in range(3)} == {"a", "b", "c"}
    sched.finished("a", 100.0, origin=40.0)  # when it ended is not known: nothing learned
    assert stats.life("p").finished_count == 0
    sched.finished("b", 100.0, origin=40.0, finished_at=70.0)  # the provider says: 30 s
    assert stats.life("p").finished_count == 1
    assert stats.life("p").events[bin_of(30.0)] == 1.0
    # seen running at its first poll, its age counted from its start: then it is learned
    sched.polled("c", 100.0, origin=40.0)
    assert sched.pick(101.0) == "c"
    sched.finished("c", 101.0)
    assert stats.life("p").finished_count == 2
    assert stats.life("p").events[bin_of(60.5)] == 1.0


def _ran(life: durations.Life, duration: float) -> None:
    """One job of ``life``'s class seen each second until it finished after ``duration``."""
    seen = 0
    for age in range(1, int(duration)):
        seen = life.alive(seen, float(age))
    life.finished(seen, duration)


def test_a_job_type_with_too_few_samples_is_timed_by_its_providers_table() -> None:
    stats = DurationStats()
    for i in range(200):
        _ran(stats.life("p/slow"), 90.0 + i % 21)
    provider, new = stats.life("p"), stats.life("p/new")
    assert provider.finished_count == 200  # what a type learns, its provider learns
    assert new.parent is provider
    assert new.hazards() == provider.hazards()  # nothing of its own yet
    for _ in range(3):
        _ran(new, 10.0)
    # 3 jobs are too few to trust: at every age the provider's (which counts them) stands in
    assert new.hazards() == provider.hazards()
    for _ in range(47):
        _ran(new, 10.0)
    # 50 are enough where they were at risk: the type's jobs are done by 12 s, the
    # provider's are mostly not (200 of its 250 run 90-110 s)
    assert new.survival(12.0) < 0.05
    assert provider.survival(12.0) > 0.5
    assert provider.finished_count == 250
    # an age the type never reached is timed by the provider's table
    b = bin_of(100.0)
    assert new.hazards()[b] == provider.hazards()[b]


def test_a_job_moves_to_its_type_when_an_answer_names_it() -> None:
    stats = DurationStats()
    sched: PollScheduler[str] = PollScheduler(floor_s=1.0, stats=stats)
    sched.add("a", 0.0, cls="p", last_poll=0.0)
    assert sched.pick(1.0) == "a"
    sched.polled("a", 5.0, cls="p/t")
    provider, typed = stats.life("p"), stats.life("p/t")
    assert provider.reached[: bin_of(5.0) + 1] == typed.reached[: bin_of(5.0) + 1]
    assert provider.reached[0] == 1.0  # counted once, not again when it moved
    assert sched.pick(6.0) == "a"
    sched.polled("a", 6.0, cls="p/u")  # a job's type does not change afterwards
    assert sched.pick(7.0) == "a"
    sched.finished("a", 7.0)
    assert typed.finished_count == provider.finished_count == 1
    assert stats.life("p/u").finished_count == 0
    assert sum(provider.inside) == sum(typed.inside) == 0


def test_past_the_cap_a_new_job_type_shares_its_providers_table() -> None:
    stats = DurationStats()
    for i in range(MAX_CLASSES + 10):
        stats.life(f"p/type-{i}")
    assert len(stats.classes) == MAX_CLASSES - 1
    assert stats.life("p/one-more") is stats.life("p")


def test_a_starved_budget_polls_the_probably_finished_before_the_probably_running() -> None:
    # Two modes: 80 % of the jobs take 150-210 s, 20 % 5,000-5,400 s. At 0.01 polls/s with
    # 500 other jobs a round takes ~50,000 s: every key would fall far out, past the short
    # mode. "fresh" was never polled since its create 400 s ago: 80 % likely done. "long"
    # was seen running at 600 s, past the short mode: almost surely one of the long ones,
    # nowhere near its end. Round robin (and the square-root law's time alone, which for
    # both falls in the long mode) would poll "long" first.
    stats = DurationStats()
    for d in [150.0 + i % 61 for i in range(80)] + [5000.0 + 20 * i for i in range(20)]:
        _ran(stats.life(""), d)
    sched: PollScheduler[str] = PollScheduler(floor_s=1.0, stats=stats, rate_per_s=0.01)
    for i in range(500):
        sched.add(f"other{i}", 1400.0, origin=1399.0, last_poll=1399.5)
    sched.add("long", 1400.0, origin=400.0, last_poll=1000.0)
    sched.add("fresh", 1400.0, origin=1000.0, last_poll=1000.0)
    assert sched.pick(1400.0) == "fresh"
    assert stats.life("").halving(0.0) < 220  # survival halves in the short mode
    assert stats.life("").halving(600.0) > 4000  # from past it, in the long mode


def test_jobs_keyed_before_anything_was_learned_do_not_wait_behind_those_keyed_after() -> None:
    # A batch keyed from the prior alone (every job alike: the longest-unpolled first),
    # then the class learns that jobs end at 2-4 s. "seen" was polled running at 1.2 s: its
    # key is made from what was learned; the batch, never polled and now surely finished,
    # must not wait behind it on keys made before anything was known.
    stats = DurationStats()
    sched: PollScheduler[str] = PollScheduler(floor_s=1.0, stats=stats, rate_per_s=1.0)
    for i in range(5):
        sched.add(f"n{i}", 0.0, origin=0.0, last_poll=0.0)
    assert sched.pick(1.0) == "n0"
    sched.add("seen", 1.0, origin=0.0, last_poll=1.2)
    for i in range(100):
        _ran(stats.life(""), 2.0 + i % 3)
    assert stats.life("").learned
    assert [sched.pick(2.5 + i) for i in range(4)] == ["n1", "n2", "n3", "n4"]
    assert sched.pick(6.5) == "seen"


def test_a_finish_seen_long_after_the_last_poll_is_learned_where_the_table_puts_it() -> None:
    # Jobs of this class end at 320-400 s (each seen every second). One more was seen
    # running at 300 s and, the budget starved, next polled at 3,000 s: finished. Its end
    # is somewhere in between; the table says where: by about 400 s, not at the middle
    # (1,650 s), which would teach that jobs run half an hour and keep long ones polled.
    stats = DurationStats()
    for i in range(100):
        _ran(stats.life(""), 320.0 + i % 81)
    life = stats.life("")
    before = list(life.events)
    sched: PollScheduler[str] = PollScheduler(floor_s=1.0, stats=stats, rate_per_s=1.0)
    sched.add("late", 1300.0, origin=1000.0, last_poll=1300.0)
    sched.finished("late", 4000.0)
    added = [a - b for a, b in zip(life.events, before, strict=True)]
    assert sum(added) == pytest.approx(1.0)
    assert sum(added[: bin_of(420.0) + 1]) > 0.99
    assert added[bin_of(1650.0)] < 1e-9
    # a finish seen within a bin or two of the last poll is put at the middle, as before
    sched.add("near", 4000.0, origin=3650.0, last_poll=4000.0)
    sched.finished("near", 4010.0)
    assert life.events[bin_of(355.0)] - before[bin_of(355.0)] - added[bin_of(355.0)] == 1.0
