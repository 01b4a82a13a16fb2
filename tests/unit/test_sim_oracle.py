"""The simulator's clairvoyant poller (bench/sim_schedule.py): latencies computed by hand."""

from __future__ import annotations

import importlib
import itertools
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def sim() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # the bench scripts import bench_common as a sibling
    try:
        return importlib.import_module("sim_schedule")
    finally:
        sys.path.remove(str(BENCH))


def jobs(sim: ModuleType, arrive: list[float], end: list[float]) -> object:
    return sim.Jobs(arrive, end, [1.0] * len(end))


def test_polls_each_job_once_earliest_end_first_at_the_rate(sim: ModuleType) -> None:
    # 1 req/s, floor 1 s. Three jobs end at 2 s, one at 10 s: polls at 2, 3, 4 and 10.
    sc = sim.Scenario("t", 4, "uniform", rate=1.0, floor=1.0)
    out = sim.oracle(sc, jobs(sim, [0.0] * 4, [2.0, 2.0, 2.0, 10.0]))
    assert sorted(out.latency) == pytest.approx([0.0, 0.0, 1.0, 2.0], abs=1e-5)
    assert out.polls == 4
    assert out.last_detect == pytest.approx(10.0)


def test_the_floor_holds_the_first_poll(sim: ModuleType) -> None:
    # Ends at 1 s and 3 s, floor 5 s after submission: both seen at 5 and 6 (1 req/s), in
    # end order: latencies 4 and 3.
    sc = sim.Scenario("t", 2, "uniform", rate=1.0, floor=5.0)
    out = sim.oracle(sc, jobs(sim, [0.0, 0.0], [1.0, 3.0]))
    assert out.latency == pytest.approx([4.0, 3.0], abs=1e-5)
    # Bentley's ladder: its first rung (15 s) is the floor
    ladder = sim.Scenario("t", 2, "uniform", rate=1.0, floor=5.0, ladder=True)
    assert sim.oracle(ladder, jobs(sim, [0.0, 0.0], [1.0, 3.0])).latency == pytest.approx(
        [14.0, 13.0], abs=1e-5
    )


def test_never_faster_than_the_budget(sim: ModuleType) -> None:
    sc = sim.Scenario("t", 300, "uniform", rate=4.0, floor=5.0, params=(5.0, 90.0), seed=7)
    js = sim.Jobs.make(sc)
    out = sim.oracle(sc, js)
    times = sorted(lat + e for lat, e in zip(out.latency, js.end, strict=True))
    assert out.polls == 300
    assert min(b - a for a, b in itertools.pairwise(times)) >= 1 / 4.0 - 1e-6
    assert all(lat >= 0 for lat in out.latency)
    schedule = sim.on_time(sim.releases(sc, js), js.end, 4.0, 50.0, 300)
    polled = sorted(t for t in schedule if t is not None)
    assert min(b - a for a, b in itertools.pairwise(polled)) >= 1 / 4.0 - 1e-9
    for t, r, e in zip(schedule, sim.releases(sc, js), js.end, strict=True):
        assert t is None or r <= t <= e + 50.0


def test_a_quantile_skips_the_hopeless(sim: ModuleType) -> None:
    # 1 req/s. A, B, C end at 1 s, D at 2 s. Earliest end first polls at 1, 2, 3, 4:
    # latencies 0, 1, 2, 2, so its p75 (the 3rd smallest) is 2. Skipping C to the back
    # (A at 1, B at 2, D at 3, C at 4: latencies 0, 1, 1, 3) gets three jobs in by 1 s.
    sc = sim.Scenario("t", 4, "uniform", rate=1.0, floor=0.5)
    js = jobs(sim, [0.0] * 4, [1.0, 1.0, 1.0, 2.0])
    assert sim.quantile(sorted(sim.oracle(sc, js).latency), 0.75) == pytest.approx(2.0)
    assert sim.least_quantile(sc, js, 0.75) == pytest.approx(1.0, rel=2e-3)
    assert sim.least_quantile(sc, js, 0.5) == 0.0  # A at 1, D at 2
    # issue 18's uniform-starved batch in small: 40 jobs at 4 req/s ending at 5.0, 5.1, ...
    # 8.9 s. p95 is the 38th: 38 polls from 5 s on, the last at 5 + 37/4 s at the earliest,
    # and the latest end is 8.9 s: 5.35 s, reached by leaving the two earliest ends late.
    sc = sim.Scenario("t", 40, "uniform", rate=4.0, floor=5.0)
    js = jobs(sim, [0.0] * 40, [5.0 + i / 10 for i in range(40)])
    assert sim.least_quantile(sc, js, 0.95) == pytest.approx(5.35, rel=2e-3)
    # earliest end first serves them in order: the 38th at 14.25 s ended at 8.7 s
    assert sim.quantile(sorted(sim.oracle(sc, js).latency), 0.95) == pytest.approx(5.55)
