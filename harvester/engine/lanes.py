"""The lanes: one per provider, opened before a run and closed after it.

A lane is the provider's adapter, its transport (one session, one limiter) and its poll
scheduler (``harvester.lane``). Opening one also restores or makes the provider's one-off
setup (a Playment batch), retried while the provider is unreachable: a daemon must not
crash-loop because a provider is down when it starts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

import anyio

from harvester.clock import Clock, wait_for
from harvester.config import Config
from harvester.credentials import credentials_for
from harvester.durations import DurationStats
from harvester.engine.view import View
from harvester.errors import FatalError, HarvesterError, RetryableError
from harvester.exchange import ExchangeFactory
from harvester.lane import Lane
from harvester.logs import get_logger
from harvester.metrics import Metrics
from harvester.pollsched import PollScheduler
from harvester.providers import make_provider
from harvester.ratelimit import ProviderLimiter, backoff_delay
from harvester.transport import Transport

__all__ = ["Opens", "Transports", "setup_provider", "setup_until_done"]

log = get_logger("harvester.engine")


class Opens(Protocol):
    """What opening the lanes reads of the engine."""

    @property
    def names(self) -> Sequence[str]:
        """The providers worked."""
        ...

    @property
    def config(self) -> Config: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def rng(self) -> random.Random: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def exchanges(self) -> ExchangeFactory | None: ...

    @property
    def durations(self) -> DurationStats: ...


class Transports:
    """Opens one transport (session + limiter) per lane and closes them all on exit."""

    def __init__(self, engine: Opens) -> None:
        self.engine = engine
        self.opened: list[Transport] = []

    async def __aenter__(self) -> dict[str, Lane]:
        lanes: dict[str, Lane] = {}
        e = self.engine
        try:
            for name in e.names:
                cfg = e.config.providers[name]
                provider = make_provider(cfg)
                limiter = ProviderLimiter(
                    name,
                    rate_per_s=cfg.rate_per_s,
                    burst=cfg.burst,
                    max_concurrency=cfg.max_concurrency,
                    clock=e.clock,
                    backoff_base=cfg.backoff_base_s,
                    backoff_cap=cfg.backoff_max_s,
                    rng=e.rng,
                )
                transport = Transport(
                    cfg,
                    credentials=credentials_for(cfg, e.clock),
                    limiter=limiter,
                    clock=e.clock,
                    metrics=e.metrics,
                    rng=e.rng,
                    exchange=None if e.exchanges is None else e.exchanges(cfg),
                )
                await transport.__aenter__()
                self.opened.append(transport)
                ladder = provider.ladder()
                polls: PollScheduler[str] = PollScheduler(
                    floor_s=cfg.poll_min_s,  # rungs below it are raised to it
                    ladder=None if ladder is None else [min(x, cfg.poll_max_s) for x in ladder],
                    stats=e.durations,
                    rate_per_s=cfg.rate_per_s,
                    burst=cfg.burst,
                    budget_share=cfg.poll_budget_share,
                )
                lanes[name] = Lane(name, provider, transport, polls)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return lanes

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            for transport in self.opened:
                await transport.__aexit__(None, None, None)
        self.opened.clear()


async def setup_until_done(v: View, lane: Lane, stop: anyio.Event | None) -> bool:
    """Provider setup, retried while the provider is unreachable (a daemon must not
    crash-loop because a provider is down at start). False if stopped meanwhile."""
    failures = 0
    while True:
        try:
            await setup_provider(v, lane)
            return True
        except RetryableError as exc:
            failures += 1
            delay = exc.retry_after or backoff_delay(
                failures - 1,
                base=lane.transport.cfg.backoff_base_s,
                cap=lane.transport.cfg.backoff_max_s,
                rng=v.rng,
            )
            log.warning(
                "provider setup failed; retrying",
                provider=lane.name,
                error=str(exc),
                delay_s=round(delay, 2),
                attempt=failures,
            )
            if await wait_for(v.clock, stop or anyio.Event(), delay):
                return False
        except FatalError:
            raise
        except HarvesterError as exc:
            raise FatalError(f"setting up {lane.name} failed: {exc}") from None


async def setup_provider(v: View, lane: Lane) -> None:
    value = await v.store.get_meta(lane.provider.setup_key)
    if value is not None:
        lane.provider.restore_setup(value)
        return
    spec = lane.provider.setup_spec()
    if spec is None:
        return
    value = await lane.transport.call(spec, lane.provider.parse_setup)
    # Replicas starting together may each have set up: the first value recorded wins,
    # so every replica reconciles against the same batch. The losers' setups (an empty
    # Playment batch) stay unused.
    kept = await v.ownership.keep_setup(lane.provider.setup_key, value)
    if kept != value:
        lane.provider = make_provider(lane.transport.cfg)
        lane.provider.restore_setup(kept)
    log.info("provider set up", provider=lane.name, setup=lane.provider.setup_key)
