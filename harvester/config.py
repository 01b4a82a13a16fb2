"""Config: TOML -> frozen dataclasses, validated, with secrets only by reference.

A secret field ``x`` is written ``x_env = "NAME"`` (an environment variable) or
``x_file = "/run/secrets/x"``; the value itself never appears in a config file, and a
``SecretRef`` never prints it. Relative paths are resolved against the config file's folder,
so a config means the same thing from any working directory. Unknown keys are errors, with a
suggestion when the key looks like a typo of a known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import tempfile
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from harvester.errors import ConfigError
from harvester.netguard import host_reason
from harvester.secrets_io import secret_from_env, secret_from_file

_T = TypeVar("_T")

CONFIG_ENV = "HARVESTER_CONFIG"
PROVIDERS = ("playment", "cognite", "bentley", "modzy")


@dataclass(frozen=True)
class SecretRef:
    """Where a secret lives. ``reveal()`` reads it; ``repr``/``str`` never show it."""

    key: str  #: the config key that named it, for errors ("providers.playment.api_key")
    env: str | None = None
    file: Path | None = None

    def reveal(self) -> str:
        if self.env is not None:
            return secret_from_env(self.key, self.env)
        assert self.file is not None
        return secret_from_file(self.key, self.file)

    def __repr__(self) -> str:
        where = f"env {self.env}" if self.env is not None else f"file {self.file}"
        return f"SecretRef({self.key} from {where})"

    __str__ = __repr__


@dataclass(frozen=True)
class ProviderConfig:
    """Settings every provider section takes."""

    name: str
    base_url: str
    rate_per_s: float = 10.0
    burst: int = 20
    max_concurrency: int = 32
    poll_min_s: float = 5.0
    poll_max_s: float = 120.0
    #: share of rate_per_s that polls may use (the rest stays for submits and downloads,
    #: or for other clients of the same key); 1 = all of it
    poll_budget_share: float = 1.0
    request_timeout_s: float = 30.0
    max_retries: int = 5  #: attempts for idempotent requests after a retryable failure
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    on_lost_create: Literal["fail", "resubmit"] = "fail"
    #: an API answer larger than this once decoded (gzip included) is a protocol error
    max_answer_bytes: int = 16 << 20
    #: a download must average this after a request_timeout_s allowance, or it is cut
    min_bytes_per_s: float = 65536.0
    #: connect to link-local and cloud-metadata addresses (refused by default: a redirect
    #: or signed URL there is how a hostile answer reaches instance credentials)
    allow_link_local: bool = False
    #: a job still running this long after it started is cancelled and ends in error (0: off)
    job_timeout_s: float = 0.0

    def secrets(self) -> list[SecretRef]:
        return [v for v in vars(self).values() if isinstance(v, SecretRef)]


@dataclass(frozen=True)
class PlaymentConfig(ProviderConfig):
    api_key: SecretRef | None = None
    project_id: str = ""
    batch_id: str | None = None  #: put jobs in this batch; default: one harvester creates
    work_flow_id: str | None = None


@dataclass(frozen=True)
class CogniteConfig(ProviderConfig):
    project: str = ""
    token_url: str = ""
    client_id: str = ""
    client_secret: SecretRef | None = None
    scopes: tuple[str, ...] = ()
    cdf_version: str = "beta"


@dataclass(frozen=True)
class BentleyConfig(ProviderConfig):
    token_url: str = ""
    client_id: str = ""
    client_secret: SecretRef | None = None
    scopes: tuple[str, ...] = ("itwin-platform",)
    itwin_id: str | None = None


@dataclass(frozen=True)
class ModzyConfig(ProviderConfig):
    api_key: SecretRef | None = None


_PROVIDER_CLASSES: dict[str, type[ProviderConfig]] = {
    "playment": PlaymentConfig,
    "cognite": CogniteConfig,
    "bentley": BentleyConfig,
    "modzy": ModzyConfig,
}
_DEFAULT_BASE_URLS = {
    "playment": "https://api.playment.io",
    "cognite": "https://westeurope-1.cognitedata.com",
    "bentley": "https://api.bentley.com",
    "modzy": "https://app.modzy.com",
}
#: fields a provider section must set (besides its secret)
_REQUIRED: dict[str, tuple[str, ...]] = {
    "playment": ("project_id", "api_key"),
    "cognite": ("project", "token_url", "client_id", "client_secret"),
    "bentley": ("token_url", "client_id", "client_secret"),
    "modzy": ("api_key",),
}
_PROVIDER_DEFAULTS: dict[str, dict[str, Any]] = {
    # Bentley asks for 15/30/60/120 s polling; clamping its ladder into [15, 120] by default.
    "bentley": {"poll_min_s": 15.0, "poll_max_s": 120.0},
}


@dataclass(frozen=True)
class StoreConfig:
    url: str = "sqlite://harvester-state.db"
    password: SecretRef | None = None
    #: the sqlite file when ``url`` is ``sqlite://...`` (resolved against the config folder)
    path: Path | None = None
    #: PostgreSQL only: a replica that has not renewed its lease for this long is presumed
    #: dead and its jobs are taken over; it renews every lease_s / 3 (at most 2 s apart)
    lease_s: float = 30.0
    #: PostgreSQL only: connections this process keeps to the database at most
    pool_size: int = 8


@dataclass(frozen=True)
class OutputConfig:
    dir: Path = Path("harvest")
    #: "auto": the smallest unsigned type that holds the largest label of each array
    label_dtype: Literal["auto", "uint8", "uint16", "uint32", "uint64"] = "auto"
    #: ``output.dir`` when it is ``s3://``, ``az://`` or ``gs://`` (harvester.objstore); ``dir``
    #: is then the local staging folder (``staging_dir``, by default one in the temp folder)
    url: str | None = None
    staging_dir: Path | None = None
    #: object stores: an S3-compatible store's or an emulator's address, the S3 region
    endpoint: str | None = None
    region: str | None = None
    access_key_id: SecretRef | None = None
    secret_access_key: SecretRef | None = None
    account_name: str | None = None
    account_key: SecretRef | None = None
    service_account_key: SecretRef | None = None
    #: object stores: a file above this is sent as a multipart upload of parts this big
    #: (S3 takes 5 MiB at least); two parts are in flight at once, the memory a file costs
    part_bytes: int = 8 << 20


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:8080"
    token: SecretRef | None = None
    drain_grace_s: float = 30.0
    #: bounds on what HTTP clients can hold (harvester.httpserver)
    max_connections: int = 512
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    idle_timeout_s: float = 30.0


@dataclass(frozen=True)
class HarvestConfig:
    concurrency: int = 8  #: jobs downloaded/decoded at once
    max_attempts: int = 5  #: transient harvest failures before the job ends in error
    chunk_bytes: int = 1 << 20  #: download chunk size fed to the decoder
    #: files (label frames, blobs) of one job downloaded/decoded at once, and its streams
    #: (a large blob's ranged parts count one each)
    frame_concurrency: int = 4
    #: a file whose listing gives a size above this is fetched as ranged parts this big
    part_bytes: int = 8 << 20
    #: worker threads decoding, hashing and writing (whole process); 0 = one per core
    threads: int = 0
    #: how long a finished job's results may stay unpublished (Modzy's 404 / ``finished:
    #: false``) before the job ends in error; counted from the first "not yet" of this process
    results_wait_s: float = 3600.0
    #: decoded bytes one downloaded file (mask, result, blob) may have
    max_file_bytes: int = 4 << 30
    #: decoded bytes all of one job's downloads together may have
    max_job_bytes: int = 32 << 30


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


@dataclass(frozen=True)
class Config:
    source: Path
    store: StoreConfig
    output: OutputConfig
    server: ServerConfig
    harvest: HarvestConfig
    log: LogConfig
    providers: Mapping[str, ProviderConfig] = field(default_factory=dict)
    #: provider addresses left unresolved by ``load_config(..., offline=True)``: one error
    #: line each, raised by ``check_secrets`` before anything could be sent
    unresolved: tuple[str, ...] = ()

    def check_secrets(self) -> None:
        """Read every secret once so a missing one stops the program before any work."""
        if self.unresolved:
            raise ConfigError(self.unresolved[0])
        for provider in self.providers.values():
            for ref in provider.secrets():
                ref.reveal()
        out = self.output
        refs = (out.access_key_id, out.secret_access_key, out.account_key, out.service_account_key)
        for optional in (self.store.password, self.server.token, *refs):
            if optional is not None:
                optional.reveal()


def config_path(arg: str | None) -> Path:
    """The config file named by ``-c`` or, failing that, ``$HARVESTER_CONFIG``."""
    chosen = arg or os.environ.get(CONFIG_ENV)
    if not chosen:
        raise ConfigError(f"no config file: pass -c CONFIG or set {CONFIG_ENV}")
    return Path(chosen)


def load_config(path: Path, *, offline: bool = False) -> Config:
    """The config at ``path``. ``offline``: for commands that send nothing to a provider
    (status, submit, copy-store, bind-output), a provider address whose environment variable
    is unset is not an error; ``check_secrets`` refuses such a config."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_config(data, source=path, offline=offline)


