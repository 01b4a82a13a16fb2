"""One status -> error table (``providers.base.STATUS_ERRORS``), each adapter adding its own."""

from __future__ import annotations

import pytest

from harvester.errors import (
    CredentialsError,
    InvalidPayload,
    ProtocolError,
    ProviderJobFailed,
    ProviderUnavailable,
    RateLimited,
)
from harvester.providers import bentley, cognite, modzy
from harvester.wire import Response

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
