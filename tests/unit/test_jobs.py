"""The job state machine, walked from its own table, and job keys as path components."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harvester.errors import IllegalTransition
from harvester.jobs import (
    ACTIVE,
    RESTARTS,
    TERMINAL,
    TRANSITIONS,
    Event,
    Job,
    JobState,
    apply,
    job_key,
    new_job,
    update,
)

LEGAL = [
    (state, event, target)
    for state, moves in TRANSITIONS.items()
    for event, target in moves.items()
]
ILLEGAL = [
    (state, event) for state in JobState for event in Event if event not in TRANSITIONS[state]
]

_SAFE = re.compile(r"[A-Za-z0-9._+-]+")


def job_in(state: JobState) -> Job:
    """A job already in ``state``, consistent with it (remote id, reason, output)."""
    return Job(
        provider="playment",
        key="scan-0001",
        reference_id="scan-0001",
        remote_id="r-1",
        state=state,
        created_at=100.0,
        updated_at=100.0,
        reason="earlier reason",
        version=3,
    )


def required_changes(event: Event) -> dict[str, Any]:
    if event in (Event.GIVE_UP, Event.PROVIDER_FAILED, Event.PROVIDER_CANCELLED):
        return {"reason": "because"}
    if event is Event.HARVESTED:
        return {"output": "playment/scan-0001"}
    return {}


def test_every_state_has_a_row_and_every_target_is_a_state() -> None:
    assert set(TRANSITIONS) == set(JobState)
    for moves in TRANSITIONS.values():
        assert set(moves.values()) <= set(JobState)


def test_terminal_and_active() -> None:
    assert {JobState.HARVESTED, JobState.FAILED, JobState.CANCELLED, JobState.ERROR} == TERMINAL
    assert set(JobState) - TERMINAL == ACTIVE
    assert all(job_in(s).terminal for s in TERMINAL)
    assert not any(job_in(s).terminal for s in ACTIVE)


def test_the_happy_path_is_in_the_table() -> None:
    path = [
        (Event.SUBMIT, JobState.SUBMITTING),
        (Event.ACCEPTED, JobState.RUNNING),
        (Event.COMPLETED, JobState.SUCCEEDED),
        (Event.HARVEST, JobState.HARVESTING),
        (Event.HARVESTED, JobState.HARVESTED),
    ]
    job = new_job("playment", reference_id="scan-0001", remote_id=None, now=1.0)
    for i, (event, target) in enumerate(path, start=1):
        job = apply(
            job, event, now=1.0 + i, remote_id=job.remote_id or "r-1", **required_changes(event)
        )
        assert job.state is target
        assert job.version == i


@pytest.mark.parametrize(("state", "event", "target"), LEGAL)
def test_legal_move(state: JobState, event: Event, target: JobState) -> None:
    job = job_in(state)
    moved = apply(job, event, now=200.0, **required_changes(event))
    assert moved.state is target
    assert moved.version == job.version + 1
    assert moved.updated_at == 200.0
    assert (moved.provider, moved.key, moved.created_at) == (job.provider, job.key, job.created_at)
    assert job.state is state  # frozen: the original is untouched


@pytest.mark.parametrize(("state", "event"), ILLEGAL)
def test_illegal_move(state: JobState, event: Event) -> None:
    job = job_in(state)
    before = dataclasses.replace(job)
    with pytest.raises(IllegalTransition) as caught:
        apply(job, event, now=200.0, **required_changes(event))
    assert job == before
    assert caught.value.state == state.value
    assert caught.value.event == event.value
    assert job.label in str(caught.value)


def test_terminal_states_have_no_way_out_but_a_users_retry() -> None:
    for state in TERMINAL:
        for event in set(Event) - RESTARTS:
            with pytest.raises(IllegalTransition):
                apply(job_in(state), event, now=1.0, reason="x")


def test_harvested_is_final_and_retries_leave_only_failures() -> None:
    assert not TRANSITIONS[JobState.HARVESTED]
    for state, moves in TRANSITIONS.items():
        for event in RESTARTS & set(moves):
            assert state in (JobState.FAILED, JobState.CANCELLED, JobState.ERROR), (state, event)


def test_a_user_cancel_ends_new_and_running_jobs_only() -> None:
    sources = {s for s, moves in TRANSITIONS.items() if Event.CANCEL in moves}
    assert sources == {JobState.NEW, JobState.RUNNING}
    with pytest.raises(ValueError, match="reason"):
        apply(job_in(JobState.RUNNING), Event.CANCEL, now=1.0, reason=None)


#: moves that must be given a field: into running, a remote id; a verdict, a reason
NEEDS_A_FIELD = [
    *[
        pytest.param(state, event, "remote_id", "r-9", id=f"remote_id-{event.name}")
        for state, event in [
            (JobState.NEW, Event.TRACK),
            (JobState.SUBMITTING, Event.ACCEPTED),
            (JobState.SUBMITTING, Event.FOUND_REMOTE),
        ]
    ],
    *[
        pytest.param(state, event, "reason", "quota", id=f"reason-{state.name}-{event.name}")
        for state, event in [
            (JobState.RUNNING, Event.PROVIDER_FAILED),
            (JobState.RUNNING, Event.PROVIDER_CANCELLED),
            *[(s, Event.GIVE_UP) for s in JobState if Event.GIVE_UP in TRANSITIONS[s]],
        ]
    ],
]


@pytest.mark.parametrize(("state", "event", "field", "value"), NEEDS_A_FIELD)
def test_moves_refuse_a_needed_field_missing_or_empty(
    state: JobState, event: Event, field: str, value: str
) -> None:
    job = dataclasses.replace(job_in(state), **{field: None})
    with pytest.raises(ValueError, match=field):
        apply(job, event, now=1.0)
    with pytest.raises(ValueError, match=field):
        apply(job, event, now=1.0, **{field: ""})
    assert getattr(apply(job, event, now=1.0, **{field: value}), field) == value


@pytest.mark.parametrize(
    "field", ["state", "version", "updated_at", "provider", "key", "created_at"]
)
def test_the_machine_owns_identity_and_bookkeeping(field: str) -> None:
    job = job_in(JobState.NEW)
    with pytest.raises(ValueError, match=field):
        apply(job, Event.SUBMIT, now=1.0, **{field: None})
    with pytest.raises(ValueError, match=field):
        update(job, now=1.0, **{field: None})


def test_update_keeps_the_state_and_bumps_the_version() -> None:
    job = job_in(JobState.RUNNING)
    changed = update(job, now=300.0, progress=42.0, remote_status="PROCESSING", due_at=330.0)
    assert changed.state is JobState.RUNNING
    assert (changed.version, changed.updated_at) == (job.version + 1, 300.0)
    assert (changed.progress, changed.remote_status, changed.due_at) == (42.0, "PROCESSING", 330.0)


def test_new_job() -> None:
    job = new_job("cognite", reference_id=None, remote_id="123", now=5.0)
    assert (job.key, job.state, job.version, job.created_at) == ("123", JobState.NEW, 0, 5.0)
    assert new_job("cognite", reference_id="ref", remote_id="123", now=5.0).key == "ref"
    with pytest.raises(ValueError):
        new_job("cognite", reference_id=None, remote_id=None, now=5.0)


# --- job keys ---------------------------------------------------------------------------------


def assert_safe_component(key: str) -> None:
    assert _SAFE.fullmatch(key), key
    assert "/" not in key and "\\" not in key
    assert key not in (".", "..")
    assert not key.startswith(".")
    assert 1 <= len(key) <= 120


@pytest.mark.parametrize(
    "name", ["scan-0001", "a", "A.b_c-9", "frame.000123", "x" * 120, "0", "-", "a..b"]
)
def test_safe_ids_stay_as_they_are(name: str) -> None:
    assert job_key(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "../../etc",
        "a/b",
        "a\\b",
        ".hidden",
        ".",
        "..",
        "...",
        " ",
        "/",
        "\x00",
        "\n",
        "scan 0001",
        "ünïcödé",
        "日本語のジョブ",
        "😀",
        "C:\\Windows",
        "x" * 121,
        "é" * 500,
        "/" * 1000,
    ],
)
def test_unsafe_ids_become_one_safe_component(name: str) -> None:
    key = job_key(name)
    assert_safe_component(key)
    assert key != name


def test_empty_id_is_refused() -> None:
    with pytest.raises(ValueError):
        job_key("")


def test_ids_that_sanitise_alike_get_different_keys() -> None:
    keys = {job_key(n) for n in ["a/b", "a\\b", "a b", "a_b", "a:b", "a/b/"]}
    assert len(keys) == 6


@given(st.text(min_size=1))
def test_any_id_gives_a_safe_component(name: str) -> None:
    assert_safe_component(job_key(name))


@given(st.text(min_size=1), st.text(min_size=1))
def test_distinct_ids_give_distinct_keys(a: str, b: str) -> None:
    if a != b:
        assert job_key(a) != job_key(b)


# A small alphabet of safe and unsafe characters makes ids that sanitise alike common.
_NEAR = st.text(alphabet="a_/. -é", min_size=1, max_size=8)


@given(_NEAR, _NEAR)
def test_near_identical_ids_give_distinct_keys(a: str, b: str) -> None:
    if a != b:
        assert job_key(a) != job_key(b)


def test_a_safe_id_cannot_impersonate_a_hashed_key() -> None:
    hashed = job_key("a/b")
    assert job_key(hashed) != hashed


@given(st.text(min_size=1))
def test_keys_are_stable(name: str) -> None:
    assert job_key(name) == job_key(name)


def test_harvested_needs_an_output_folder() -> None:
    with pytest.raises(ValueError, match="output folder"):
        apply(job_in(JobState.HARVESTING), Event.HARVESTED, now=1.0)