def parse_config(data: Mapping[str, Any], *, source: Path, offline: bool = False) -> Config:
    base = source.resolve().parent
    ctx = _Ctx(source, base)
    sections = {"store", "output", "server", "harvest", "log", "providers"}
    ctx.unknown(data, sections, "")

    store_table = _url_from_env(dict(ctx.table(data, "store")), "url", "store", ctx)
    store = ctx.build(StoreConfig, store_table, "store", skip=frozenset({"path"}))
    store = dataclasses.replace(store, path=_sqlite_path(store.url, base, ctx))
    _check_store(store, ctx)
    output = _output(ctx, dict(ctx.table(data, "output")))
    server = ctx.build(ServerConfig, ctx.table(data, "server"), "server")
    _check_listen(server.listen, ctx)
    harvest = ctx.build(HarvestConfig, ctx.table(data, "harvest"), "harvest")
    _check_harvest(harvest, ctx)
    if server.drain_grace_s < 0:
        ctx.fail(f"server.drain_grace_s must be >= 0, got {server.drain_grace_s:g}")
    for name in ("max_connections", "header_timeout_s", "body_timeout_s", "idle_timeout_s"):
        if not getattr(server, name) > 0:
            ctx.fail(f"server.{name} must be > 0, got {getattr(server, name)!r}")
    log = ctx.build(LogConfig, ctx.table(data, "log"), "log")

    providers: dict[str, ProviderConfig] = {}
    unresolved: list[str] = []
    ptable = ctx.table(data, "providers")
    ctx.unknown(ptable, set(PROVIDERS), "providers.")
    for name in PROVIDERS:
        if name not in ptable:
            continue
        section = dict(ctx.table(ptable, name, prefix="providers."))
        where = f"providers.{name}"
        # Addresses (not secrets) may come from the environment too, e.g. an emulator's
        # free port found at start-up: base_url_env / token_url_env.
        for url_key in _URL_FROM_ENV.get(name, ()):
            if f"{url_key}_env" not in section:
                continue
            env = section.pop(f"{url_key}_env")
            if not isinstance(env, str) or url_key in section:
                ctx.fail(f"{where}.{url_key}_env must be a string and excludes {url_key}")
            value = os.environ.get(env)
            if not value:
                problem = f"{where}.{url_key}_env: environment variable {env} is not set"
                if not offline:
                    ctx.fail(problem)
                unresolved.append(f"{source}: {problem}")
                value = UNRESOLVED_URL
            section[url_key] = value
        section.setdefault("base_url", _DEFAULT_BASE_URLS[name])
        for key, value in _PROVIDER_DEFAULTS.get(name, {}).items():
            section.setdefault(key, value)
        cfg = ctx.build(_PROVIDER_CLASSES[name], section, where, fixed={"name": name})
        for req in _REQUIRED[name]:
            if getattr(cfg, req) in (None, ""):
                hint = f" (set {req}_env or {req}_file)" if req in _SECRET_FIELDS else ""
                ctx.fail(f"{where}.{req} is required{hint}")
        _check_provider(cfg, ctx, where)
        providers[name] = cfg
    return Config(
        source=source,
        store=store,
        output=output,
        server=server,
        harvest=harvest,
        log=log,
        providers=providers,
        unresolved=tuple(unresolved),
    )


