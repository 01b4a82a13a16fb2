"""Scenario files: what the emulator does, as frozen data.

A scenario is TOML (see ``configs/scenarios/default.toml`` for every key). A missing file means
the defaults below. Unknown keys are errors that name the key, because a typo in a scenario
would otherwise silently test something else than intended.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from harvester.errors import ConfigError

RetryAfterFormat = Literal["seconds", "http-date", "none"]
FaultKind = Literal["429", "5xx", "reset", "truncate", "slow"]
ResultVariant = Literal["masks", "pcd"]
FaultWhen = Literal["before", "after"]

RETRY_AFTER_FORMATS: tuple[RetryAfterFormat, ...] = ("seconds", "http-date", "none")
FAULT_KINDS: tuple[FaultKind, ...] = ("429", "5xx", "reset", "truncate", "slow")
FAULT_PROVIDERS = ("playment", "storage", "cognite", "bentley", "modzy", "token")

_COMMON_FAULT_KEYS = {"kind", "provider", "start_s", "duration_s", "probability", "count", "match"}
_FAULT_KEYS_BY_KIND: dict[str, set[str]] = {
    "429": {"retry_after_s", "retry_after"},
    "5xx": {"status"},
    "reset": {"when"},
    "truncate": {"fraction"},
    "slow": {"delay_s"},
}


class ScenarioError(ConfigError):
    """The scenario file is unreadable or holds an unknown key or a bad value."""


@dataclass(frozen=True, slots=True)
class RateLimit:
    rate_per_s: float = 0.0  # 0 = unlimited
    burst: int = 0  # 0 = max(1, rate_per_s)
    retry_after: RetryAfterFormat = "seconds"


@dataclass(frozen=True, slots=True)
class PlaymentScenario:
    valid_api_keys: tuple[str, ...] = ()  # empty = any non-empty key
    job_duration_s: float = 2.0
    #: above job_duration_s: each job's duration is spread uniformly up to this, by job id
    job_duration_max_s: float | None = None
    statuses: tuple[str, ...] = ("created", "in_progress", "completed")
    points_per_frame: tuple[int, int] = (40_000, 40_000)  # inclusive range
    num_labels: int = 60
    mask_line_width: int = 80
    attachments_redirect_status: int = 302
    result_variant: ResultVariant = "masks"
    rate_limit: RateLimit = field(default_factory=RateLimit)


@dataclass(frozen=True, slots=True)
class OAuthScenario:
    # (client_id, client_secret) pairs; empty = any non-empty id and secret are accepted.
    clients: tuple[tuple[str, str], ...] = ()
    token_ttl_s: float = 3600.0
    rate_limit: RateLimit = field(default_factory=RateLimit)


@dataclass(frozen=True, slots=True)
class CogniteScenario:
    job_duration_s: float = 2.0
    failure_rate: float = 0.0
    # Empty = any token scope is accepted; else the bearer token must carry this scope.
    required_scope: str = ""
    # Empty = any (or no) cdf-version header; else segmentation calls must send exactly this.
    required_cdf_version: str = ""
    # Jobs Queued or Running at once per project; 0 = unlimited. Over it: 429 (concurrency).
    max_active_jobs: int = 0
    segments_per_item: tuple[int, int] = (1, 3)
    polygons_per_segment: tuple[int, int] = (1, 2)
    vertices_per_polygon: tuple[int, int] = (6, 24)
    # Files that do not exist: ints are ids, strings external ids (400 with "missing").
    missing_files: tuple[int | str, ...] = ()
    file_bytes: int = 4096
    # Error answers with these statuses (injected faults included) carry
    # ``cdf-is-auto-retryable: true``: Cognite's mark of a request safe to send again.
    auto_retryable_statuses: tuple[int, ...] = ()
    rate_limit: RateLimit = field(default_factory=lambda: RateLimit(retry_after="none"))


@dataclass(frozen=True, slots=True)
class BentleyScenario:
    job_duration_s: float = 2.0
    failure_rate: float = 0.0
    # How long a failing or cancelled job stays Terminating.
    terminating_s: float = 0.5
    progress_step: int = 10  # percent
    required_scope: str = "itwin-platform"
    parts_per_output: int = 3
    blob_bytes: int = 262_144
    list_page_size: int = 5000
    sas_ttl_s: float = 3600.0
    expire_first_n: int = 0
    corrupt_first_n: int = 0
    # GET /reality-analysis/jobs (a technology preview at Bentley): off = 404, as a tenant
    # without it answers, so clients must cope with a lookup they cannot make.
    job_listing: bool = True
    rate_limit: RateLimit = field(default_factory=RateLimit)


@dataclass(frozen=True, slots=True)
class ModzyScenario:
    valid_api_keys: tuple[str, ...] = ()  # empty = any non-empty key
    job_duration_s: float = 2.0
    results_404_s: float = 1.0
    failure_rate: float = 0.0
    timeout_rate: float = 0.0
    item_failure_rate: float = 0.0
    rate_limit: RateLimit = field(default_factory=lambda: RateLimit(retry_after="none"))


@dataclass(frozen=True, slots=True)
class StorageScenario:
    url_ttl_s: float = 300.0
    expire_first_n: int = 0
    chunk_size: int = 65_536
    #: bandwidth caps in bytes per second (0 = none): each answer's body on its own (a host
    #: that throttles every connection), and all bodies together (the link)
    connection_bytes_per_s: float = 0.0
    link_bytes_per_s: float = 0.0


@dataclass(frozen=True, slots=True)
class FaultSpec:
    kind: FaultKind
    provider: str = "playment"
    start_s: float = 0.0
    duration_s: float = math.inf
    probability: float = 1.0
    count: int | None = None  # None = unbounded
    match: str = ""  # only requests whose path contains this
    status: int = 503
    retry_after_s: float = 1.0
    retry_after: RetryAfterFormat = "seconds"
    fraction: float = 0.5
    delay_s: float = 1.0
    # "after": the request is processed, then the answer is lost (a create that happened
    # although the client never heard of it).
    when: FaultWhen = "before"

    def to_json(self) -> dict[str, Any]:
        keys = _COMMON_FAULT_KEYS | _FAULT_KEYS_BY_KIND[self.kind]
        out = {k: getattr(self, k) for k in sorted(keys)}
        if math.isinf(self.duration_s):
            out["duration_s"] = None  # JSON has no infinity
        return out


@dataclass(frozen=True, slots=True)
class Scenario:
    seed: int = 1
    playment: PlaymentScenario = field(default_factory=PlaymentScenario)
    cognite: CogniteScenario = field(default_factory=CogniteScenario)
    bentley: BentleyScenario = field(default_factory=BentleyScenario)
    modzy: ModzyScenario = field(default_factory=ModzyScenario)
    oauth: OAuthScenario = field(default_factory=OAuthScenario)
    storage: StorageScenario = field(default_factory=StorageScenario)
    faults: tuple[FaultSpec, ...] = ()


def load_scenario(path: str | Path | None) -> Scenario:
    if path is None:
        return Scenario()
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: invalid TOML: {exc}") from exc
    try:
        return parse_scenario(doc)
    except ScenarioError as exc:
        raise ScenarioError(f"{path}: {exc.message}") from exc


def parse_scenario(doc: Mapping[str, Any]) -> Scenario:
    t = _Table(doc, "")
    seed = t.get_int("seed", 1)
    playment = _parse_playment(t.table("playment"))
    cognite = _parse_cognite(t.table("cognite"))
    bentley = _parse_bentley(t.table("bentley"))
    modzy = _parse_modzy(t.table("modzy"))
    oauth = _parse_oauth(t.table("oauth"))
    storage = _parse_storage(t.table("storage"))
    faults_raw = t.get_list("faults", [])
    t.done()
    faults = tuple(
        parse_fault(_as_table(raw, f"faults[{i}]"), f"faults[{i}]")
        for i, raw in enumerate(faults_raw)
    )
    return Scenario(
        seed=seed,
        playment=playment,
        cognite=cognite,
        bentley=bentley,
        modzy=modzy,
        oauth=oauth,
        storage=storage,
        faults=faults,
    )


def parse_fault(doc: Mapping[str, Any], where: str = "fault") -> FaultSpec:
    t = _Table(doc, where)
    kind = t.choice("kind", FAULT_KINDS, None)
    allowed = _COMMON_FAULT_KEYS | _FAULT_KEYS_BY_KIND[kind]
    for key in doc:
        if key not in allowed:
            raise ScenarioError(f"unknown key {t.name(key)} (not used by kind {kind!r})")
    count = t.get_int("count", -1, minimum=0) if "count" in doc else None
    spec = FaultSpec(
        kind=kind,
        provider=t.choice("provider", FAULT_PROVIDERS, "playment"),
        start_s=t.get_float("start_s", 0.0, minimum=0.0),
        duration_s=t.get_float("duration_s", math.inf, minimum=0.0),
        probability=t.get_float("probability", 1.0, minimum=0.0, maximum=1.0),
        count=count,
        match=t.get_str("match", ""),
        status=t.get_int("status", 503, minimum=500, maximum=599),
        retry_after_s=t.get_float("retry_after_s", 1.0, minimum=0.0),
        retry_after=t.choice("retry_after", RETRY_AFTER_FORMATS, "seconds"),
        fraction=t.get_float("fraction", 0.5, minimum=0.0, maximum=0.999),
        delay_s=t.get_float("delay_s", 1.0, minimum=0.0),
        when=t.choice("when", ("before", "after"), "before"),
    )
    t.done()
    return spec


def _parse_playment(t: _Table) -> PlaymentScenario:
    keys = _api_keys(t)
    statuses = t.get_list("statuses", ["created", "in_progress", "completed"])
    if not statuses or not all(isinstance(s, str) and s for s in statuses):
        raise ScenarioError(f"{t.name('statuses')} must be a non-empty list of strings")
    if statuses[-1] != "completed" or statuses.count("completed") != 1:
        raise ScenarioError(f"{t.name('statuses')} must end with 'completed' (and only there)")
    rate_limit = _rate_limit(t)
    duration = t.get_float("job_duration_s", 2.0, minimum=0.0)
    duration_max = (
        None
        if t.raw("job_duration_max_s", None) is None
        else t.get_float("job_duration_max_s", duration, minimum=duration)
    )
    out = PlaymentScenario(
        valid_api_keys=tuple(keys),
        job_duration_s=duration,
        job_duration_max_s=duration_max,
        statuses=tuple(statuses),
        points_per_frame=_points_range(t),
        num_labels=t.get_int("num_labels", 60, minimum=1, maximum=65_536),
        mask_line_width=t.get_int("mask_line_width", 80, minimum=8),
        attachments_redirect_status=t.choice("attachments_redirect_status", (302, 307), 302),
        result_variant=t.choice("result_variant", ("masks", "pcd"), "masks"),
        rate_limit=rate_limit,
    )
    t.done()
    return out


def _parse_cognite(t: _Table) -> CogniteScenario:
    missing = t.get_list("missing_files", [])
    if not all((_is_int(m) and m > 0) or (isinstance(m, str) and m) for m in missing):
        raise ScenarioError(
            f"{t.name('missing_files')} must list file ids (ints > 0) or external ids (strings)"
        )
    retryable = t.get_list("auto_retryable_statuses", [])
    if not all(_is_int(s) and 400 <= s <= 599 for s in retryable):
        raise ScenarioError(f"{t.name('auto_retryable_statuses')} must list HTTP statuses 400-599")
    out = CogniteScenario(
        job_duration_s=t.get_float("job_duration_s", 2.0, minimum=0.0),
        failure_rate=_rate(t, "failure_rate"),
        required_scope=t.get_str("required_scope", ""),
        required_cdf_version=t.get_str("required_cdf_version", ""),
        max_active_jobs=t.get_int("max_active_jobs", 0, minimum=0),
        segments_per_item=_int_range(t, "segments_per_item", (1, 3), minimum=1),
        polygons_per_segment=_int_range(t, "polygons_per_segment", (1, 2), minimum=1),
        vertices_per_polygon=_int_range(t, "vertices_per_polygon", (6, 24), minimum=3),
        missing_files=tuple(missing),
        file_bytes=t.get_int("file_bytes", 4096, minimum=0),
        auto_retryable_statuses=tuple(retryable),
        # Cognite documents its 429s as carrying no Retry-After: not configurable.
        rate_limit=_rate_limit(t, retry_after="none"),
    )
    t.done()
    return out


def _parse_bentley(t: _Table) -> BentleyScenario:
    out = BentleyScenario(
        job_duration_s=t.get_float("job_duration_s", 2.0, minimum=0.0),
        failure_rate=_rate(t, "failure_rate"),
        terminating_s=t.get_float("terminating_s", 0.5, minimum=0.0),
        progress_step=t.get_int("progress_step", 10, minimum=1, maximum=100),
        required_scope=t.get_str("required_scope", "itwin-platform"),
        parts_per_output=t.get_int("parts_per_output", 3, minimum=0, maximum=9999),
        blob_bytes=t.get_int("blob_bytes", 262_144, minimum=0),
        list_page_size=t.get_int("list_page_size", 5000, minimum=1, maximum=5000),
        sas_ttl_s=t.get_float("sas_ttl_s", 3600.0, minimum=1.0),
        expire_first_n=t.get_int("expire_first_n", 0, minimum=0),
        corrupt_first_n=t.get_int("corrupt_first_n", 0, minimum=0),
        job_listing=t.get_bool("job_listing", True),
        # Bentley documents Retry-After in seconds on its 429s: not configurable.
        rate_limit=_rate_limit(t, retry_after="seconds"),
    )
    t.done()
    return out


def _parse_modzy(t: _Table) -> ModzyScenario:
    out = ModzyScenario(
        valid_api_keys=tuple(_api_keys(t)),
        job_duration_s=t.get_float("job_duration_s", 2.0, minimum=0.0),
        results_404_s=t.get_float("results_404_s", 1.0, minimum=0.0),
        failure_rate=_rate(t, "failure_rate"),
        timeout_rate=_rate(t, "timeout_rate"),
        item_failure_rate=_rate(t, "item_failure_rate"),
        # Modzy documents no 429 at all; when a scenario adds one it says nothing more.
        rate_limit=_rate_limit(t, retry_after="none"),
    )
    if out.failure_rate + out.timeout_rate > 1.0:
        raise ScenarioError(f"{t.name('failure_rate')} + timeout_rate must be <= 1")
    t.done()
    return out


def _parse_oauth(t: _Table) -> OAuthScenario:
    raw = t.table("clients")
    clients: list[tuple[str, str]] = []
    for client_id in list(raw.keys()):
        secret = raw.get_str(client_id, "")
        if not client_id or not secret:
            raise ScenarioError(f"{raw.name(client_id)} must be a non-empty client secret")
        clients.append((client_id, secret))
    out = OAuthScenario(
        clients=tuple(clients),
        token_ttl_s=t.get_float("token_ttl_s", 3600.0, minimum=0.0),
        rate_limit=_rate_limit(t),
    )
    t.done()
    return out


def _parse_storage(t: _Table) -> StorageScenario:
    out = StorageScenario(
        url_ttl_s=t.get_float("url_ttl_s", 300.0, minimum=1.0),
        expire_first_n=t.get_int("expire_first_n", 0, minimum=0),
        chunk_size=t.get_int("chunk_size", 65_536, minimum=1),
        connection_bytes_per_s=t.get_float("connection_bytes_per_s", 0.0, minimum=0.0),
        link_bytes_per_s=t.get_float("link_bytes_per_s", 0.0, minimum=0.0),
    )
    t.done()
    return out


def _api_keys(t: _Table) -> list[str]:
    keys = t.get_list("valid_api_keys", [])
    if not all(isinstance(k, str) and k for k in keys):
        raise ScenarioError(f"{t.name('valid_api_keys')} must be a list of non-empty strings")
    return keys


def _rate(t: _Table, key: str) -> float:
    return t.get_float(key, 0.0, minimum=0.0, maximum=1.0)


def _rate_limit(t: _Table, *, retry_after: RetryAfterFormat | None = None) -> RateLimit:
    """The ``rate_limit`` sub-table; ``retry_after`` fixes the header format (and makes the
    key unknown) for providers whose documentation already decides it."""
    rl = t.table("rate_limit")
    out = RateLimit(
        rate_per_s=rl.get_float("rate_per_s", 0.0, minimum=0.0),
        burst=rl.get_int("burst", 0, minimum=0),
        retry_after=(
            rl.choice("retry_after", RETRY_AFTER_FORMATS, "seconds")
            if retry_after is None
            else retry_after
        ),
    )
    rl.done()
    return out


def _int_range(t: _Table, key: str, default: tuple[int, int], *, minimum: int) -> tuple[int, int]:
    raw = t.raw(key, list(default))
    if _is_int(raw) and raw >= minimum:
        return (raw, raw)
    if (
        isinstance(raw, list)
        and len(raw) == 2
        and all(_is_int(v) for v in raw)
        and minimum <= raw[0] <= raw[1]
    ):
        return (raw[0], raw[1])
    raise ScenarioError(f"{t.name(key)} must be an int >= {minimum} or [min, max]")


def _points_range(t: _Table) -> tuple[int, int]:
    raw = t.raw("points_per_frame", 40_000)
    if _is_int(raw) and raw >= 0:
        return (raw, raw)
    if (
        isinstance(raw, list)
        and len(raw) == 2
        and all(_is_int(v) for v in raw)
        and 0 <= raw[0] <= raw[1]
    ):
        return (raw[0], raw[1])
    raise ScenarioError(f"{t.name('points_per_frame')} must be an int >= 0 or [min, max]")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_table(raw: object, where: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ScenarioError(f"{where} must be a table")
    return cast(Mapping[str, Any], raw)


_T = TypeVar("_T")


class _Table:
    """Reads typed keys from one TOML table and remembers which ones it used."""

    def __init__(self, doc: Mapping[str, Any], where: str) -> None:
        self._doc = doc
        self._where = where
        self._used: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self._where}.{key}" if self._where else key

    def raw(self, key: str, default: object) -> Any:
        self._used.add(key)
        return self._doc.get(key, default)

    def keys(self) -> list[str]:
        return list(self._doc)

    def done(self) -> None:
        for key in self._doc:
            if key not in self._used:
                raise ScenarioError(f"unknown key {self.name(key)!r}")

    def table(self, key: str) -> _Table:
        return _Table(_as_table(self.raw(key, {}), self.name(key)), self.name(key))

    def get_list(self, key: str, default: list[Any]) -> list[Any]:
        v = self.raw(key, default)
        if not isinstance(v, list):
            raise ScenarioError(f"{self.name(key)} must be a list")
        return v

    def get_str(self, key: str, default: str) -> str:
        v = self.raw(key, default)
        if not isinstance(v, str):
            raise ScenarioError(f"{self.name(key)} must be a string")
        return v

    def get_bool(self, key: str, default: bool) -> bool:
        v = self.raw(key, default)
        if not isinstance(v, bool):
            raise ScenarioError(f"{self.name(key)} must be true or false")
        return v

    def get_int(
        self, key: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        v = self.raw(key, default)
        if not _is_int(v):
            raise ScenarioError(f"{self.name(key)} must be an integer")
        self._check_range(key, v, minimum, maximum)
        return cast(int, v)

    def get_float(
        self,
        key: str,
        default: float,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float:
        v = self.raw(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
            raise ScenarioError(f"{self.name(key)} must be a number")
        self._check_range(key, v, minimum, maximum)
        return float(v)

    def choice(self, key: str, options: tuple[_T, ...], default: _T | None) -> _T:
        if default is None and key not in self._doc:
            raise ScenarioError(f"{self.name(key)} is required (one of {list(options)})")
        v = self.raw(key, default)
        if isinstance(v, bool) or v not in options:
            raise ScenarioError(f"{self.name(key)} must be one of {list(options)}, not {v!r}")
        return cast(_T, v)

    def _check_range(
        self, key: str, v: float, minimum: float | None, maximum: float | None
    ) -> None:
        if minimum is not None and v < minimum:
            raise ScenarioError(f"{self.name(key)} must be >= {minimum}, not {v}")
        if maximum is not None and v > maximum:
            raise ScenarioError(f"{self.name(key)} must be <= {maximum}, not {v}")
