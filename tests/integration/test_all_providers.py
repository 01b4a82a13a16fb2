"""Cognite, Bentley and Modzy (with Playment) over real HTTP against the emulator.

The emulator was written from PROVIDERS.md independently of the adapters, so these tests are
where a misunderstanding on either side shows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from harvester.config import Config, parse_config
from harvester.emulator.scenario import Scenario, parse_fault, parse_scenario
from harvester.emulator.server import Emulator
from harvester.engine import Engine
from harvester.fsutil import sha256_file
from harvester.jobs import UNSUCCESSFUL, Job, JobState
from harvester.logs import configure
from harvester.ratelimit import ProviderLimiter
from harvester.store.base import NewJob
from harvester.store.sqlite import SqliteStore
from harvester.summary import status_json

pytestmark = pytest.mark.anyio

SECRETS = {
    "IT_PK": "playment-key-MARKER-1",
    # Modzy keys are "<access key>.<secret>": the access key part is public (Modzy echoes it
    # as submittedByKey), the secret part must never be seen.
    "IT_MK": "modzyaccess.modzy-key-MARKER-2",
    "IT_CS": "cognite-secret-MARKER-3",
    "IT_BS": "bentley-secret-MARKER-4",
}
PAYLOADS: dict[str, dict[str, Any]] = {
    "playment": {
        "data": {"sensor_data": {"frames": [{"frame_id": "f-000"}]}},
        "work_flow_id": "wf",
    },
    "cognite": {"items": [{"fileId": 123}], "points": [{"x": 0.5, "y": 0.5, "label": 1}]},
    "bentley": {
        "type": "Segmentation2D",
        "iTwinId": "itwin-1",
        "specifications": {
            "inputs": {"photos": "rd-1"},
            "outputs": ["segmentation2D"],
            "options": {},
        },
    },
    "modzy": {
        "model": {"identifier": "ed542963de", "version": "1.0.1"},
        "input": {"type": "text", "sources": {"item-1": {"input.txt": "hello"}}},
    },
}


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


MARKERS = [v.split(".")[-1] for v in SECRETS.values()]


def scenario(**sections: Any) -> Scenario:
    doc: dict[str, Any] = {
        "seed": 11,
        "playment": {"job_duration_s": 0.3, "points_per_frame": [500, 800]},
        "cognite": {"job_duration_s": 0.3},
        "bentley": {
            "job_duration_s": 0.4,
            "list_page_size": 2,
            "parts_per_output": 3,
            "blob_bytes": 3000,
        },
        "modzy": {"job_duration_s": 0.3, "results_404_s": 0.3},
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return parse_scenario(doc)


def config(tmp_path: Path, emu: Emulator, **overrides: dict[str, Any]) -> Config:
    u = emu.urls
    common = {
        "rate_per_s": 0,
        "poll_min_s": 0.1,
        "poll_max_s": 0.5,
        "backoff_base_s": 0.1,
        "backoff_max_s": 1.0,
        "request_timeout_s": 5,
    }
    providers: dict[str, dict[str, Any]] = {
        "playment": {"base_url": u["playment"], "api_key_env": "IT_PK", "project_id": "p"},
        "cognite": {
            "base_url": u["cognite"],
            "project": "proj",
            "token_url": u["token"],
            "client_id": "cog",
            "client_secret_env": "IT_CS",
        },
        "bentley": {
            "base_url": u["bentley"],
            "token_url": u["token"],
            "client_id": "ben",
            "client_secret_env": "IT_BS",
        },
        "modzy": {"base_url": u["modzy"], "api_key_env": "IT_MK"},
    }
    for name in providers:
        providers[name] = {**common, **providers[name], **overrides.get(name, {})}
    doc = {"store": {"url": "sqlite://state.db"}, "output": {"dir": "out"}, "providers": providers}
    return parse_config(doc, source=tmp_path / "config.toml")


def jobs_for(provider: str, n: int) -> list[NewJob]:
    return [
        NewJob(provider, f"{provider}-{i}", f"{provider}-{i}", None, PAYLOADS[provider], "t")
        for i in range(n)
    ]


async def run(cfg: Config, jobs: list[NewJob], limit_s: float = 60) -> list[Job]:
    assert cfg.store.path is not None
    async with SqliteStore(cfg.store.path) as store:
        await store.add_jobs(jobs, now=0.0)
        with anyio.fail_after(limit_s):
            await Engine(cfg, store, providers=sorted({j.provider for j in jobs})).run()
        return await store.jobs()


def folder(cfg: Config, job: Job) -> Path:
    return cfg.output.dir / job.provider / job.key


def manifest_is_true(cfg: Config, job: Job) -> dict[str, Any]:
    path = folder(cfg, job)
    manifest: dict[str, Any] = json.loads((path / "MANIFEST.json").read_text())
    for rel, entry in manifest["files"].items():
        assert sha256_file(path / rel) == entry["sha256"], rel
    return manifest


async def test_all_four_providers_harvest_to_ground_truth(tmp_path: Path) -> None:
    log = io.StringIO()
    configure("debug", "json", stream=log)
    try:
        async with Emulator(scenario()) as emu:
            cfg = config(tmp_path, emu)
            jobs = [j for p in PAYLOADS for j in jobs_for(p, 3)]
            done = await run(cfg, jobs)
            assert [j.state for j in done] == [JobState.HARVESTED] * 12
            for job in done:
                manifest_is_true(cfg, job)
                assert job.remote_id is not None
                truth = (
                    emu.state.job_truth(job.provider, job.remote_id)
                    if job.provider != ("playment")
                    else None
                )
                out = folder(cfg, job)
                if job.provider == "cognite":
                    served = json.loads((out / "segments.json").read_text())
                    assert served["items"] == truth["items"]
                elif job.provider == "bentley":
                    blobs = truth["outputs"]["segmentation2D"]["blobs"]
                    assert len(blobs) == 4
                    for path, meta in blobs.items():
                        local = out / "outputs" / "segmentation2D" / path
                        assert sha256_file(local) == meta["sha256"], path
                elif job.provider == "modzy":
                    results = json.loads((out / "results.json").read_text())["results"]
                    assert {k: v["results.json"] for k, v in results.items()} == truth["results"]
            stats = emu.state.stats()
            for provider in PAYLOADS:
                assert stats[provider]["creates"] == 3, provider
            assert stats["credential_hits"] == []
    finally:
        configure("warning", "json")
    text = log.getvalue()
    assert '"job state"' in text
    for marker in MARKERS:
        assert marker not in text
    assert_no_marker_in_files(tmp_path)


def assert_no_marker_in_files(root: Path) -> None:
    """Every file harvester wrote (store, outputs, manifests) is free of every secret."""
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "MANIFEST.json" for p in files)
    for path in files:
        data = path.read_bytes()
        for marker in MARKERS:
            assert marker.encode() not in data, path


async def test_failed_jobs_carry_the_providers_reason(tmp_path: Path) -> None:
    sc = scenario(
        cognite={"failure_rate": 1.0}, bentley={"failure_rate": 1.0}, modzy={"failure_rate": 1.0}
    )
    async with Emulator(sc) as emu:
        cfg = config(tmp_path, emu)
        jobs = jobs_for("cognite", 1) + jobs_for("bentley", 1) + jobs_for("modzy", 1)
        done = {j.provider: j for j in await run(cfg, jobs)}
        for provider in ("cognite", "bentley", "modzy"):
            job = done[provider]
            assert job.state in UNSUCCESSFUL, (provider, job.state)
            assert job.reason, provider
            assert job.remote_id is not None
            truth = emu.state.job_truth(provider, job.remote_id)
            assert truth["outcome"] != "success", (provider, truth)
        cog = done["cognite"]
        assert cog.state == JobState.FAILED
        assert cog.reason is not None
        assert emu.state.job_truth("cognite", cog.remote_id or "")["errorMessage"] in cog.reason
        assert done["bentley"].state == JobState.FAILED
        # Modzy's job ends ERROR; the reason names its inputs' failures from the results.
        mod = done["modzy"]
        assert mod.state == JobState.FAILED and mod.reason is not None
        assert mod.reason.startswith("Modzy reports the job ERROR")
        failures = emu.state.job_truth("modzy", mod.remote_id or "")["failures"]
        assert failures and all(f"{item}: {text}" in mod.reason for item, text in failures.items())
        summary = status_json(
            {(j.provider, j.state): 1 for j in done.values()}, list(done.values())
        )
        reasons = {f["provider"]: f["reason"] for f in summary["failed"]}
        assert set(reasons) == {"cognite", "bentley", "modzy"} and all(reasons.values())


@dataclasses.dataclass
class GateLog:
    """What one provider's limiter did, in the order it did it: each admission (a request
    let through to be sent) at its time, and each gate closure at its time with the deadline
    it set; all on the limiter's own clock."""

    provider: str
    admitted: list[float] = dataclasses.field(default_factory=list)
    #: (closed at, deadline, admissions before it)
    closed: list[tuple[float, float, int]] = dataclasses.field(default_factory=list)

    def attach(self, monkeypatch: pytest.MonkeyPatch) -> None:
        log = self
        close_gate, slot = ProviderLimiter.close_gate, ProviderLimiter.slot

        def closing(self: ProviderLimiter, retry_after: float | None, **kw: Any) -> float:
            now = self._clock.monotonic()
            deadline = close_gate(self, retry_after, **kw)
            if self.name == log.provider:
                log.closed.append((now, deadline, len(log.admitted)))
            return deadline

        @contextlib.asynccontextmanager
        async def admitting(self: ProviderLimiter) -> AsyncIterator[None]:
            async with slot(self):
                # The same loop step as the admission (no await in between): in order.
                if self.name == log.provider:
                    log.admitted.append(self._clock.monotonic())
                yield

        monkeypatch.setattr(ProviderLimiter, "close_gate", closing)
        monkeypatch.setattr(ProviderLimiter, "slot", admitting)


