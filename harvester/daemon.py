"""The long-running service (``harvester run``): the engine, the HTTP API, signals and drain.

One task group holds the daemon's root tasks, each named for its role:

    signals       first SIGTERM/SIGINT sets ``stop``; a second one cancels everything
    http-server   the API, probes and metrics (``harvester.api``), started with ``tg.start``
                  so nothing else starts before the port is bound
    engine        ``Engine.run(stop=...)`` in daemon mode (``burst=False``)
    refresher     tells the engine about jobs the API added, bursts coalesced
    announcer     logs "ready" once the engine has loaded the store
    throughput-sampler  samples two counters every few seconds for the status page's rates

When the engine returns (drained after a stop, or a fatal error) the group is cancelled: the
HTTP server stops last among the tasks, so ``/readyz`` answers 503 for the whole drain, then
the store is closed. Stopping is safe at any point, even on the second signal: each state
change is an atomic SQLite commit and output files only get their final names once complete.

Signals and exit codes are ``harvester.lifecycle``'s, as for ``harvest``: 0 after a signal
and drain; 2 (via ``FatalError``) for a bad config, a port that cannot be bound or a fatal
error at run time; 3 when a second signal cut the drain short.
"""

from __future__ import annotations

import functools
from typing import Any

import anyio
from anyio.abc import TaskStatus

from harvester.api import Api
from harvester.config import Config
from harvester.engine import Engine
from harvester.errors import ConfigError, FatalError, HarvesterError
from harvester.httpserver import serve_http
from harvester.lifecycle import Exit, Shutdown, opened
from harvester.logs import get_logger
from harvester.objstore import output_place
from harvester.store.base import Store
from harvester.store.binding import ensure_marker, store_binding, store_name
from harvester.store.lock import engine_lock

log = get_logger("harvester.daemon")


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` / ``"[::]:8080"`` -> (host, port); the config checked the shape."""
    host, _, port = listen.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


async def serve(config: Config) -> int:
    """Run the daemon until signalled; returns the exit code or raises ``FatalError``."""
    config.check_secrets()  # a missing secret stops us before anything is opened
    if not config.providers:
        log.warning("no providers configured: the daemon will not become ready")
    # One engine per sqlite store (a second one would take our in-flight creates for lost).
    with engine_lock(config.store):
        was_open = False
        try:
            async with opened(config) as store:
                was_open = True
                # Before anything is sent: a store that is not the output's is refused. The
                # marker is written by the engine once output.dir proves writable (the daemon
                # may start on a read-only or full disk and wait for it, not ready).
                where = store_name(config.store)
                place = output_place(config.output)
                store_id = await store_binding(store, place, where)
                daemon = Daemon(config, store)
                daemon.engine.output_ready = functools.partial(
                    ensure_marker, place, store_id, where
                )
                return await daemon.run()
        finally:
            if was_open:
                log.info("store closed")


class Daemon:
    """One run of the service over an open store; ``run()`` returns the exit code."""

    def __init__(self, config: Config, store: Store, *, engine: Engine | None = None) -> None:
        self.config = config
        self.store = store
        self.engine = engine or Engine(config, store, burst=False)
        self.host, self.port = parse_listen(config.server.listen)
        self.shutdown = Shutdown()
        #: set by the first signal: readiness turns false at once and the engine drains
        self.stop = self.shutdown.stop
        self.fatal: HarvesterError | None = None
        self.url: str | None = None
        self._refresh_wanted = anyio.Event()
        token = config.server.token.reveal() if config.server.token is not None else None
        self.api = Api(
            config=config,
            store=store,
            engine=self.engine,
            stopping=self.stop.is_set,
            jobs_added=self._request_refresh,
            token=token,
            on_body_timeout=self.engine.metrics.http_closed.labels("body_timeout").inc,
        )

    async def run(self) -> int:
        log.info(
            "daemon starting",
            listen=self.config.server.listen,
            providers=sorted(self.config.providers),
            drain_grace_s=self.engine.drain_grace_s,
            # (a key naming "token" would be redacted by the log pipeline, value and all)
            job_api_auth="bearer" if self.config.server.token is not None else "none",
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                functools.partial(self.shutdown.watch, grace_s=self.engine.drain_grace_s),
                tg.cancel_scope,
                name="signals",
            )
            try:
                self.url = await tg.start(self._http_server, name="http-server")
            except OSError as exc:
                self.fatal = ConfigError(
                    f"server.listen {self.config.server.listen}: cannot listen:"
                    f" {exc.strerror or exc}"
                )
                tg.cancel_scope.cancel()
            else:
                tg.start_soon(self._engine, tg.cancel_scope, name="engine")
                tg.start_soon(self._refresher, name="refresher")
                tg.start_soon(self._announce, name="announcer")
                tg.start_soon(self.api.throughput.run, name="throughput-sampler")
        if self.fatal is not None:
            raise self.fatal if isinstance(self.fatal, FatalError) else FatalError(str(self.fatal))
        forced = self.shutdown.forced
        log.info("daemon stopped", forced=forced, unfinished=len(self.engine.remaining))
        return Exit.INTERRUPTED if forced else Exit.OK

    async def _http_server(self, *, task_status: TaskStatus[str]) -> None:
        closed = self.engine.metrics.http_closed
        async with serve_http(
            self.api.build_app(),
            self.config.server,
            self.host,
            self.port,
            on_close=lambda reason: closed.labels(reason).inc(),
        ) as url:
            log.info("http server listening", url=url)
            task_status.started(url)
            await anyio.sleep_forever()

    async def _engine(self, scope: anyio.CancelScope) -> None:
        try:
            await self.engine.run(stop=self.stop)
        except* HarvesterError as group:
            self.fatal = _first(group)
            log.error("stopping: fatal error", error=str(self.fatal))
        finally:
            # Whatever ended the engine ends the daemon: a server without an engine would
            # accept jobs nobody works on.
            scope.cancel()

    def _request_refresh(self) -> None:
        self._refresh_wanted.set()

    async def _refresher(self) -> None:
        # One reload per burst of POSTs: a reload reads every active job, so a client
        # posting one job at a time must not trigger one reload each.
        while True:
            await self._refresh_wanted.wait()
            await self.engine.ready.wait()
            self._refresh_wanted = anyio.Event()
            try:
                await self.engine.refresh()
            except HarvesterError as exc:  # the engine's feeder retries within seconds
                log.warning("could not pick up new jobs now", error=str(exc))

    async def _announce(self) -> None:
        await self.engine.ready.wait()
        log.info("daemon ready", url=self.url, active_jobs=len(self.engine.remaining))


def _first(group: BaseExceptionGroup[Any]) -> HarvesterError:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, HarvesterError)
    return exc
