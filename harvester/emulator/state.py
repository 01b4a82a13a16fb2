"""What the emulator saw and knows: the evidence tests assert on.

One ``EmulatorState`` per emulator, shared by every provider app, the storage host and the
``/_emulator`` endpoints (which only render it). Counters describe client behaviour (how many
creates, how many duplicates, which requests carried credentials where they must not); the
ground truth describes what a correct harvest must produce.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harvester.emulator import truth
from harvester.emulator.faults import FaultBook
from harvester.emulator.scenario import FaultSpec, Scenario
from harvester.emulator.tokens import TokenBook

StatsSource = Callable[[], dict[str, Any]]
# job key -> the JSON ground truth for it; KeyError when the provider never had that job.
TruthSource = Callable[[str], Any]


@dataclass(frozen=True, slots=True)
class RequestRecord:
    t: float  # time.monotonic() when the answer was decided
    provider: str
    method: str
    path: str  # never the query string: signed URLs carry signatures there
    status: int  # 0 when the connection was reset without an answer
    fault: str | None  # e.g. "429", or "slow+reset" when faults combined


@dataclass(frozen=True, slots=True)
class CredentialHit:
    t: float
    header: str  # the header's name only: its value is a secret
    path: str


@dataclass(slots=True)
class ProviderCounters:
    requests_by_endpoint: defaultdict[str, Counter[int]] = field(
        default_factory=lambda: defaultdict(Counter)
    )
    faults: Counter[str] = field(default_factory=Counter)
    creates: int = 0
    duplicate_creates: int = 0
    creates_by_reference: defaultdict[str, Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter)
    )
    extra: Counter[str] = field(default_factory=Counter)
    # Requests refused for their credentials, by reason ("missing", "expired", "revoked", ...).
    auth_refusals: Counter[str] = field(default_factory=Counter)
    #: requests being handled now, and the most at once (how parallel a client really is)
    in_flight: int = 0
    max_in_flight: int = 0

    def to_json(self) -> dict[str, Any]:
        by_status: Counter[int] = Counter()
        for statuses in self.requests_by_endpoint.values():
            by_status.update(statuses)
        return {
            "requests": sum(by_status.values()),
            "requests_by_status": {str(k): v for k, v in sorted(by_status.items())},
            "requests_by_endpoint": {
                ep: {str(k): v for k, v in sorted(c.items())}
                for ep, c in sorted(self.requests_by_endpoint.items())
            },
            "rate_limited": by_status[429],
            "faults": dict(self.faults),
            "creates": self.creates,
            "duplicate_creates": self.duplicate_creates,
            "creates_by_reference": {p: dict(c) for p, c in self.creates_by_reference.items()},
            "max_creates_per_reference": max(
                (n for c in self.creates_by_reference.values() for n in c.values()), default=0
            ),
            "auth_refusals": sum(self.auth_refusals.values()),
            "auth_refusals_by_reason": dict(sorted(self.auth_refusals.items())),
            "max_in_flight": self.max_in_flight,
            **self.extra,
        }


class EmulatorState:
    def __init__(self, scenario: Scenario, clock: Callable[[], float] = time.monotonic) -> None:
        self.scenario = scenario
        self.clock = clock
        self.faults = FaultBook(scenario.seed, clock)
        self._log: list[RequestRecord] = []
        self._providers: defaultdict[str, ProviderCounters] = defaultdict(ProviderCounters)
        self._credential_hits: list[CredentialHit] = []
        self._sources: dict[str, StatsSource] = {}
        self._truth: dict[str, TruthSource] = {}
        # Counters that exist (at 0) before anything happened, so a reader need not guess.
        self._declared: defaultdict[str, set[str]] = defaultdict(set)
        self.tokens = TokenBook(scenario.oauth.token_ttl_s, clock)
        # Secrets seen on provider APIs (API keys, bearer tokens, client secrets), so storage
        # can spot one sent under any header name. Memory only: never rendered anywhere.
        self._api_keys: set[str] = {
            *scenario.playment.valid_api_keys,
            *scenario.modzy.valid_api_keys,
            *(secret for _, secret in scenario.oauth.clients),
        }

    # -- recording (called by the apps) -------------------------------------------------

    def record_request(
        self,
        provider: str,
        method: str,
        path: str,
        endpoint: str,
        status: int,
        faults: tuple[str, ...] = (),
    ) -> None:
        fault = "+".join(faults) or None
        self._log.append(RequestRecord(self.clock(), provider, method, path, status, fault))
        counters = self._providers[provider]
        counters.requests_by_endpoint[f"{method} {endpoint}"][status] += 1
        counters.faults.update(faults)

    def request_started(self, provider: str) -> None:
        c = self._providers[provider]
        c.in_flight += 1
        c.max_in_flight = max(c.max_in_flight, c.in_flight)

    def request_ended(self, provider: str) -> None:
        c = self._providers[provider]
        c.in_flight = max(0, c.in_flight - 1)  # (a stats reset may come in between)

    def counters(self, provider: str) -> ProviderCounters:
        return self._providers[provider]

    def record_create(self, provider: str, project: str, reference_id: str, *, new: bool) -> None:
        c = self._providers[provider]
        c.creates_by_reference[project][reference_id] += 1
        if new:
            c.creates += 1
        else:
            c.duplicate_creates += 1

    def record_auth_refusal(self, provider: str, reason: str) -> None:
        self._providers[provider].auth_refusals[reason] += 1

    def declare_counters(self, provider: str, *names: str) -> None:
        self._declared[provider].update(names)

    def count(self, provider: str, name: str, n: int = 1) -> None:
        self._providers[provider].extra[name] += n

    def record_credential_hit(self, header: str, path: str) -> None:
        self._credential_hits.append(CredentialHit(self.clock(), header.lower(), path))

    def remember_api_key(self, key: str) -> None:
        self._api_keys.add(key)

    def is_api_key(self, value: str) -> bool:
        return value in self._api_keys

    def add_stats_source(self, provider: str, source: StatsSource) -> None:
        """``source()`` is merged into the provider's stats; it reports live facts (job
        table contents) that a stats reset must not clear."""
        self._sources[provider] = source

    def add_truth_source(self, provider: str, source: TruthSource) -> None:
        self._truth[provider] = source

    # -- introspection ------------------------------------------------------------------

    def add_fault(self, spec: FaultSpec) -> None:
        self.faults.add(spec)

    def stats(self) -> dict[str, Any]:
        providers = sorted(set(self._providers) | set(self._sources) | set(self._declared))
        out: dict[str, Any] = {}
        for name in providers:
            section = dict.fromkeys(sorted(self._declared[name]), 0)
            section.update(self._providers[name].to_json())
            if name in self._sources:
                section.update(self._sources[name]())
            out[name] = section
        hits = [{"t": h.t, "header": h.header, "path": h.path} for h in self._credential_hits]
        out.setdefault("storage", self._providers["storage"].to_json())["credential_hits"] = hits
        out["credential_hits"] = hits
        out["requests"] = len(self._log)
        return out

    def requests(self, since: int = 0) -> list[dict[str, Any]]:
        since = max(since, 0)
        return [
            {
                "i": i,
                "t": r.t,
                "provider": r.provider,
                "method": r.method,
                "path": r.path,
                "status": r.status,
                "fault": r.fault,
            }
            for i, r in enumerate(self._log[since:], start=since)
        ]

    def reset_stats(self) -> None:
        self._log.clear()
        self._providers.clear()
        self._credential_hits.clear()

    def job_truth(self, provider: str, key: str) -> Any:
        """The ground truth of one job; ``KeyError`` for an unknown provider or job."""
        return self._truth[provider](key)

    def truth_labels(
        self, provider: str, reference_id: str, frame_id: str, sensor_id: str | None = None
    ) -> truth.LabelArray:
        """The labels of a frame's mask; ``sensor_id`` for a frame with a mask per sensor."""
        if provider != "playment":
            raise KeyError(provider)
        p = self.scenario.playment
        frame = truth.sensor_frame(frame_id, sensor_id)
        n = truth.points_for_frame(self.scenario.seed, reference_id, frame, p.points_per_frame)
        return truth.frame_labels(self.scenario.seed, reference_id, frame, n, p.num_labels)
