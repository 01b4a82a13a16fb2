from __future__ import annotations

import random

import pytest

from harvester.schedule import BENTLEY_LADDER, DueQueue, PollPolicy

# -- PollPolicy -----------------------------------------------------------------------------


def unchanged_walk(p: PollPolicy, rng: random.Random, polls: int = 6) -> list[float]:
    """The first ``polls`` intervals of a job whose state never changes."""
    d = p.first(rng)
    walk = [d]
    for _ in range(polls - 1):
        d = p.next(d, changed=False, rng=rng)
        walk.append(d)
    return walk


def test_interval_grows_while_nothing_changes_and_caps() -> None:
    p = PollPolicy(min_s=10, max_s=60, factor=2.0, jitter=0.0)
    seen = unchanged_walk(p, random.Random(0))
    assert seen == [10.0, 20.0, 40.0, 60.0, 60.0, 60.0]


def test_interval_resets_on_change() -> None:
    p = PollPolicy(min_s=5, max_s=300, jitter=0.0)
    rng = random.Random(0)
    assert p.next(200.0, changed=True, rng=rng) == 5.0
    assert p.next(5.0, changed=False, rng=rng) == 7.5


def test_bentley_ladder_walks_and_restarts_on_change() -> None:
    p = PollPolicy(min_s=15, max_s=120, jitter=0.0, ladder=BENTLEY_LADDER)
    rng = random.Random(0)
    walk = unchanged_walk(p, rng)
    assert walk == [15.0, 30.0, 60.0, 120.0, 120.0, 120.0]
    assert p.next(120.0, changed=True, rng=rng) == 15.0
    assert p.next(15.0, changed=False, rng=rng) == 30.0


def test_ladder_walk_survives_jitter() -> None:
    p = PollPolicy(min_s=10, max_s=200, jitter=0.2, ladder=BENTLEY_LADDER)
    rng = random.Random(5)
    for _ in range(200):
        d = p.first(rng)
        for rung in (*BENTLEY_LADDER[1:], 120.0, 120.0):
            d = p.next(d, changed=False, rng=rng)
            # A rung is the provider's minimum wait: jitter only lengthens it.
            assert rung <= d <= rung * 1.2


def test_ladder_jitter_never_polls_before_a_rung() -> None:
    p = PollPolicy(min_s=1, max_s=1000, jitter=0.1, ladder=BENTLEY_LADDER)
    rng = random.Random(3)
    firsts = [p.first(rng) for _ in range(500)]
    restarts = [p.next(60.0, changed=True, rng=rng) for _ in range(500)]
    for d in (*firsts, *restarts):
        assert 15.0 <= d <= 16.5
    assert min(firsts) < 15.2 and max(firsts) > 16.3  # still jittered, upwards


def test_ladder_rungs_are_clamped_and_merged_rungs_do_not_stall() -> None:
    p = PollPolicy(min_s=20, max_s=100, jitter=0.0, ladder=BENTLEY_LADDER)
    assert p.ladder == (20.0, 30.0, 60.0, 100.0)
    q = PollPolicy(min_s=30, max_s=120, jitter=0.0, ladder=BENTLEY_LADDER)
    assert q.ladder == (30.0, 30.0, 60.0, 120.0)
    rng = random.Random(0)
    d = q.first(rng)
    walk = [d]
    for _ in range(3):
        d = q.next(d, changed=False, rng=rng)
        walk.append(d)
    assert walk == [30.0, 60.0, 120.0, 120.0]


