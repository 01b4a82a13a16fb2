"""One status -> error table (``harvester.statuses``) for the transport and every adapter,
each adapter adding only its own codes."""

from __future__ import annotations

import orjson
import pytest
from aiohttp import web

from harvester.clock import SystemClock
from harvester.config import PlaymentConfig
from harvester.credentials import make_auth
from harvester.errors import (
    CredentialsError,
    InvalidPayload,
    ProtocolError,
    ProviderJobFailed,
    ProviderUnavailable,
    RateLimited,
)
from harvester.metrics import Metrics
from harvester.providers import bentley, cognite, modzy
from harvester.providers.playment import PlaymentProvider
from harvester.ratelimit import ProviderLimiter
from harvester.statuses import error_for_status, is_transient
from harvester.transport import Transport
from harvester.wire import RequestSpec, Response
from tests.loopback import serving
from tests.unit.test_playment_adapter import CFG as PLAYMENT
from tests.unit.test_playment_adapter import job as playment_job

ADAPTERS = [bentley.error_from, cognite.error_from, modzy.error_from]
SHARED = {
    400: InvalidPayload,
    401: CredentialsError,
    403: CredentialsError,
    409: InvalidPayload,
    422: InvalidPayload,
    429: RateLimited,
    500: ProviderUnavailable,
    503: ProviderUnavailable,
    418: ProtocolError,
}


def _resp(status: int) -> Response:
    return Response(status, {}, b"{not json: a {brace} stays}", "https://api.example/x", "rid-1")


@pytest.mark.parametrize("error_from", ADAPTERS)
@pytest.mark.parametrize(("status", "cls"), SHARED.items())
def test_every_adapter_classifies_the_shared_statuses_alike(
    error_from: object, status: int, cls: type
) -> None:
    err = error_from(_resp(status), None, "poll")  # type: ignore[operator]
    assert type(err) is cls
    assert (err.status, err.request_id) == (status, "rid-1")
    assert "{not json: a {brace} stays}" in err.message  # provider text is not a template


def test_adapters_add_only_their_own_codes() -> None:
    assert type(modzy.error_from(_resp(404), None, "create")) is InvalidPayload
    assert type(modzy.error_from(_resp(404), None, "poll")) is ProviderJobFailed
    assert str(modzy.error_from(_resp(401), None, "poll").message).startswith("API key refused")
    assert (
        "Cognite does not know this job id" in cognite.error_from(_resp(404), None, "poll").message
    )
    late = bentley.error_from(
        Response(429, {"Retry-After": "7"}, b"", "https://api.example/x"), None, "poll"
    )
    assert isinstance(late, RateLimited) and late.retry_after == 7.0


def _playment_error(status: int, code: str | None) -> Exception:
    body = {"success": False, "error": {"code": code, "message": "{not a {template}}"}}
    answer = Response(status, {}, orjson.dumps(body), "https://api.example/x", "rid-1")
    with pytest.raises(Exception) as info:
        PlaymentProvider(PLAYMENT).parse_find(answer, playment_job())
    return info.value


@pytest.mark.parametrize(("status", "cls"), [*SHARED.items(), (404, ProviderJobFailed)])
def test_playment_classifies_the_shared_statuses_alike(status: int, cls: type) -> None:
    """Playment's envelope without a code of its own: the shared table decides."""
    err = _playment_error(status, None)
    assert type(err) is cls
    assert "{not a {template}}" in str(err) or is_transient(status)


@pytest.mark.parametrize(
    ("code", "status", "cls"),
    [
        ("auth-failure", 400, CredentialsError),
        ("FS_0008", 400, ProviderUnavailable),
        ("api_error", 200, ProviderUnavailable),  # a 200 with success false is an error too
        ("FS_0002", 200, InvalidPayload),
        ("GE_0001", 404, InvalidPayload),  # its code says more than the status
        ("no-such-code", 200, ProtocolError),
    ],
)
def test_playment_adds_only_its_own_codes(code: str, status: int, cls: type) -> None:
    err = _playment_error(status, code)
    assert type(err) is cls and err.code == code  # type: ignore[attr-defined]


TRANSIENT = [429, 500, 502, 503, 504, 507]


@pytest.mark.anyio
@pytest.mark.parametrize("status", [*TRANSIENT, 400, 404, 409])
async def test_the_transport_raises_the_tables_error_for_transient_statuses(
    status: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real HTTP on loopback: 429 and 5xx are raised by the transport itself (the gate closes
    for every request), as the table says; anything else goes to the adapter's parse."""
    monkeypatch.setenv(PLAYMENT.api_key.env or "", "k")

    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text="{brace}", headers={"Retry-After": "7"})

    async with serving(handle) as origin:
        cfg = PlaymentConfig(name="playment", base_url=f"{origin}/", api_key=PLAYMENT.api_key,
                             project_id="p1", max_retries=0)  # fmt: skip
        clock = SystemClock()
        limiter = ProviderLimiter("playment", rate_per_s=0, burst=1, max_concurrency=1,
                                  clock=clock)  # fmt: skip
        async with Transport(
            cfg, auth=make_auth(cfg), limiter=limiter, clock=clock, metrics=Metrics()
        ) as transport:
            spec = RequestSpec("POST", f"{origin}/v1/x", "create", idempotent=False)
            if not is_transient(status):
                assert await transport.call(spec, lambda r: r.status) == status
                return
            with pytest.raises(Exception) as info:
                await transport.call(spec, lambda r: r.status)
    expected = error_for_status(status, "m", endpoint="create", retry_after=None)
    assert type(info.value) is type(expected)
    assert "{brace}" in str(info.value) and "create" in str(info.value)
    # Only 429 and 503 name a deadline; a 500's Retry-After is left to backoff.
    assert info.value.retry_after == (7.0 if status in (429, 503) else None)  # type: ignore[attr-defined]
