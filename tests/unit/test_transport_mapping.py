"""``map_exceptions`` is the one place foreign exceptions become harvester errors."""

from __future__ import annotations

import errno
import io
import ssl

import aiohttp
import pytest
from aiohttp import web
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict

from harvester.clock import SystemClock
from harvester.config import PlaymentConfig, SecretRef
from harvester.credentials import make_auth
from harvester.errors import InvalidPayload, NetworkError
from harvester.logs import configure, get_logger
from harvester.metrics import Metrics
from harvester.ratelimit import ProviderLimiter
from harvester.transport import Transport, _mapped, _marked_retryable, map_exceptions, safe_url
from harvester.wire import RequestSpec, Response
from tests.loopback import serving

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
    assert info.value.__cause__ is exc  # kept: what the network said, for a traceback


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


def test_a_logged_traceback_does_not_show_the_signed_url_of_its_cause() -> None:
    """The cause is kept (``from exc``); its text may carry the URL's query: the log
    pipeline redacts the rendered traceback as it does every field."""
    url = "http://storage:9/x/mask.txt?X-Amz-Signature=SECRETSIG"
    buf = io.StringIO()
    configure("info", "json", stream=buf)
    try:
        try:
            raise aiohttp.ClientPayloadError(f"cut short reading {url}")
        except aiohttp.ClientError as exc:
            raise _mapped(exc, "playment", safe_url(url), "scan-1") from exc
    except NetworkError:
        get_logger("t").exception("download failed")
    line = buf.getvalue()
    assert "ClientPayloadError" in line and "cut short reading" in line  # the cause is there
    assert "SECRETSIG" not in line


def _transport(origin: str) -> Transport:
    key = SecretRef("k", env="MAPPING_TEST_KEY")
    cfg = PlaymentConfig(name="playment", base_url=f"{origin}/", project_id="p1", api_key=key)
    clock = SystemClock()
    limiter = ProviderLimiter("playment", rate_per_s=0, burst=1, max_concurrency=1, clock=clock)
    return Transport(cfg, auth=make_auth(cfg), limiter=limiter, clock=clock, metrics=Metrics())


#: errors the caller's own block may raise between reads: a full disk; a write to a network
#: filesystem that timed out (errno ETIMEDOUT: Python makes it a TimeoutError) or was reset;
#: an upload of what it read to object storage that failed
CALLERS_OWN: list[BaseException] = [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.ETIMEDOUT, "Connection timed out"),
    OSError(errno.ECONNRESET, "Connection reset by peer"),
    aiohttp.ClientOSError(errno.EPIPE, "Broken pipe"),
]


@pytest.mark.anyio
@pytest.mark.parametrize("own", CALLERS_OWN, ids=lambda e: type(e).__name__)
async def test_a_streaming_callers_own_error_is_not_a_network_error(
    own: BaseException, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``open_stream``'s caller reads the body and writes it out between reads: the mapping
    covers the reads only. It used to cover the caller's whole block, telling the caller's
    own errors apart by type, so an NFS timeout or an upload's reset became a "network error"
    of the download and was retried as one."""
    monkeypatch.setenv("MAPPING_TEST_KEY", "k")

    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"x" * 100_000)

    async with serving(handle) as origin, _transport(origin) as transport:
        with pytest.raises(type(own)) as info:
            async with transport.open_stream(f"{origin}/mask.txt?sig=1") as answer:
                assert answer.status == 200
                await answer.content.read(1000)
                raise own
        assert info.value is own


@pytest.mark.anyio
async def test_a_body_cut_short_while_the_caller_reads_it_is_a_network_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAPPING_TEST_KEY", "k")

    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "100000"})
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.close()  # 99,000 bytes short
        return resp

    async with serving(handle) as origin, _transport(origin) as transport:
        with pytest.raises(NetworkError, match="cut short") as info:
            async with transport.open_stream(f"{origin}/mask.txt?sig=SECRET") as answer:
                while await answer.content.read(1 << 16):
                    pass
        assert "SECRET" not in str(info.value)
        assert isinstance(info.value.__cause__, aiohttp.ClientPayloadError)
