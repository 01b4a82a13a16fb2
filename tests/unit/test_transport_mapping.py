"""``map_exceptions`` is the one place foreign exceptions become harvester errors."""

from __future__ import annotations

import errno
import ssl

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict

from harvester.errors import HarvesterError, InvalidPayload, NetworkError
from harvester.transport import _marked_retryable, map_exceptions, safe_url
from harvester.wire import RequestSpec, Response

KEY = ConnectionKey("h", 1, False, True, None, None, None)

FOREIGN: list[BaseException] = [
    TimeoutError(),
    aiohttp.ClientPayloadError("Response payload is not completed"),
    aiohttp.ClientConnectorError(KEY, OSError(111, "Connection refused")),
    aiohttp.ServerDisconnectedError(),
    aiohttp.ClientOSError(104, "Connection reset by peer"),
    aiohttp.ServerTimeoutError("read timeout"),
    aiohttp.ClientResponseError(None, (), status=400),  # type: ignore[arg-type]
    aiohttp.InvalidURL("http://"),
    aiohttp.ClientError("anything else"),
    ssl.SSLError("bad handshake"),
    ConnectionResetError(),
    OSError("disk?"),
]


@pytest.mark.anyio
@pytest.mark.parametrize("exc", FOREIGN, ids=lambda e: type(e).__name__)
async def test_every_foreign_exception_becomes_a_network_error(exc: BaseException) -> None:
    url = "http://storage:9/x/mask.txt?X-Amz-Signature=SECRET"
    with pytest.raises(NetworkError) as info:
        async with map_exceptions("playment", url, job="scan-1"):
            raise exc
    text = str(info.value)
    assert "playment" in text and "scan-1" in text
    assert "SECRET" not in text
    assert info.value.__cause__ is None or not isinstance(info.value.__cause__, HarvesterError)


@pytest.mark.anyio
async def test_our_own_errors_pass_through_untouched() -> None:
    original = InvalidPayload("bad", provider="playment")
    with pytest.raises(InvalidPayload) as info:
        async with map_exceptions("playment", "http://x"):
            raise original
    assert info.value is original


def test_safe_url_drops_query_and_fragment() -> None:
    assert safe_url("https://h:1/a/b?sig=1#f") == "https://h:1/a/b"


@pytest.mark.parametrize(
    ("header", "value", "marked"),
    [
        ("cdf-is-auto-retryable", "true", True),
        ("CDF-Is-Auto-Retryable", " True ", True),
        ("cdf-is-auto-retryable", "false", False),  # the Python SDK would retry; we do not
        ("cdf-is-auto-retryable", "", False),
        ("x-other", "true", False),
    ],
)
def test_an_answer_is_marked_retryable_only_by_the_specs_header_set_true(
    header: str, value: str, marked: bool
) -> None:
    spec = RequestSpec("POST", "https://x/segment", "create", idempotent=False,
                       retry_header="cdf-is-auto-retryable")  # fmt: skip
    answer = Response(500, CIMultiDict({header: value}), b"{}", "https://x/segment")
    assert _marked_retryable(answer, spec) is marked
    unmarked_spec = RequestSpec("POST", "https://x/segment", "create", idempotent=False)
    assert _marked_retryable(answer, unmarked_spec) is False


@pytest.mark.anyio
async def test_a_streaming_callers_own_disk_error_is_not_a_network_error() -> None:
    """``open_stream``'s caller reads the body, and writes it to disk, inside the mapping's
    scope: a full disk there was reported as a network error and retried as one."""
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    guard = map_exceptions("playment", "http://storage:9/x/mask.txt", job="scan-1")
    guard.in_caller = True
    with pytest.raises(OSError) as info:
        async with guard:
            raise disk_full
    assert info.value is disk_full
    # What the network does while the caller reads the body is still a network error.
    for exc in (
        aiohttp.ClientPayloadError("cut"),
        aiohttp.ClientOSError(104, "Connection reset by peer"),
        ConnectionResetError(),
        TimeoutError(),
    ):
        with pytest.raises(NetworkError):
            async with guard:
                raise exc