async def test_bentley_retry_after_holds_every_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 429 with Retry-After closes the gate for every request until its deadline.

    Judged by harvester's own record, not by when requests reach the emulator: both run on
    one loop, so under load a request let through just before the 429 was read can reach
    the emulator well after it (which made the old arrival-time check flaky). The limiter's
    admissions and closures are recorded in the order they happen, on the clock the gate
    itself reads, so no tolerance is needed: an admission after a closure and before its
    deadline is a request sent while the gate was closed. The emulator's log ties the record
    to the wire: it saw exactly the admitted requests, and every 429 it sent closed the gate.
    """
    gates = GateLog("bentley")
    gates.attach(monkeypatch)
    async with Emulator(scenario(bentley={"job_duration_s": 1.0})) as emu:
        emu.state.add_fault(
            parse_fault(
                {
                    "kind": "429",
                    "provider": "bentley",
                    "retry_after_s": 1.0,
                    # the first two requests after 0.4 s, mid-run (the jobs last 1 s): a
                    # time window alone could fall between two polls and throttle nothing
                    "start_s": 0.4,
                    "count": 2,
                }
            )
        )
        cfg = config(tmp_path, emu, bentley={"max_concurrency": 8})
        done = await run(cfg, jobs_for("bentley", 6))
        assert [j.state for j in done] == [JobState.HARVESTED] * 6
        seen = emu.state.requests()
    api = [r for r in seen if r["provider"] == "bentley"]
    limited = [r for r in api if r["status"] == 429]
    assert len(limited) == len(gates.closed) == 2
    # Its token requests pass the same limiter (only Bentley has jobs here).
    assert len(gates.admitted) == len(api) + sum(r["provider"] == "token" for r in seen)
    first_closed, first_deadline, _ = gates.closed[0]
    # Retry-After: 1.0, whole (read before close_gate's own clock reading; the slack is the
    # float rounding of a sum at this clock's magnitude, a few ulps)
    assert first_deadline - first_closed >= 1.0 - 4 * math.ulp(first_deadline)
    deadline = -math.inf
    for closed_at, until, before in gates.closed:
        deadline = max(deadline, until)
        assert closed_at >= gates.admitted[before - 1]  # the record is in order
        # every request let through after this closure waited for the gate to open
        later = gates.admitted[before:]
        assert all(t >= deadline for t in later), [round(deadline - t, 3) for t in later]
    # ... and there were such requests: the jobs were finished after the gate reopened
    assert len(gates.admitted) > gates.closed[-1][2]


async def test_cognite_backs_off_without_retry_after(tmp_path: Path) -> None:
    async with Emulator(scenario()) as emu:
        emu.state.add_fault(
            parse_fault({"kind": "429", "provider": "cognite", "count": 4, "match": "/segment"})
        )
        # One request at a time, so every gap after a 429 is the gate's doing.
        cfg = config(
            tmp_path, emu, cognite={"max_concurrency": 1, "backoff_base_s": 0.5, "max_retries": 6}
        )
        done = await run(cfg, jobs_for("cognite", 2))
        assert [j.state for j in done] == [JobState.HARVESTED] * 2
        api = [r for r in emu.state.requests() if r["provider"] == "cognite"]
        assert sum(r["status"] == 429 for r in api) == 4
        for before, after in itertools.pairwise(api):
            if before["status"] == 429:
                # full jitter, but never the Cognite SDK's int()-truncated 0 s: >= base/10
                assert after["t"] - before["t"] >= 0.05 - 0.005, (before, after)
        assert len(api) < 40  # no hot loop


async def test_revoked_tokens_are_refreshed_without_losing_jobs(tmp_path: Path) -> None:
    async with Emulator(
        scenario(cognite={"job_duration_s": 1.5}, bentley={"job_duration_s": 1.5})
    ) as emu:
        cfg = config(tmp_path, emu)
        jobs = jobs_for("cognite", 2) + jobs_for("bentley", 2)

        def polled(provider: str) -> bool:
            return any(
                r["provider"] == provider and r["method"] == "GET" and r["status"] == 200
                for r in emu.state.requests()
            )

        async def revoke_soon() -> None:
            # Mid-run by condition, not by clock: both providers have tokens and are polling
            # (jobs last 1.5 s, so work remains after the revocation).
            with anyio.fail_after(20):
                # the emulator has no event to wait on: a bounded condition poll
                while not (polled("cognite") and polled("bentley")):  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            emu.state.tokens.revoke_all()

        async with anyio.create_task_group() as tg:
            tg.start_soon(revoke_soon)
            done = await run(cfg, jobs)
        assert [j.state for j in done] == [JobState.HARVESTED] * 4
        stats = emu.state.stats()
        assert stats["token"]["tokens_issued"] >= 4  # two first tokens, then fresh ones
        assert stats["cognite"]["auth_refusals"] + stats["bentley"]["auth_refusals"] >= 1
        assert stats["cognite"]["creates"] == 2 and stats["bentley"]["creates"] == 2


async def test_bad_client_secret_is_fatal_and_not_echoed(tmp_path: Path) -> None:
    sc = parse_scenario({"oauth": {"clients": {"cog": "the-right-secret"}}})
    async with Emulator(sc) as emu:
        cfg = config(tmp_path, emu)
        with pytest.raises(Exception) as info:
            await run(cfg, jobs_for("cognite", 1))
        text = str(info.value)
        assert "cognite" in text and SECRETS["IT_CS"] not in text
        assert emu.state.stats()["cognite"]["creates"] == 0


async def test_json_payload_bodies_are_what_the_emulator_validates(tmp_path: Path) -> None:
    """A bad payload slips past nothing: the provider's refusal becomes the job's reason."""
    async with Emulator(scenario()) as emu:
        cfg = config(tmp_path, emu)
        bad = dict(PAYLOADS["bentley"], type="NoSuchType")
        job = NewJob("bentley", "bad", "bad", None, bad, "t")
        with pytest.raises(Exception, match="type"):
            from harvester.providers import make_provider

            make_provider(cfg.providers["bentley"]).validate_payload(
                orjson.loads(orjson.dumps(bad))
            )
        assert job.payload is not None


@pytest.mark.parametrize("policy", ["fail", "resubmit"])
async def test_lost_create_answer_follows_on_lost_create(tmp_path: Path, policy: str) -> None:
    async with Emulator(scenario()) as emu:
        # The first Cognite create is processed, then its answer is lost; Cognite offers no
        # way to find that job again.
        emu.state.add_fault(
            parse_fault(
                {
                    "kind": "reset",
                    "provider": "cognite",
                    "when": "after",
                    "match": "/segment",
                    "count": 1,
                }
            )
        )
        cfg = config(tmp_path, emu, cognite={"on_lost_create": policy, "max_concurrency": 1})
        done = await run(cfg, jobs_for("cognite", 2))
        states = sorted(j.state for j in done)
        stats = emu.state.stats()["cognite"]
        if policy == "fail":
            assert states == [JobState.ERROR, JobState.HARVESTED]
            (lost,) = [j for j in done if j.state == JobState.ERROR]
            assert lost.reason is not None
            assert "was lost" in lost.reason and "on_lost_create" in lost.reason
            assert stats["creates"] == 2  # the lost one exists remotely; nothing was resent
        else:
            assert states == [JobState.HARVESTED, JobState.HARVESTED]
            assert stats["creates"] == 3  # the user chose a resend over a failed job


async def test_tokens_expiring_mid_run_are_refreshed_before_they_lapse(tmp_path: Path) -> None:
    sc = scenario(
        oauth={"token_ttl_s": 2}, cognite={"job_duration_s": 2.5}, bentley={"job_duration_s": 2.5}
    )
    async with Emulator(sc) as emu:
        cfg = config(tmp_path, emu)
        done = await run(cfg, jobs_for("cognite", 2) + jobs_for("bentley", 2))
        assert [j.state for j in done] == [JobState.HARVESTED] * 4
        stats = emu.state.stats()
        # 2 s tokens over a run of several seconds: refreshed (the margin is inside the
        # lifetime), and no request was refused for an expired token.
        assert stats["token"]["tokens_issued"] >= 4
        assert stats["cognite"]["auth_refusals"] == 0 and stats["bentley"]["auth_refusals"] == 0


async def test_a_503_on_create_is_a_refusal_and_the_job_is_sent_again(tmp_path: Path) -> None:
    async with Emulator(scenario()) as emu:
        emu.state.add_fault(
            parse_fault(
                {
                    "kind": "5xx",
                    "provider": "cognite",
                    "status": 503,
                    "match": "/segment",
                    "count": 2,
                }
            )
        )
        cfg = config(tmp_path, emu, cognite={"max_concurrency": 1})
        done = await run(cfg, jobs_for("cognite", 2))
        assert [j.state for j in done] == [JobState.HARVESTED] * 2
        stats = emu.state.stats()["cognite"]
        assert stats["faults"].get("5xx") == 2
        assert stats["creates"] == 2  # refused twice, made once each: no duplicate


@pytest.mark.parametrize("marked", [True, False])
async def test_a_create_cognite_marks_auto_retryable_is_sent_again(
    tmp_path: Path, marked: bool
) -> None:
    # A 500 on a create is ambiguous (it may have been made) unless Cognite marks the answer
    # "cdf-is-auto-retryable: true": then, as its SDKs do, the create is simply sent again.
    sc = scenario(cognite={"auto_retryable_statuses": [500] if marked else []})
    async with Emulator(sc) as emu:
        emu.state.add_fault(
            parse_fault(
                {
                    "kind": "5xx",
                    "provider": "cognite",
                    "status": 500,
                    "match": "/segment",
                    "count": 1,
                }
            )
        )
        cfg = config(tmp_path, emu, cognite={"max_concurrency": 1})
        (job,) = await run(cfg, jobs_for("cognite", 1))
        stats = emu.state.stats()["cognite"]
        assert stats["faults"].get("5xx") == 1
        if marked:
            assert job.state == JobState.HARVESTED and stats["creates"] == 1
        else:
            assert job.state == JobState.ERROR and stats["creates"] == 0
            assert job.reason is not None and "on_lost_create" in job.reason


async def test_results_never_published_end_in_error_after_results_wait(tmp_path: Path) -> None:
    # Modzy answers 404 for the results of a finished job for a while; here for ever.
    async with Emulator(scenario(modzy={"results_404_s": 1e6})) as emu:
        cfg = config(tmp_path, emu)
        cfg = dataclasses.replace(cfg, harvest=dataclasses.replace(cfg.harvest, results_wait_s=0.6))
        jobs = await run(cfg, jobs_for("modzy", 2), limit_s=30)
        asked = [
            r
            for r in emu.state.requests()
            if r["provider"] == "modzy" and "/api/results/" in r["path"]
        ]
    assert [j.state for j in jobs] == [JobState.ERROR, JobState.ERROR]
    for job in jobs:
        assert job.reason is not None
        assert "results still not published" in job.reason, job.reason
        assert "harvest.results_wait_s" in job.reason
    # Asked again at the poll cadence (poll_min_s 0.1), not once per 10 s.
    assert len(asked) >= 2 * 3
    assert {r["status"] for r in asked} == {404}
