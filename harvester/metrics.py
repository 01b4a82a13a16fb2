"""Prometheus metrics, one registry per engine (so tests and several engines don't collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
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
        self.gate_wait = Counter(
            "harvester_retry_after_wait_seconds",
            "seconds the provider's gate stayed closed after a 429/503",
            ["provider"],
            registry=r,
        )
        self.poll_latency = Histogram(
            "harvester_poll_latency_seconds",
            "latency of job status requests",
            ["provider"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
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
