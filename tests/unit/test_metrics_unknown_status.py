"""``harvester_unknown_status_jobs_total``: counts jobs, and a provider cannot grow its series."""

from __future__ import annotations

from harvester.metrics import MAX_STATUS_LABEL, MAX_STATUS_LABELS, OTHER_STATUS, Metrics


def samples(m: Metrics) -> dict[tuple[str, str], float]:
    return {
        (s.labels["provider"], s.labels["status"]): s.value
        for metric in m.registry.collect()
        for s in metric.samples
        if s.name == "harvester_unknown_status_jobs_total"
    }


def test_jobs_are_counted_by_provider_and_raw_status() -> None:
    m = Metrics()
    for _ in range(3):
        m.count_unknown_status("playment", "in_review")
    m.count_unknown_status("cognite", "Paused")
    assert samples(m) == {("playment", "in_review"): 3.0, ("cognite", "Paused"): 1.0}
    assert b'harvester_unknown_status_jobs_total{provider="playment",status="in_review"} 3.0' in (
        m.render()
    )


def test_labels_are_bounded_in_number_and_length() -> None:
    m = Metrics()
    for i in range(MAX_STATUS_LABELS + 15):
        m.count_unknown_status("playment", f"s-{i}")
    m.count_unknown_status("playment", "s-0")  # one already labelled keeps its own series
    m.count_unknown_status("modzy", "x" * 500)
    got = samples(m)
    assert len([k for k in got if k[0] == "playment"]) == MAX_STATUS_LABELS + 1
    assert got[("playment", OTHER_STATUS)] == 15.0 and got[("playment", "s-0")] == 2.0
    assert got[("modzy", "x" * MAX_STATUS_LABEL)] == 1.0
