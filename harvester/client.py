"""The Python API: harvester from a notebook or a pipeline, on the CLI's engine and store.

``Harvester`` is an async context manager over a config (a path, or a ``Config`` built in
code). Entering it does what ``harvester run`` does before its first request: checks the
secrets and that output.dir can be written, takes the engine lock of a sqlite store, opens
the store, binds output.dir to it, and starts the same ``Engine`` in the background; leaving
it drains the engine (in-flight work finishes within ``server.drain_grace_s``; the rest
resumes on the next start) and closes the store. Submitting, cancelling and retrying go
through the store and ``harvester.control`` exactly as the CLI and the daemon do.

``clock`` and ``exchanges`` are the engine's own seams, passed through: a ``Clock`` every wait
goes through (default the real one) and an ``ExchangeFactory`` that carries each provider's
bytes (default the real network). With a ``FakeClock`` and ``harvester.testing``'s
``MemoryNetwork`` the whole client runs on virtual time against providers in memory: a
pipeline's tests take milliseconds and never touch a socket.

``SyncHarvester`` is the same client for code without an event loop, and for Jupyter, whose
loop is already running in the notebook's thread: it runs the async client on a private
event loop in a worker thread and waits for each call there.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import numpy as np
import orjson
from numpy.typing import NDArray

from harvester.clock import Clock, wait_for
from harvester.config import Config, load_config
from harvester.errors import ControlError
from harvester.jobs import Job, JobState, job_key

if TYPE_CHECKING:
    from harvester.exchange import ExchangeFactory  # aiohttp: imported when the engine starts

__all__ = ["Harvester", "JobSpec", "SyncHarvester"]

T = TypeVar("T")
#: how long ``cancel`` waits for the provider before it reports the cancel as pending
CANCEL_WAIT_S = 20.0
#: the longest a waiter sleeps without a change: also sees changes other processes make
_LOOK_S = 1.0


@dataclass(frozen=True)
class JobSpec:
    """One job, as a line of a jobs file says it (``reference_id`` for new remote work, or
    ``job_id`` to track a remote job that already exists)."""

    provider: str
    reference_id: str | None = None
    payload: Mapping[str, Any] | None = None
    job_id: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def as_line(self) -> dict[str, Any]:
        line: dict[str, Any] = {"provider": self.provider, **self.extra}
        for name in ("reference_id", "payload", "job_id"):
            value = getattr(self, name)
            if value is not None:
                line[name] = dict(value) if isinstance(value, Mapping) else value
        return line


class Harvester:
    """``async with Harvester("harvester.toml") as h:`` (see the module docstring).

    ``providers``: work only these (default every configured one). ``clock``: the ``Clock``
    the engine and every wait of this client use (default the system clock). ``exchanges``:
    the ``ExchangeFactory`` that carries the providers' requests (default the real network
    through aiohttp); limiter, retries, store and harvest stay the production code.
    """

    def __init__(
        self,
        config: Config | str | Path,
        *,
        providers: Sequence[str] | None = None,
        clock: Clock | None = None,
        exchanges: ExchangeFactory | None = None,
    ):
        self.config = config if isinstance(config, Config) else load_config(Path(config))
        self.providers = list(providers) if providers is not None else None
        self.clock = clock
        self.exchanges = exchanges
        self._stack: contextlib.AsyncExitStack | None = None
        self._changed: anyio.Event  # both made on entry: anyio needs the running loop
        self._stop: anyio.Event

    def _on_change(self, job: Job | None) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    # -- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> Harvester:
        from harvester.engine import Engine
        from harvester.fsutil import check_writable
        from harvester.store import make_store
        from harvester.store.binding import bind_output, store_name
        from harvester.store.lock import engine_lock

        cfg = self.config
        self._changed = anyio.Event()
        self._stop = anyio.Event()
        cfg.check_secrets()
        await anyio.to_thread.run_sync(check_writable, cfg.output.dir)
        async with contextlib.AsyncExitStack() as stack:
            stack.enter_context(engine_lock(cfg.store, "harvester (Python API)"))
            self.store = make_store(cfg.store)
            await self.store.open()
            stack.push_async_callback(self.store.close)
            await bind_output(self.store, cfg.output.dir, store_name(cfg.store))
            self.engine = Engine(
                cfg,
                self.store,
                providers=self.providers,
                burst=False,
                on_change=self._on_change,
                clock=self.clock,
                exchanges=self.exchanges,
            )
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(self._stop.set)  # runs first on exit: the engine drains
            tg.start_soon(self._run, name="harvester-engine")
            # Real time: bounds the start's I/O (store, credentials, providers' setup).
            with anyio.fail_after(max(60.0, cfg.server.drain_grace_s)):
                await self._ready()
            self._stack = stack.pop_all()
        return self

    async def _run(self) -> None:
        await self.engine.run(stop=self._stop)
        self._stop.set()
        self._on_change(None)

    async def _ready(self) -> None:
        async with anyio.create_task_group() as tg:

            async def stopped() -> None:
                await self._stop.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(stopped)
            await self.engine.ready.wait()
            tg.cancel_scope.cancel()
        if not self.engine.ready.is_set():
            raise ControlError(f"the engine stopped while starting: {self.engine.fatal}")

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.__aexit__(et, exc, tb)

    # -- jobs ------------------------------------------------------------------------------
    async def submit(self, jobs: Iterable[JobSpec | Mapping[str, Any]]) -> list[Job]:
        """Add jobs (checked as a jobs file's lines are: a bad one adds nothing, one
        ``JobsFileError`` naming every bad line); the stored jobs, in the given order. A job
        already in the store is not added again."""
        from harvester.jobsfile import parse_jobs_text

        lines = [j.as_line() if isinstance(j, JobSpec) else dict(j) for j in jobs]
        text = b"\n".join(orjson.dumps(line) for line in lines)
        validators = {name: lane.provider for name, lane in self.engine.lanes.items()}
        new = parse_jobs_text(text, source="python", config=self.config, validators=validators)
        await self.store.add_jobs(new, now=self.engine.clock.wall())
        await self.engine.refresh()
        out = []
        for job in new:
            stored = await self.store.get(job.provider, job.key)
            assert stored is not None
            out.append(stored)
        return out

    async def get(self, provider: str, key: str) -> Job:
        job = await self.store.get(provider, key)
        if job is None:
            job = await self.store.get(provider, job_key(key))
        if job is None:
            raise ControlError(f"{provider}/{key}: no such job")
        return job

    async def jobs(
        self,
        *,
        provider: str | None = None,
        states: Sequence[JobState | str] | None = None,
        since: float | None = None,
    ) -> AsyncIterator[Job]:
        """Every matching job, read a page at a time (never the whole store at once)."""
        from harvester.cli_control import walk

        wanted = [JobState(s) for s in states] if states is not None else None
        async for job in walk(self.store, provider=provider, states=wanted, since=since):
            yield job

    async def changes(self, jobs: Iterable[Job | tuple[str, str]]) -> AsyncIterator[Job]:
        """Each of ``jobs`` every time its state changes, until all are terminal."""
        keys = [(j.provider, j.key) if isinstance(j, Job) else j for j in jobs]
        seen: dict[tuple[str, str], JobState] = {}
        while True:
            changed = self._changed
            for provider, key in keys:
                job = await self.get(provider, key)
                if seen.get((provider, key)) != job.state:
                    seen[provider, key] = job.state
                    yield job
            if all(JobState(s) in _ENDED for s in seen.values()):
                return
            if self._stop.is_set():
                raise ControlError(f"the engine stopped: {self.engine.fatal or 'closed'}")
            await wait_for(self.engine.clock, changed, _LOOK_S)

    async def wait(
        self, jobs: Iterable[Job | tuple[str, str]], *, limit_s: float | None = None
    ) -> list[Job]:
        """The jobs once every one is terminal (``TimeoutError`` after ``limit_s``)."""
        keys = [(j.provider, j.key) if isinstance(j, Job) else j for j in jobs]
        if limit_s is None:
            await self._follow(keys)
        else:
            with self.engine.clock.move_on_after(limit_s) as limit:
                await self._follow(keys)
            if limit.cancelled_caught:
                raise TimeoutError(f"the jobs had not all ended after {limit_s:g} s")
        return [await self.get(p, k) for p, k in keys]

    async def _follow(self, keys: list[tuple[str, str]]) -> None:
        async for _ in self.changes(keys):
            pass

    async def cancel(self, provider: str, key: str) -> Job:
        """Cancel one job (at the provider where it can); ``ControlError`` if refused."""
        job = await self.get(provider, key)
        req = await self.engine.cancel(provider, job.key, wait_s=CANCEL_WAIT_S)
        if req.job is not None:
            return req.job
        raise ControlError(req.error or f"{job.label}: the provider has not answered the cancel")

    async def retry(self, provider: str, key: str, *, resubmit: bool = False) -> Job:
        """Put an ended job back to work (see ``harvester retry``); ``ControlError`` if its
        state does not allow it (nothing changed)."""
        from harvester.control import retry_resume

        job = await self.get(provider, key)
        return await retry_resume(self.engine, job, resubmit=resubmit)

    # -- results ---------------------------------------------------------------------------
    async def output(self, provider: str, key: str) -> str:
        """Where a harvested job's folder is: its path, or its URL when ``output.dir`` is in
        object storage (``s3://bucket/prefix/<provider>/<key>``), as ``GET /jobs/...`` says."""
        job = await self.get(provider, key)
        if job.state != JobState.HARVESTED or job.output is None:
            raise ControlError(f"{job.label} is {job.state.value}, not harvested: no output yet")
        if self.config.output.url is not None:
            return f"{self.config.output.url.rstrip('/')}/{job.output}"
        return str(self.config.output.dir / job.output)

    async def files(self, provider: str, key: str) -> dict[str, Path]:
        """A harvested job's files (relative path -> absolute path), from its MANIFEST; for
        output in object storage use ``output()`` (its URL) and the store's own client."""
        job = await self.get(provider, key)
        if self.config.output.url is not None:
            raise ControlError(
                f"{job.label}: output.dir is {self.config.output.url}, not a local folder:"
                " read the job through its URL (Harvester.output)"
            )
        return await anyio.to_thread.run_sync(_manifest_files, self.config, job)

    async def arrays(self, provider: str, key: str) -> dict[str, NDArray[Any]]:
        """A harvested job's ``.npy`` files loaded (``labels/<frame>.npy`` -> array)."""
        files = await self.files(provider, key)

        def load() -> dict[str, NDArray[Any]]:
            return {
                rel: np.load(path, allow_pickle=False)
                for rel, path in files.items()
                if rel.endswith(".npy")
            }

        return await anyio.to_thread.run_sync(load)


_ENDED = frozenset({JobState.HARVESTED, JobState.FAILED, JobState.CANCELLED, JobState.ERROR})


def _manifest_files(config: Config, job: Job) -> dict[str, Path]:
    from harvester.harvest import MANIFEST

    if job.state != JobState.HARVESTED or job.output is None:
        raise ControlError(f"{job.label} is {job.state.value}, not harvested: no files yet")
    folder = config.output.dir / job.output
    manifest = orjson.loads((folder / MANIFEST).read_bytes())
    return {rel: folder / rel for rel in sorted(manifest["files"])}


class SyncHarvester:
    """``with SyncHarvester("harvester.toml") as h:`` the methods of ``Harvester``, blocking,
    on a private event loop in a worker thread (so it also works under Jupyter's loop)."""

    def __init__(self, config: Config | str | Path, *, providers: Sequence[str] | None = None):
        self._client = Harvester(config, providers=providers)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="harvester-client", daemon=True
        )

    @property
    def config(self) -> Config:
        return self._client.config

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _main(self, ready: Future[None]) -> None:
        # One task enters and leaves the client: its task group and lock belong to it.
        try:
            async with self._client:
                self._closing = asyncio.Event()
                ready.set_result(None)
                await self._closing.wait()
        except BaseException as exc:
            if ready.done():
                raise
            ready.set_exception(exc)

    def __enter__(self) -> SyncHarvester:
        self._thread.start()
        ready: Future[None] = Future()
        self._main_done = asyncio.run_coroutine_threadsafe(self._main(ready), self._loop)
        try:
            ready.result()
        except BaseException:
            self._shut()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._loop.call_soon_threadsafe(self._closing.set)
            self._main_done.result()
        finally:
            self._shut()

    def _shut(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()

    def submit(self, jobs: Iterable[JobSpec | Mapping[str, Any]]) -> list[Job]:
        return self._call(self._client.submit(list(jobs)))

    def get(self, provider: str, key: str) -> Job:
        return self._call(self._client.get(provider, key))

    def jobs(
        self,
        *,
        provider: str | None = None,
        states: Sequence[JobState | str] | None = None,
        since: float | None = None,
    ) -> Iterator[Job]:
        """Every matching job, fetched a page at a time as the iteration goes."""
        it = self._client.jobs(provider=provider, states=states, since=since)

        async def step() -> Job:
            return await anext(it)

        while True:
            try:
                yield self._call(step())
            except StopAsyncIteration:
                return

    def wait(
        self, jobs: Iterable[Job | tuple[str, str]], *, limit_s: float | None = None
    ) -> list[Job]:
        return self._call(self._client.wait(list(jobs), limit_s=limit_s))

    def cancel(self, provider: str, key: str) -> Job:
        return self._call(self._client.cancel(provider, key))

    def retry(self, provider: str, key: str, *, resubmit: bool = False) -> Job:
        return self._call(self._client.retry(provider, key, resubmit=resubmit))

    def output(self, provider: str, key: str) -> str:
        return self._call(self._client.output(provider, key))

    def files(self, provider: str, key: str) -> dict[str, Path]:
        return self._call(self._client.files(provider, key))

    def arrays(self, provider: str, key: str) -> dict[str, NDArray[Any]]:
        return self._call(self._client.arrays(provider, key))