#: stands for an address an offline command does not need: ``.invalid`` never resolves
#: (RFC 6761), so even a bug that sent to it would reach nobody
UNRESOLVED_URL = "http://unresolved.invalid"
_SECRET_FIELDS = {"api_key", "client_secret", "password", "token"}
_URL_FROM_ENV: dict[str, tuple[str, ...]] = {
    "playment": ("base_url",),
    "cognite": ("base_url", "token_url"),
    "bentley": ("base_url", "token_url"),
    "modzy": ("base_url",),
}


def _check_provider(cfg: ProviderConfig, ctx: _Ctx, where: str) -> None:
    if not cfg.base_url.startswith(("http://", "https://")):
        ctx.fail(f"{where}.base_url must start with http:// or https://, got {cfg.base_url!r}")
    positive = (
        "burst",
        "max_concurrency",
        "poll_min_s",
        "poll_max_s",
        "request_timeout_s",
        "max_answer_bytes",
        "min_bytes_per_s",
    )
    for name in positive:
        if getattr(cfg, name) <= 0:
            ctx.fail(f"{where}.{name} must be > 0")
    if cfg.rate_per_s < 0:
        ctx.fail(f"{where}.rate_per_s must be >= 0 (0 = unlimited)")
    if cfg.max_retries < 0:
        ctx.fail(f"{where}.max_retries must be >= 0")
    if not cfg.job_timeout_s >= 0:
        ctx.fail(f"{where}.job_timeout_s must be >= 0 (0 = no deadline)")
    if cfg.poll_max_s < cfg.poll_min_s:
        ctx.fail(f"{where}.poll_max_s must be >= poll_min_s")
    if not 0 < cfg.poll_budget_share <= 1:
        ctx.fail(f"{where}.poll_budget_share must be > 0 and <= 1")
    if not cfg.backoff_base_s > 0:
        ctx.fail(f"{where}.backoff_base_s must be > 0")
    if cfg.backoff_max_s < cfg.backoff_base_s:
        ctx.fail(f"{where}.backoff_max_s must be >= backoff_base_s")
    if not cfg.allow_link_local:
        for key in ("base_url", "token_url"):
            refused = host_reason(getattr(cfg, key, ""))
            if refused is not None:
                ctx.fail(
                    f"{where}.{key} is {refused}; set {where}.allow_link_local = true if"
                    " this deployment really serves it there"
                )


