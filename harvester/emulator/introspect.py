"""``/_emulator/*``: the emulator's evidence and controls over HTTP, for other processes.

These routes render ``EmulatorState``; an in-process test can call the same methods directly.
They are not part of any provider, so they are neither logged, rate limited nor faulted.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from harvester.emulator.responses import json_response
from harvester.emulator.scenario import ScenarioError, parse_fault
from harvester.emulator.state import EmulatorState

PREFIX = "/_emulator"
STATE_KEY = web.AppKey("emulator_state", EmulatorState)


def build_app(state: EmulatorState) -> web.Application:
    app = web.Application()
    app[STATE_KEY] = state
    r = app.router
    r.add_get("/stats", _stats)
    r.add_get("/requests", _requests)
    r.add_get("/truth/{provider}/{job_id}", _job_truth)
    r.add_get("/truth/{provider}/{reference_id}/{frame_id}", _truth)
    r.add_get("/faults", _faults)
    r.add_post("/faults", _add_fault)
    r.add_delete("/faults", _clear_faults)
    r.add_post("/reset-stats", _reset_stats)
    r.add_post("/revoke-tokens", _revoke_tokens)
    r.add_get("/scenario", _scenario)
    return app


def _state(request: web.Request) -> EmulatorState:
    return request.app[STATE_KEY]


async def _stats(request: web.Request) -> web.StreamResponse:
    return json_response(_state(request).stats())


async def _requests(request: web.Request) -> web.StreamResponse:
    try:
        since = int(request.query.get("since", "0"))
    except ValueError:
        return json_response({"error": "since must be an integer"}, 400)
    return json_response(_state(request).requests(since))


async def _truth(request: web.Request) -> web.StreamResponse:
    m = request.match_info
    try:
        labels = _state(request).truth_labels(
            m["provider"], m["reference_id"], m["frame_id"], request.query.get("sensor_id")
        )
    except KeyError:
        return json_response({"error": f"no ground truth for provider {m['provider']!r}"}, 404)
    return web.Response(
        body=orjson.dumps(labels, option=orjson.OPT_SERIALIZE_NUMPY),
        content_type="application/json",
    )


async def _job_truth(request: web.Request) -> web.StreamResponse:
    """Cognite segments by jobId, Bentley blob sha256s by job id, Modzy results by job id."""
    m = request.match_info
    try:
        doc = _state(request).job_truth(m["provider"], m["job_id"])
    except KeyError:
        return json_response(
            {"error": f"no ground truth for {m['provider']!r} job {m['job_id']!r}"}, 404
        )
    return json_response(doc)


async def _revoke_tokens(request: web.Request) -> web.StreamResponse:
    revoked = _state(request).tokens.revoke_all()
    return json_response({"ok": True, "revoked": revoked})


async def _faults(request: web.Request) -> web.StreamResponse:
    return json_response(_state(request).faults.snapshot())


async def _add_fault(request: web.Request) -> web.StreamResponse:
    try:
        doc: Any = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return json_response({"error": "body must be a JSON fault object"}, 400)
    if not isinstance(doc, dict):
        return json_response({"error": "body must be a JSON fault object"}, 400)
    if doc.get("duration_s") is None:
        doc.pop("duration_s", None)  # null = unbounded, as rendered by GET /faults
    try:
        spec = parse_fault(doc)
    except ScenarioError as exc:
        return json_response({"error": exc.message}, 400)
    _state(request).add_fault(spec)
    return json_response({"ok": True, "fault": spec.to_json()})


async def _clear_faults(request: web.Request) -> web.StreamResponse:
    _state(request).faults.clear()
    return json_response({"ok": True})


async def _reset_stats(request: web.Request) -> web.StreamResponse:
    _state(request).reset_stats()
    return json_response({"ok": True})


async def _scenario(request: web.Request) -> web.StreamResponse:
    s = _state(request).scenario
    oauth = _plain(s.oauth)
    oauth["clients"] = {client_id: "***" for client_id, _ in s.oauth.clients}
    return json_response(
        {
            "seed": s.seed,
            "playment": _without_keys(s.playment),
            "cognite": _plain(s.cognite),
            "bentley": _plain(s.bentley),
            "modzy": _without_keys(s.modzy),
            "oauth": oauth,
            "storage": s.storage,
            "faults": [f.to_json() for f in s.faults],
        }
    )


def _plain(section: Any) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(orjson.dumps(section))
    return doc


def _without_keys(section: Any) -> dict[str, Any]:
    """A section with its API keys masked: secrets never leave the process."""
    doc = _plain(section)
    doc["valid_api_keys"] = ["***"] * len(section.valid_api_keys)
    return doc
