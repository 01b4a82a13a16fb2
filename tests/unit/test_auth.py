"""Credentials: API keys and OAuth2 client-credentials tokens, with a fake token endpoint."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import anyio
import orjson
import pytest
from multidict import CIMultiDict

from harvester.auth import (
    DEFAULT_LIFETIME_S,
    MAX_LIFETIME_S,
    ApiKeyAuth,
    OAuth2ClientCredentials,
)
from harvester.clock import FakeClock
from harvester.config import (
    BentleyConfig,
    CogniteConfig,
    ModzyConfig,
    PlaymentConfig,
    SecretRef,
)
from harvester.credentials import make_auth
from harvester.errors import CredentialsError, NetworkError, ProviderUnavailable, RateLimited
from harvester.wire import RequestSpec, Response

SECRET = "s3cr3t-value-42"
TOKEN_URL = "https://login.example/tenant/oauth2/token"
pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIENT_SECRET", SECRET)
    monkeypatch.setenv("API_KEY", "key-1")


def answer(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(status, CIMultiDict(headers or {}), raw, TOKEN_URL, "req-7")


class TokenEndpoint:
    """A token endpoint in memory: issues tok-1, tok-2, ... and records every request."""

    def __init__(self, expires_in: Any = 3600) -> None:
        self.expires_in = expires_in
        self.specs: list[RequestSpec] = []
        self.gate: anyio.Event | None = None
        self.fail_with: BaseException | None = None

    async def post(self, spec: RequestSpec) -> Response:
        self.specs.append(spec)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        body = {
            "access_token": f"tok-{len(self.specs)}",
            "token_type": "Bearer",
            "expires_in": self.expires_in,
        }
        return answer(200, body)


def oauth(endpoint: TokenEndpoint, clock: FakeClock, **kw: Any) -> OAuth2ClientCredentials:
    return OAuth2ClientCredentials(
        TOKEN_URL,
        "client-a",
        SecretRef("providers.cognite.client_secret", env="CLIENT_SECRET"),
        ["https://c.example/.default", "offline"],
        post=endpoint.post,
        clock=clock,
        provider="cognite",
        **kw,
    )


# -- the token request ------------------------------------------------------------------
def test_token_request_is_a_form_without_credentials() -> None:
    auth = oauth(TokenEndpoint(), FakeClock())
    spec = auth.build_token_request()
    assert (spec.method, spec.url, spec.endpoint) == ("POST", TOKEN_URL, "token")
    assert spec.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert spec.form == {
        "grant_type": "client_credentials",
        "client_id": "client-a",
        "client_secret": SECRET,
        "scope": "https://c.example/.default offline",
    }
    assert spec.json is None
    assert spec.send_credentials is False and spec.idempotent is True
    assert SECRET not in repr(spec)


def test_secret_is_read_at_each_request(monkeypatch: pytest.MonkeyPatch) -> None:
    auth = oauth(TokenEndpoint(), FakeClock())
    monkeypatch.setenv("CLIENT_SECRET", "rotated")
    spec = auth.build_token_request()
    assert spec.form is not None and spec.form["client_secret"] == "rotated"


# -- parsing answers ----------------------------------------------------------------------
def test_parse_token_measures_expiry_from_the_send_time() -> None:
    auth = oauth(TokenEndpoint(), FakeClock(start=100.0))
    body = {"access_token": "abc", "token_type": "bearer", "expires_in": 3599}
    assert auth.parse_token(answer(200, body), now=90.0) == ("abc", 90.0 + 3599)
    assert auth.parse_token(answer(200, body)) == ("abc", 100.0 + 3599)


@pytest.mark.parametrize(
    ("expires_in", "lifetime"),
    [
        ('"3600"', 3600.0),
        ("1.5", 1.5),
        (None, DEFAULT_LIFETIME_S),
        ('"soon"', DEFAULT_LIFETIME_S),
        ("true", DEFAULT_LIFETIME_S),
        ("-5", DEFAULT_LIFETIME_S),
        ("0", DEFAULT_LIFETIME_S),
        ("1" + "0" * 30, MAX_LIFETIME_S),  # beyond 64 bits: orjson makes it a float
        ("1e300", MAX_LIFETIME_S),
        ('"1e400"', DEFAULT_LIFETIME_S),
        ("[1]", DEFAULT_LIFETIME_S),
    ],
)
def test_odd_lifetimes_are_bounded(expires_in: str | None, lifetime: float) -> None:
    auth = oauth(TokenEndpoint(), FakeClock(start=0.0))
    extra = f', "expires_in": {expires_in}' if expires_in is not None else ""
    raw = f'{{"access_token": "abc"{extra}}}'.encode()
    assert auth.parse_token(answer(200, raw), now=0.0) == ("abc", lifetime)


def test_oauth_error_body_is_a_credentials_error_without_the_secret() -> None:
    auth = oauth(TokenEndpoint(), FakeClock())
    body = {
        "error": "invalid_client",
        # An identity provider that echoes the request must not leak it through us.
        "error_description": f"AADSTS7000215: Invalid client secret {SECRET} provided.",
    }
    with pytest.raises(CredentialsError) as info:
        auth.parse_token(answer(401, body))
    text = str(info.value)
    assert "cognite" in text and "invalid_client" in text and "AADSTS7000215" in text
    assert "req-7" in text and "HTTP 401" in text
    assert SECRET not in text and SECRET not in repr(info.value)
    assert info.value.code == "invalid_client"


@pytest.mark.parametrize(
    ("status", "body", "exc"),
    [
        (400, {"error": "invalid_scope"}, CredentialsError),
        (404, b"<html>not found</html>", CredentialsError),
        (200, b"<html>login page</html>", CredentialsError),
        (200, {"token_type": "Bearer"}, CredentialsError),
        (200, {"access_token": 5}, CredentialsError),
        (200, {"access_token": "x", "token_type": "mac"}, CredentialsError),
        (200, [1, 2], CredentialsError),
        (503, b"busy", ProviderUnavailable),
        (429, {"error": "slow_down"}, RateLimited),
    ],
)
def test_bad_token_answers_are_typed(status: int, body: Any, exc: type) -> None:
    auth = oauth(TokenEndpoint(), FakeClock())
    with pytest.raises(exc) as info:
        auth.parse_token(answer(status, body, {"Retry-After": "7"}))
    assert "cognite" in str(info.value)
    assert SECRET not in str(info.value)
    if exc is RateLimited:
        assert isinstance(info.value, RateLimited) and info.value.retry_after == 7.0


# -- caching and refresh --------------------------------------------------------------
async def test_token_is_cached_until_the_refresh_margin() -> None:
    clock, endpoint = FakeClock(start=0.0), TokenEndpoint(expires_in=3600)
    auth = oauth(endpoint, clock, refresh_margin_s=60)
    assert await auth.headers() == {"Authorization": "Bearer tok-1"}
    clock.advance(3539)
    assert await auth.headers() == {"Authorization": "Bearer tok-1"}
    assert len(endpoint.specs) == 1
    clock.advance(2)  # 59 s left: inside the margin
    assert await auth.headers() == {"Authorization": "Bearer tok-2"}
    assert len(endpoint.specs) == 2 and auth.refreshes == 2


async def test_short_lived_token_refreshes_at_half_life() -> None:
    clock, endpoint = FakeClock(start=0.0), TokenEndpoint(expires_in=30)
    auth = oauth(endpoint, clock, refresh_margin_s=60)
    assert await auth.token() == "tok-1"
    clock.advance(14)
    assert await auth.token() == "tok-1"
    clock.advance(2)
    assert await auth.token() == "tok-2"


async def test_twenty_concurrent_callers_share_one_refresh() -> None:
    clock, endpoint = FakeClock(start=0.0), TokenEndpoint()
    endpoint.gate = anyio.Event()
    auth = oauth(endpoint, clock)
    got: list[str] = []

    async def caller() -> None:
        got.append(await auth.token())

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(caller)
        await clock.settle()
        assert len(endpoint.specs) == 1  # everyone else waits on the lock
        endpoint.gate.set()
    assert got == ["tok-1"] * 20
    assert len(endpoint.specs) == 1


@pytest.mark.parametrize("age_s", [600, 0.5], ids=["a-used-token", "revoked-right-after-issue"])
async def test_401_drops_the_token_once(age_s: float) -> None:
    """Also a token revoked half a second after it was issued is replaced."""
    clock, endpoint = FakeClock(start=0.0), TokenEndpoint()
    auth = oauth(endpoint, clock)
    assert await auth.token() == "tok-1"
    clock.advance(age_s)
    assert await auth.unauthorized({"Authorization": "Bearer tok-1"}) is True
    assert await auth.token() == "tok-2"
    # Requests still in flight with tok-1 come back 401 now: the fresh token stays.
    assert await auth.unauthorized({"Authorization": "Bearer tok-1"}) is True
    assert await auth.token() == "tok-2"
    assert len(endpoint.specs) == 2


async def test_twenty_concurrent_401s_cause_one_refresh() -> None:
    clock, endpoint = FakeClock(start=0.0), TokenEndpoint()
    auth = oauth(endpoint, clock)
    await auth.token()
    clock.advance(600)
    got: list[str] = []

    async def retry_after_401() -> None:
        if await auth.unauthorized({"Authorization": "Bearer tok-1"}):
            got.append(await auth.token())

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(retry_after_401)
    assert len(endpoint.specs) == 2
    assert got == ["tok-2"] * 20


async def test_failed_refresh_inside_margin_keeps_the_valid_token() -> None:
    clock, endpoint = FakeClock(start=0.0), TokenEndpoint(expires_in=3600)
    auth = oauth(endpoint, clock)
    await auth.token()
    clock.advance(3570)  # inside the 60 s margin, not expired
    endpoint.fail_with = NetworkError("reset", provider="cognite")
    assert await auth.token() == "tok-1"
    assert await auth.token() == "tok-1"
    assert len(endpoint.specs) == 2  # one failed attempt, then a pause before the next
    clock.advance(6)
    assert await auth.token() == "tok-1"
    assert len(endpoint.specs) == 3
    clock.advance(60)  # now expired
    with pytest.raises(NetworkError):
        await auth.token()


async def test_refused_refresh_is_never_papered_over() -> None:
    clock, endpoint = FakeClock(start=0.0), TokenEndpoint(expires_in=3600)
    auth = oauth(endpoint, clock)
    await auth.token()
    clock.advance(3570)
    endpoint.fail_with = CredentialsError("secret revoked", provider="cognite")
    with pytest.raises(CredentialsError):
        await auth.token()


async def test_repr_and_logs_show_neither_secret_nor_token() -> None:
    clock, endpoint = FakeClock(start=0.0), TokenEndpoint()
    auth = oauth(endpoint, clock)
    assert SECRET not in repr(auth) and "no token" in repr(auth)
    await auth.token()
    text = repr(auth)
    assert SECRET not in text and "tok-1" not in text and "***" in text
    assert "expires in 3600s" in text
    assert set(auth.secret_values()) == {SECRET, "tok-1"}


async def test_token_requests_go_through_the_injected_post() -> None:
    clock, endpoint = FakeClock(start=0.0), TokenEndpoint()
    auth = oauth(endpoint, clock)
    await auth.headers()
    body = parse_qs(
        "&".join(f"{k}={v}" for k, v in (endpoint.specs[0].form or {}).items()),
    )
    assert body["grant_type"] == ["client_credentials"]


# -- the factory -----------------------------------------------------------------------
def _ref() -> SecretRef:
    return SecretRef("k", env="API_KEY")


async def test_make_auth_api_keys() -> None:
    playment = make_auth(PlaymentConfig(name="playment", base_url="http://p", api_key=_ref()))
    assert isinstance(playment, ApiKeyAuth)
    assert await playment.headers() == {"x-api-key": "key-1"}
    modzy = make_auth(ModzyConfig(name="modzy", base_url="http://m", api_key=_ref()))
    assert await modzy.headers() == {"Authorization": "ApiKey key-1"}
    assert "key-1" not in repr(modzy)


def test_make_auth_oauth_scopes() -> None:
    secret = SecretRef("s", env="CLIENT_SECRET")
    endpoint, clock = TokenEndpoint(), FakeClock()
    cognite = CogniteConfig(
        name="cognite",
        base_url="https://westeurope-1.cognitedata.com/",
        project="p",
        token_url=TOKEN_URL,
        client_id="c",
        client_secret=secret,
    )
    auth = make_auth(cognite, post=endpoint.post, clock=clock)
    assert isinstance(auth, OAuth2ClientCredentials)
    assert auth.scopes == ("https://westeurope-1.cognitedata.com/.default",)
    assert auth.provider == "cognite"
    custom = make_auth(
        CogniteConfig(**{**vars(cognite), "scopes": ("a", "b")}), post=endpoint.post, clock=clock
    )
    assert isinstance(custom, OAuth2ClientCredentials) and custom.scopes == ("a", "b")
    bentley = BentleyConfig(
        name="bentley",
        base_url="https://api.bentley.com",
        token_url=TOKEN_URL,
        client_id="c",
        client_secret=secret,
        scopes=(),
    )
    bauth = make_auth(bentley, post=endpoint.post, clock=clock)
    assert isinstance(bauth, OAuth2ClientCredentials) and bauth.scopes == ("itwin-platform",)
    with pytest.raises(TypeError, match="post="):
        make_auth(bentley)
