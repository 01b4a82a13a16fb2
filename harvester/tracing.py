"""OpenTelemetry traces of each job's steps, when ``harvester[otel]`` is installed and asked for.

Off (the default, and whenever ``opentelemetry`` is not installed) every hook is a call that
returns the shared ``NOOP`` context manager: no span, no allocation, nothing imported. On,
each job is one trace:

    job                  the job's whole life, created_at -> terminal state (emitted at the end)
    ├─ submit            the create POST
    ├─ reconcile         looking a job up after a lost create answer
    ├─ poll              each status poll
    ├─ harvest           the provider's harvest of a finished job
    │  ├─ download       a result file or a JSON document
    │  ├─ decode         a label file, streamed and decoded into its .npy
    │  └─ write          a small output file
    └─ write             MANIFEST.json, last

The trace id and the ``job`` span's id are derived from (provider, key, created_at), so every
step of a job lands in the same trace across polls, restarts and replicas, with no id stored
anywhere. Spans carry ``harvester.provider``, ``harvester.job.key``, the reference and remote
ids, and ``harvester.file`` for file spans: never a URL (a signed URL's query is a
credential), a header or a payload. Log lines written inside a span carry its ``trace_id``
and ``span_id`` (``log_processor``).

Turned on by the standard variables: ``OTEL_TRACES_EXPORTER=otlp`` (HTTP/protobuf, needs
``opentelemetry-exporter-otlp-proto-http``, which the extra brings) or ``console``, or just an
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and ``OTEL_BSP_*`` work as documented by
OpenTelemetry. ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` keep it off.
"""

from __future__ import annotations

import contextvars
import hashlib
import importlib.util
import os
import struct
from collections.abc import Mapping, MutableMapping
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final

from harvester import __version__
from harvester.logs import redact_text

if TYPE_CHECKING:
    from harvester.jobs import Job


def _installed() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.sdk") is not None
    except ModuleNotFoundError:  # not even the namespace package
        return False


#: whether the otel extra is installed. Looked up without importing it: off, starting
#: harvester costs nothing more (importing the SDK takes tens of milliseconds).
AVAILABLE = _installed()

__all__ = [
    "AVAILABLE",
    "NOOP",
    "enabled",
    "job_finished",
    "log_ids",
    "log_processor",
    "setup",
    "setup_from_env",
    "shutdown",
    "span",
    "step",
]

#: the instrumentation scope spans are reported under
SCOPE = "harvester"
MAX_STATUS_CHARS = 300


class _NoOp:
    """What every hook returns while tracing is off: one shared, stateless object."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


NOOP: Final = _NoOp()

_tracer: Any = None  #: the tracer while tracing is on, else None (the one switch)
#: the opentelemetry modules, imported by ``_load`` when tracing is turned on
otel_context: Any = None
otel_trace: Any = None
_provider: Any = None  #: our own TracerProvider, when we set it up
#: (trace id, span id) the next root span must get: the ``job`` span's derived ids
_forced_ids: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "harvester_forced_ids", default=None
)


def enabled() -> bool:
    return _tracer is not None


# -- hooks --------------------------------------------------------------------------------
def step(name: str, job: Job, **attributes: str) -> Any:
    """A span for one step of ``job``, in the job's trace (``with tracing.step(...):``)."""
    if _tracer is None:
        return NOOP
    parent = otel_trace.set_span_in_context(otel_trace.NonRecordingSpan(_job_span_context(job)))
    attrs = _job_attributes(job)
    attrs.update((f"harvester.{k}", v) for k, v in attributes.items())
    return _Span(_tracer.start_span(name, context=parent, attributes=attrs))


def span(name: str, **attributes: str) -> Any:
    """A child span of the current one (a file of a harvest)."""
    if _tracer is None:
        return NOOP
    attrs = {f"harvester.{k}": v for k, v in attributes.items()}
    return _Span(_tracer.start_span(name, attributes=attrs))


def job_finished(job: Job) -> None:
    """Emit the ``job`` span, the parent of every step, once the job is terminal."""
    if _tracer is None or _provider is None:
        # Under somebody else's TracerProvider our ids cannot be chosen: the steps still
        # share one trace, under a parent that is never reported.
        return
    ids = _job_ids(job)
    token = _forced_ids.set(ids)
    try:
        root = _tracer.start_span(
            "job",
            context=otel_context.Context(),  # a root, whatever is current
            attributes={**_job_attributes(job), "harvester.job.state": job.state.value},
            start_time=int(job.created_at * 1e9),
        )
    finally:
        _forced_ids.reset(token)
    if job.reason:
        root.set_status(otel_trace.StatusCode.ERROR, redact_text(job.reason)[:MAX_STATUS_CHARS])
    root.end(end_time=int(max(job.updated_at, job.created_at) * 1e9))


class _Span:
    """Makes a started span current for a ``with`` block; an exception marks it failed,
    with a redacted message (no stack trace, no URL query reaches the exporter)."""

    __slots__ = ("_span", "_token")

    def __init__(self, started: Any) -> None:
        self._span = started
        self._token: object = None

    def __enter__(self) -> Any:
        self._token = otel_context.attach(otel_trace.set_span_in_context(self._span))
        return self._span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is not None:
                message = redact_text(f"{exc_type.__name__}: {exc}")[:MAX_STATUS_CHARS]
                self._span.set_status(otel_trace.StatusCode.ERROR, message)
            self._span.end()
        finally:
            otel_context.detach(self._token)


