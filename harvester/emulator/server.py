"""The emulator process: provider apps on one port, the storage host on another.

Each provider is a sub-app at its own prefix, built from ``ProviderContext`` by its entry in
``_BUILDERS``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from harvester.emulator import introspect
from harvester.emulator.bentley import BentleyApi
from harvester.emulator.cognite import CogniteApi
from harvester.emulator.modzy import ModzyApi
from harvester.emulator.oauth import TokenEndpoint
from harvester.emulator.playment import PlaymentApi
from harvester.emulator.scenario import Scenario, ScenarioError, load_scenario
from harvester.emulator.state import EmulatorState
from harvester.emulator.storage import StorageHost

MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ProviderContext:
    state: EmulatorState
    storage: StorageHost


@dataclass(frozen=True, slots=True)
class Mount:
    name: str  # key in Emulator.urls
    prefix: str  # sub-app prefix on the main port
    url_path: str  # what follows the origin in the advertised URL


MOUNTS = (
    Mount("playment", "/playment", "/playment"),
    Mount("cognite", "/cognite", "/cognite"),
    Mount("bentley", "/bentley", "/bentley"),
    Mount("modzy", "/modzy", "/modzy"),
    Mount("token", "/oauth2", "/oauth2/token"),
)

_BUILDERS: dict[str, Callable[[ProviderContext], web.Application]] = {
    "playment": lambda ctx: PlaymentApi(ctx.state, ctx.storage).build_app(),
    "cognite": lambda ctx: CogniteApi(ctx.state, ctx.storage).build_app(),
    "bentley": lambda ctx: BentleyApi(ctx.state, ctx.storage).build_app(),
    "modzy": lambda ctx: ModzyApi(ctx.state).build_app(),
    "token": lambda ctx: TokenEndpoint(ctx.state).build_app(),
}


class Emulator:
    """``async with Emulator(scenario) as emu: emu.urls["playment"] ...``"""

    def __init__(
        self,
        scenario: Scenario | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        storage_port: int = 0,
        public_host: str | None = None,
    ) -> None:
        self.scenario = scenario if scenario is not None else Scenario()
        self.host = host
        self.port = port
        self.storage_port = storage_port
        # A wildcard bind address is not something a client can connect to.
        self.public_host = public_host or ("127.0.0.1" if host in ("0.0.0.0", "", "::") else host)
        self.state = EmulatorState(self.scenario)
        self.storage = StorageHost(self.state)
        self.urls: dict[str, str] = {}
        self._runners: list[web.AppRunner] = []
        self._faults_scheduled = False

    async def start(self) -> dict[str, str]:
        if self._runners:
            raise RuntimeError("emulator already started")
        try:
            # Storage first: result URLs name it, so its address must exist before any job.
            storage_port = await self._listen(self.storage.build_app(), self.storage_port)
            self.storage.base_url = self._origin(storage_port)
            # Provider APIs decode Content-Encoding themselves (see ``bodies``).
            main_port = await self._listen(self._main_app(), self.port, auto_decompress=False)
        except BaseException:
            await self.stop()
            raise
        origin = self._origin(main_port)
        self.urls = {m.name: origin + m.url_path for m in MOUNTS}
        self.urls["storage"] = self.storage.base_url
        if not self._faults_scheduled:  # windows count from the first start
            self._faults_scheduled = True
            for spec in self.scenario.faults:
                self.state.add_fault(spec)
        return self.urls

    async def stop(self) -> None:
        runners, self._runners = self._runners, []
        for runner in reversed(runners):
            await runner.cleanup()

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _main_app(self) -> web.Application:
        # Point-cloud create bodies list every frame with its poses: far above aiohttp's 1 MB.
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        ctx = ProviderContext(self.state, self.storage)
        for mount in MOUNTS:
            app.add_subapp(mount.prefix, _BUILDERS[mount.name](ctx))
        app.add_subapp(introspect.PREFIX, introspect.build_app(self.state))
        return app

    async def _listen(self, app: web.Application, port: int, **server_kw: Any) -> int:
        runner = web.AppRunner(app, handle_signals=False, access_log=None, **server_kw)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.host, port)
        await site.start()
        return int(runner.addresses[0][1])

    def _origin(self, port: int) -> str:
        host = f"[{self.public_host}]" if ":" in self.public_host else self.public_host
        return f"http://{host}:{port}"


def main(host: str, port: int, scenario_path: str | None, storage_port: int = 0) -> int:
    """Serve until SIGINT/SIGTERM. Once listening, stdout gets exactly one JSON line of URLs;
    everything else goes to stderr. Returns the process exit code."""
    try:
        scenario = load_scenario(scenario_path)
    except ScenarioError as exc:
        print(f"harvester emulator: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(scenario, host, port, storage_port))
    except OSError as exc:
        print(f"harvester emulator: cannot listen on {host}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a signal that arrived before the handlers were installed
        pass
    return 0


async def _serve(scenario: Scenario, host: str, port: int, storage_port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Emulator(scenario, host=host, port=port, storage_port=storage_port) as emu:
        sys.stdout.write(json.dumps(emu.urls) + "\n")
        sys.stdout.flush()
        print(f"harvester emulator: listening, {json.dumps(emu.urls)}", file=sys.stderr)
        await stop.wait()
        print("harvester emulator: stopping", file=sys.stderr)