def _check_harvest(harvest: HarvestConfig, ctx: _Ctx) -> None:
    for name in (
        "concurrency",
        "max_attempts",
        "chunk_bytes",
        "frame_concurrency",
        "part_bytes",
        "results_wait_s",
        "max_file_bytes",
        "max_job_bytes",
    ):
        if not getattr(harvest, name) > 0:
            ctx.fail(f"harvest.{name} must be > 0, got {getattr(harvest, name)!r}")
    if not harvest.threads >= 0:
        ctx.fail(f"harvest.threads must be >= 0 (0 = one per core), got {harvest.threads!r}")


def _check_listen(listen: str, ctx: _Ctx) -> None:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        ctx.fail(f"server.listen must be HOST:PORT, got {listen!r}")


def _url_from_env(section: dict[str, Any], key: str, where: str, ctx: _Ctx) -> dict[str, Any]:
    """``<key>_env = "VAR"`` stands for ``<key> = $VAR`` (an address, not a secret)."""
    if f"{key}_env" not in section:
        return section
    env = section.pop(f"{key}_env")
    if not isinstance(env, str) or key in section:
        ctx.fail(f"{where}.{key}_env must be a string and excludes {key}")
    value = os.environ.get(env)
    if not value:
        ctx.fail(f"{where}.{key}_env: environment variable {env} is not set")
    section[key] = value
    return section


