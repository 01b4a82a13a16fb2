"""Prometheus metrics, one registry per engine (so tests and several engines don't collide)."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from harvester import __version__

#: request latencies, from a loopback emulator's milliseconds to a slow provider's half minute
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: the image sets it from its build (Dockerfile ARG REVISION); elsewhere "unknown"
REVISION_ENV = "HARVESTER_REVISION"

#: distinct raw statuses labelled per provider, and their length; the rest count as "(other)"
MAX_STATUS_LABELS = 20
MAX_STATUS_LABEL = 64
OTHER_STATUS = "(other)"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # What operators expect of any Prometheus target: process_* (CPU, memory, open
        # files), python_info and python_gc_*; each engine gets its own collectors because the
        # default ones are bound to the global registry.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build_info = Gauge(
            "harvester_build_info",
            "always 1; the labels say which harvester is running",
            ["version", "revision", "python"],
            registry=r,
        )
        self.build_info.labels(
            __version__, os.environ.get(REVISION_ENV, "unknown"), platform.python_version()
        ).set(1)
        self.request_duration = Histogram(
            "harvester_request_duration_seconds",
            "duration of requests to providers and storage hosts, by endpoint",
            ["provider", "endpoint"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.http_duration = Histogram(
            "harvester_http_request_duration_seconds",
            "duration of requests to the daemon's own HTTP API, by route and status",
            ["route", "method", "status"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.requests = Counter(
            "harvester_requests",
            "HTTP requests sent to providers, by endpoint and HTTP status (or 'error')",
            ["provider", "endpoint", "status"],
            registry=r,
        )
        self.rate_limited = Counter(
            "harvester_rate_limited", "429 answers received", ["provider"], registry=r
        )
        self.retries = Counter(
            "harvester_retries",
            "requests retried after a transient failure",
            ["provider", "endpoint"],
            registry=r,
        )
        # Read from each provider's limiter at scrape time: a gate closed for an hour counts
        # its seconds as they pass, not all at once when it closes.
        self._gates: dict[str, Callable[[], float]] = {}
        r.register(_GateCollector(self._gates))
        self.poll_latency = Histogram(
            "harvester_poll_latency_seconds",
            "latency of job status requests",
            ["provider"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.bytes_downloaded = Counter(
            "harvester_downloaded_bytes",
            "bytes downloaded from signed URLs",
            ["provider"],
            registry=r,
        )
        self.decode_seconds = Counter(
            "harvester_decode_seconds",
            "seconds spent decoding label files",
            ["provider"],
            registry=r,
        )
        self.transitions = Counter(
            "harvester_transitions",
            "job state changes persisted",
            ["provider", "state"],
            registry=r,
        )
        self.jobs = Gauge(
            "harvester_jobs",
            "jobs in the store by provider and state",
            ["provider", "state"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "harvester_queue_depth",
            "jobs waiting in a lane's due queue or harvest queue",
            ["provider", "queue"],
            registry=r,
        )
        self.http_closed = Counter(
            "harvester_http_connections_closed",
            "daemon API connections the server closed: header_timeout, body_timeout,"
            " evicted or refused (over server.max_connections)",
            ["reason"],
            registry=r,
        )

        # Controls (harvester.control): cancels, retries and job_timeout_s.
        self.cancels = Counter(
            "harvester_job_cancels",
            "cancels by where they acted (provider: its API cancelled the remote job; local:"
            " the store only) and result (cancelled, refused)",
            ["provider", "where", "result"],
            registry=r,
        )
        self.job_retries = Counter(
            "harvester_job_retries",
            "ended jobs put back to work, by kind (harvest-again, recheck, submit, resubmit)",
            ["provider", "kind"],
            registry=r,
        )
        self.job_timeouts = Counter(
            "harvester_job_timeouts",
            "running jobs ended in error after job_timeout_s",
            ["provider"],
            registry=r,
        )

        self.unknown_status = Counter(
            "harvester_unknown_status_jobs",
            "jobs that answered a status their provider does not document (once per job)",
            ["provider", "status"],
            registry=r,
        )
        self._unknown_seen: dict[str, set[str]] = {}

        # Replicas sharing a PostgreSQL store (harvester.replica); absent on sqlite.
        self.replicas_live = Gauge(
            "harvester_replicas_live",
            "replicas with a current lease at this replica's last renewal, itself included",
            registry=r,
        )
        self.lease_left = Gauge(
            "harvester_replica_lease_seconds_left",
            "seconds until this replica's lease runs out unless renewed (its own clock)",
            registry=r,
        )
        self.renewals = Counter(
            "harvester_replica_renewals",
            "lease renewals by result (ok, failed)",
            ["result"],
            registry=r,
        )
        self.held_jobs = Gauge(
            "harvester_replica_held_jobs",
            "active jobs this replica holds",
            ["provider"],
            registry=r,
        )
        self.fair_share = Gauge(
            "harvester_replica_fair_share_jobs",
            "active jobs of the provider in the store divided by the live replicas",
            ["provider"],
            registry=r,
        )
        self.handed_back = Counter(
            "harvester_replica_handed_back_jobs",
            "jobs handed back to the store to balance work across replicas",
            ["provider"],
            registry=r,
        )
        self.dropped = Counter(
            "harvester_replica_dropped_jobs",
            "jobs dropped because another replica holds them or the lease could not be renewed",
            ["provider"],
            registry=r,
        )

    def watch_gate(self, provider: str, closed_s: Callable[[], float]) -> None:
        """Report ``closed_s()`` (seconds ``provider``'s gate has been closed so far) as
        ``harvester_retry_after_wait_seconds_total``; a later call for the same provider
        replaces the earlier one."""
        self._gates[provider] = closed_s

    def count_unknown_status(self, provider: str, raw: str) -> None:
        """One more job seen in ``raw``, a status ``provider`` does not document. The label
        is bounded: a provider answering a new string per job cannot grow the series."""
        seen = self._unknown_seen.setdefault(provider, set())
        label = raw[:MAX_STATUS_LABEL]
        if label not in seen:
            if len(seen) >= MAX_STATUS_LABELS:
                label = OTHER_STATUS
            else:
                seen.add(label)
        self.unknown_status.labels(provider, label).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def totals(self) -> dict[str, float]:
        """Run totals over every label set: what the end-of-run summary reports."""

        def total(name: str) -> float:
            return sum(
                s.value
                for metric in self.registry.collect()
                for s in metric.samples
                if s.name == name
            )

        return {
            "requests": total("harvester_requests_total"),
            "rate_limited": total("harvester_rate_limited_total"),
            "retries": total("harvester_retries_total"),
            "downloaded_bytes": total("harvester_downloaded_bytes_total"),
            "decode_seconds": total("harvester_decode_seconds_total"),
        }


class _GateCollector(Collector):
    """``harvester_retry_after_wait_seconds_total``: seconds each provider's gate stayed
    closed after a 429/503, as its limiter counts them."""

    def __init__(self, gates: dict[str, Callable[[], float]]) -> None:
        self._gates = gates

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "harvester_retry_after_wait_seconds",
            "seconds the provider's gate stayed closed after a 429/503",
            labels=["provider"],
        )
        for provider, closed_s in sorted(self._gates.items()):
            family.add_metric([provider], closed_s())
        yield family