def test_jitter_bounds_and_clamping() -> None:
    p = PollPolicy(min_s=10, max_s=100, factor=1.5, jitter=0.1)
    rng = random.Random(9)
    nexts = [p.next(20.0, changed=False, rng=rng) for _ in range(2000)]
    assert all(27.0 <= d <= 33.0 for d in nexts)
    assert min(nexts) < 28.0 and max(nexts) > 32.0  # actually jittered, both ways
    firsts = [p.first(rng) for _ in range(2000)]
    assert all(10.0 <= d <= 11.0 for d in firsts)  # never below min_s
    capped = [p.next(100.0, changed=False, rng=rng) for _ in range(2000)]
    assert all(d == 100.0 for d in capped)  # 150 +- 10% is still above max_s
    high = [p.next(95.0, changed=True, rng=rng) for _ in range(100)]
    assert all(10.0 <= d <= 11.0 for d in high)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_s": 0, "max_s": 10},
        {"min_s": 10, "max_s": 5},
        {"min_s": 1, "max_s": 5, "factor": 0.5},
        {"min_s": 1, "max_s": 5, "jitter": 1.0},
        {"min_s": 1, "max_s": 5, "jitter": -0.1},
        {"min_s": 1, "max_s": 5, "ladder": []},
        {"min_s": 1, "max_s": 5, "ladder": [1.0, -2.0]},
    ],
)
def test_policy_validates(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PollPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_repr() -> None:
    assert "ladder=(15.0, 30.0, 60.0, 120.0)" in repr(
        PollPolicy(min_s=15, max_s=120, ladder=BENTLEY_LADDER)
    )


# -- DueQueue -------------------------------------------------------------------------------


def test_pops_in_due_order_with_fifo_ties() -> None:
    q: DueQueue[str] = DueQueue()
    for key, due in [("c", 3.0), ("a", 1.0), ("b1", 2.0), ("b2", 2.0), ("b0", 2.0)]:
        q.schedule(key, due)
    assert len(q) == 5
    assert q.next_due() == 1.0
    assert q.pop_due(0.5, 10) == []
    assert q.pop_due(2.0, 10) == ["a", "b1", "b2", "b0"]
    assert q.pop_due(10.0, 10) == ["c"]
    assert len(q) == 0
    assert q.next_due() is None


def test_reschedule_moves_the_key() -> None:
    q: DueQueue[str] = DueQueue()
    q.schedule("x", 1.0)
    q.schedule("y", 2.0)
    q.schedule("x", 5.0)  # later
    assert len(q) == 2
    assert q.due_at("x") == 5.0
    assert q.pop_due(3.0, 10) == ["y"]
    q.schedule("x", 0.5)  # earlier again
    assert q.next_due() == 0.5
    assert q.pop_due(10.0, 10) == ["x"]
    assert q.pop_due(10.0, 10) == []


def test_discard_and_contains() -> None:
    q: DueQueue[int] = DueQueue()
    q.schedule(1, 1.0)
    q.schedule(2, 2.0)
    assert 1 in q
    q.discard(1)
    q.discard(1)
    q.discard(99)
    assert 1 not in q
    assert q.due_at(1) is None
    assert len(q) == 1
    assert q.next_due() == 2.0
    assert q.pop_due(5.0, 10) == [2]


def test_pop_limit() -> None:
    q: DueQueue[int] = DueQueue()
    for i in range(10):
        q.schedule(i, float(i))
    assert q.pop_due(100.0, 3) == [0, 1, 2]
    assert q.pop_due(100.0, 0) == []
    assert q.pop_due(4.0, 10) == [3, 4]
    assert len(q) == 5


def test_rejects_nan_due_time() -> None:
    q: DueQueue[str] = DueQueue()
    with pytest.raises(ValueError):
        q.schedule("x", float("nan"))


def test_unorderable_keys_are_fine() -> None:
    q: DueQueue[frozenset[int]] = DueQueue()
    q.schedule(frozenset({1}), 1.0)
    q.schedule(frozenset({2}), 1.0)
    assert q.pop_due(1.0, 5) == [frozenset({1}), frozenset({2})]


def test_stale_entries_are_compacted() -> None:
    q: DueQueue[int] = DueQueue()
    rng = random.Random(1)
    for _ in range(20):
        for k in range(5000):
            q.schedule(k, rng.uniform(0, 1000))
    assert len(q) == 5000
    assert len(q._heap) <= 2 * len(q) + 1025
    for k in range(4000):
        q.discard(k)
    assert len(q._heap) <= 2 * len(q) + 1025
    assert sorted(q.pop_due(1e9, 10_000)) == list(range(4000, 5000))


def test_hundred_thousand_keys_pop_in_order() -> None:
    """Correctness at scale; its speed is make bench's to measure, not a timed assertion
    (which failed on a loaded machine)."""
    rng = random.Random(42)
    q: DueQueue[str] = DueQueue()
    due: dict[str, float] = {}
    n = 100_000
    for i in range(n):
        due[f"job-{i}"] = rng.uniform(0.0, 10_000.0)
        q.schedule(f"job-{i}", due[f"job-{i}"])
    # Move a tenth and drop a tenth, as a lane does while polling.
    for i in range(0, n, 10):
        due[f"job-{i}"] = rng.uniform(0.0, 10_000.0)
        q.schedule(f"job-{i}", due[f"job-{i}"])
    for i in range(5, n, 10):
        q.discard(f"job-{i}")
        del due[f"job-{i}"]
    assert len(q) == len(due) == n - n // 10

    popped: list[str] = []
    now = 0.0
    while len(q):
        now += 37.0
        batch = q.pop_due(now, 500)
        assert all(due[k] <= now and k not in q for k in batch)
        popped.extend(batch)
        assert len(q) == len(due) - len(popped)
        nxt = q.next_due()
        assert nxt is None or len(batch) == 500 or nxt > now
    times = [due[k] for k in popped]
    assert times == sorted(times)
    assert sorted(popped) == sorted(due)


def test_pop_order_is_non_decreasing() -> None:
    rng = random.Random(7)
    q: DueQueue[int] = DueQueue()
    due: dict[int, float] = {}
    for i in range(20_000):
        due[i] = rng.uniform(0, 100)
        q.schedule(i, due[i])
    order = q.pop_due(1e9, 20_000)
    times = [due[k] for k in order]
    assert times == sorted(times)
    assert len(order) == 20_000