def _check_store(store: StoreConfig, ctx: _Ctx) -> None:
    if store.path is None:
        # A password inside the URL would sit in a ConfigMap and in every error message.
        try:
            has_password = urlsplit(store.url).password is not None
        except ValueError:
            ctx.fail("store.url is not a valid postgresql:// URL")
        if has_password:
            ctx.fail(
                "store.url must not contain a password; give it by reference with"
                " store.password_env or store.password_file"
            )
    elif store.password is not None:
        ctx.fail("store.password is for postgresql:// URLs; a sqlite store has none")
    # Renewals come every lease_s / 3; below a few seconds, one slow query would cost a lease.
    if store.lease_s < 3:
        ctx.fail(f"store.lease_s must be >= 3 seconds, got {store.lease_s:g}")
    if store.pool_size < 2:
        ctx.fail("store.pool_size must be >= 2 (job writes and lease renewals each need one)")


def _sqlite_path(url: str, base: Path, ctx: _Ctx) -> Path | None:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return None
    if not url.startswith("sqlite://"):
        shown = url.split("@", 1)[-1]  # whatever precedes an "@" may hold a password
        ctx.fail(f"store.url must start with sqlite:// or postgresql://, got {shown!r}")
    rest = url.removeprefix("sqlite://")
    if not rest or rest == "/":
        ctx.fail("store.url names no sqlite file")
    # sqlite:///abs/path.db is absolute; sqlite://rel.db is relative to the config file.
    return Path(rest) if rest.startswith("/") else base / rest


def _output(ctx: _Ctx, table: dict[str, Any]) -> OutputConfig:
    raw = table.get("dir")
    url = raw if isinstance(raw, str) and "://" in raw else None
    if url is not None:
        try:
            parse_location(url)
        except ValueError as exc:
            ctx.fail(f"output.dir: {exc}")
        del table["dir"]
    output = ctx.build(OutputConfig, table, "output", skip=frozenset({"url"}))
    if url is None:
        if output.staging_dir is not None:
            ctx.fail("output.staging_dir is for an object-store output.dir (s3://, az://, gs://)")
        return dataclasses.replace(output, dir=ctx.path(output.dir))
    if output.endpoint is not None and not output.endpoint.startswith(("http://", "https://")):
        ctx.fail(f"output.endpoint must be an http:// or https:// URL, got {output.endpoint!r}")
    if (output.access_key_id is None) != (output.secret_access_key is None):
        ctx.fail("output: set both access_key_id and secret_access_key, or neither")
    if not 5 << 20 <= output.part_bytes <= 512 << 20:
        ctx.fail(f"output.part_bytes must be 5 MiB..512 MiB, got {output.part_bytes}")
    staging = ctx.path(output.staging_dir) if output.staging_dir else default_staging(url)
    return dataclasses.replace(output, url=url, dir=staging, staging_dir=staging)


#: ``output.dir`` URL schemes served by an object store (harvester.objstore)
SCHEMES = ("s3", "az", "gs")


@dataclass(frozen=True, slots=True)
class Location:
    scheme: str
    bucket: str
    prefix: str  #: "" or "a/b" (no leading or trailing slash)

    def url(self, rel: str = "") -> str:
        key = "/".join(p for p in (self.prefix, rel) if p)
        return f"{self.scheme}://{self.bucket}/{key}" if key else f"{self.scheme}://{self.bucket}"