def _job_ids(job: Job) -> tuple[int, int]:
    seed = f"harvester-job\0{job.provider}\0{job.key}\0{job.created_at!r}".encode()
    digest = hashlib.sha256(seed).digest()
    trace_id = int.from_bytes(digest[:16], "big") or 1
    (span_id,) = struct.unpack(">Q", digest[16:24])
    return trace_id, span_id or 1


def _job_span_context(job: Job) -> Any:
    trace_id, span_id = _job_ids(job)
    return otel_trace.SpanContext(
        trace_id,
        span_id,
        is_remote=False,
        trace_flags=otel_trace.TraceFlags(otel_trace.TraceFlags.SAMPLED),
    )


def _job_attributes(job: Job) -> dict[str, str]:
    attrs = {"harvester.provider": job.provider, "harvester.job.key": job.key}
    if job.reference_id is not None:
        attrs["harvester.job.reference_id"] = job.reference_id
    if job.remote_id is not None:
        attrs["harvester.job.remote_id"] = job.remote_id
    return attrs


# -- logs ---------------------------------------------------------------------------------
_NO_IDS: Final[Mapping[str, str]] = MappingProxyType({})


def log_ids(job: Job) -> Mapping[str, str]:
    """``log.info(..., **tracing.log_ids(job))``: the job's trace on a line about the job,
    wherever it is logged from (nothing while tracing is off)."""
    if _tracer is None:
        return _NO_IDS
    trace_id, span_id = _job_ids(job)
    return {"trace_id": format(trace_id, "032x"), "span_id": format(span_id, "016x")}


def log_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog: the current span's ids on every log line written inside one."""
    ctx = otel_trace.get_current_span().get_span_context()
    if ctx.is_valid and "trace_id" not in event_dict:
        event_dict["trace_id"] = format(ctx.trace_id, "032x")
        event_dict["span_id"] = format(ctx.span_id, "016x")
    return event_dict


# -- set-up -------------------------------------------------------------------------------
def _load() -> None:
    global otel_context, otel_trace
    if not AVAILABLE:
        raise RuntimeError("tracing needs the otel extra: pip install 'harvester[otel]'")
    from opentelemetry import context, trace

    otel_context, otel_trace = context, trace


def setup(exporter: Any = None, *, provider: Any = None) -> None:
    """Turn tracing on: with our own TracerProvider exporting to ``exporter`` (batched), or
    with ``provider`` (tests pass one of ``new_provider()`` with a synchronous processor)."""
    global _tracer, _provider
    _load()
    if provider is None:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = new_provider()
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider = provider if getattr(provider, "harvester_ids", False) else None
    _tracer = provider.get_tracer(SCOPE, __version__)


def new_provider() -> Any:
    """A TracerProvider whose ``job`` spans get their derived ids."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class JobIdGenerator(RandomIdGenerator):
        """Random ids, except for the ``job`` span, whose ids its steps already point at."""

        def generate_span_id(self) -> int:
            forced = _forced_ids.get()
            return forced[1] if forced is not None else super().generate_span_id()

        def generate_trace_id(self) -> int:
            forced = _forced_ids.get()
            return forced[0] if forced is not None else super().generate_trace_id()

    provider = TracerProvider(
        resource=Resource.create({"service.name": "harvester", "service.version": __version__}),
        id_generator=JobIdGenerator(),
    )
    provider.harvester_ids = True  # type: ignore[attr-defined]
    return provider


def shutdown() -> None:
    """Flush what is batched and turn tracing off."""
    global _tracer, _provider
    provider, _tracer, _provider = _provider, None, None
    if provider is not None:
        provider.shutdown()


def wanted(env: Mapping[str, str]) -> str | None:
    """The exporter the environment asks for (``otlp``, ``console``), or None."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n]
    if not names:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return "otlp" if endpoint else None
    return None if names == ["none"] else names[0]


def setup_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """Turn tracing on if the environment asks for it; returns a warning to log, if any."""
    exporter_name = wanted(os.environ if env is None else env)
    if exporter_name is None:
        return None
    if not AVAILABLE:
        return (
            f"tracing requested ({exporter_name}) but opentelemetry is not installed:"
            " pip install 'harvester[otel]'; running without traces"
        )
    exporter: Any
    if exporter_name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        exporter = ConsoleSpanExporter()
    elif exporter_name == "otlp":
        try:
            # (not in the dev environment: its protobuf >= 5 conflicts with modzy-sdk's pin)
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter,
            )
        except ImportError:
            return (
                "tracing requested (otlp) but opentelemetry-exporter-otlp-proto-http is not"
                " installed: pip install 'harvester[otel]'; running without traces"
            )
        exporter = OTLPSpanExporter()  # reads OTEL_EXPORTER_OTLP_* itself
    else:
        return f"OTEL_TRACES_EXPORTER={exporter_name} is not supported (otlp, console, none)"
    setup(exporter)
    return None
