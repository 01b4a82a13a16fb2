"""Placeholder apps for providers this emulator version does not imitate yet.

They sit at their final prefixes, so the URLs the emulator prints are already the real ones and
a provider module later replaces the stub without touching anything else.
"""

from __future__ import annotations

from aiohttp import web

from harvester.emulator.middleware import provider_middlewares
from harvester.emulator.responses import json_response
from harvester.emulator.state import EmulatorState

_MESSAGE = "not implemented in this emulator version"


def not_implemented_app(provider: str, state: EmulatorState) -> web.Application:
    app = web.Application(middlewares=provider_middlewares(provider, state, _render_error))
    app.router.add_route("*", "/{tail:.*}", _not_implemented)
    return app


async def _not_implemented(request: web.Request) -> web.StreamResponse:
    return json_response({"error": _MESSAGE}, 501)


def _render_error(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.StreamResponse:
    return json_response({"error": message}, status, headers)