def parse_location(url: str) -> Location:
    """``s3://bucket/prefix`` -> Location; ``ValueError`` with one line saying what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"{url!r} is not an object-store URL")
    if scheme not in SCHEMES:
        raise ValueError(
            f"unknown scheme {scheme}:// in {url!r} (a local path, or one of"
            f" {', '.join(s + '://' for s in SCHEMES)})"
        )
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"{url!r} names no bucket or container")
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts) or any(c in url for c in "?#\\"):
        raise ValueError(f"{url!r}: the prefix must be a plain path (no ., .., ?, # or \\)")
    return Location(scheme, bucket, "/".join(parts))


def default_staging(url: str) -> Path:
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"harvester-staging-{digest}"


class _Ctx:
    def __init__(self, source: Path, base: Path) -> None:
        self.source = source
        self.base = base

    def fail(self, message: str) -> Any:
        raise ConfigError(f"{self.source}: {message}")

    def path(self, p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else self.base / p

    def table(self, data: Mapping[str, Any], name: str, prefix: str = "") -> Mapping[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            self.fail(f"[{prefix}{name}] must be a table")
        table: Mapping[str, Any] = value
        return table

    def unknown(self, data: Mapping[str, Any], known: set[str], prefix: str) -> None:
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
                known_list = ", ".join(sorted(known))
                self.fail(f"unknown key {prefix}{key}{hint}; known keys: {known_list}")

    def build(
        self,
        cls: type[_T],
        data: Mapping[str, Any],
        where: str,
        *,
        skip: frozenset[str] = frozenset(),
        fixed: Mapping[str, Any] | None = None,
    ) -> _T:
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        accepted: dict[str, str] = {}
        fixed = fixed or {}
        for name in fields:
            if name in skip or name in fixed:
                continue
            if _is_secret(hints[name]):
                accepted[f"{name}_env"] = name
                accepted[f"{name}_file"] = name
            else:
                accepted[name] = name
        self.unknown(data, set(accepted), f"{where}.")
        kwargs: dict[str, Any] = dict(fixed)
        for key, value in data.items():
            name = accepted[key]
            full = f"{where}.{key}"
            if _is_secret(hints[name]):
                if name in kwargs:
                    self.fail(f"{where}: set only one of {name}_env and {name}_file")
                if not isinstance(value, str) or not value:
                    self.fail(f"{full} must be a non-empty string")
                if key.endswith("_env"):
                    kwargs[name] = SecretRef(f"{where}.{name}", env=value)
                else:
                    kwargs[name] = SecretRef(f"{where}.{name}", file=self.path(Path(value)))
            else:
                kwargs[name] = self.convert(hints[name], value, full)
        return cls(**kwargs)

    def convert(self, hint: Any, value: Any, where: str) -> Any:
        origin = get_origin(hint)
        if origin in (Union, types.UnionType):
            args = [a for a in get_args(hint) if a is not type(None)]
            return self.convert(args[0], value, where)
        if origin is Literal:
            choices = get_args(hint)
            if value not in choices:
                self.fail(f"{where} must be one of {', '.join(map(repr, choices))}, got {value!r}")
            return value
        if origin is tuple:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                self.fail(f"{where} must be a list of strings")
            return tuple(value)
        if hint is bool:
            if not isinstance(value, bool):
                self.fail(f"{where} must be true or false, got {value!r}")
            return value
        if hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(f"{where} must be an integer, got {value!r}")
            return value
        if hint is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                self.fail(f"{where} must be a number, got {value!r}")
            return float(value)
        if hint is str:
            if not isinstance(value, str):
                self.fail(f"{where} must be a string, got {value!r}")
            return value
        if hint is Path:
            if not isinstance(value, str) or not value:
                self.fail(f"{where} must be a path string, got {value!r}")
            return Path(value)
        raise TypeError(f"config field type {hint!r} not handled")  # a bug, not bad input


def _is_secret(hint: Any) -> bool:
    return hint is SecretRef or SecretRef in get_args(hint)
