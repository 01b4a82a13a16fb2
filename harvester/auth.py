"""Credentials on requests: API-key headers and OAuth2 client-credentials bearer tokens.

An ``Auth`` hands the transport the headers for one request and hears about a 401, after
which it may refresh once. Headers are built fresh per request (never written into a dict the
caller keeps), and secret values are read from their references only here.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import anyio
import orjson

from harvester.clock import Clock
from harvester.config import SecretRef
from harvester.errors import (
    CredentialsError,
    HarvesterError,
    ProviderUnavailable,
    RateLimited,
    RetryableError,
)
from harvester.logs import get_logger
from harvester.ratelimit import parse_retry_after
from harvester.wire import RequestSpec, Response

log = get_logger("harvester.auth")


class Auth(Protocol):
    async def headers(self) -> Mapping[str, str]:
        """Headers that authenticate one request to the provider's API."""

    async def unauthorized(self, sent: Mapping[str, str]) -> bool:
        """A request that carried the headers ``sent`` came back 401: refresh what can be
        refreshed. True if retrying may help."""


class ApiKeyAuth:
    """A static key in a header.

    ``x-api-key: K`` (Playment) or ``Authorization: ApiKey K`` (Modzy).
    """

    def __init__(self, secret: SecretRef, *, header: str, scheme: str | None = None) -> None:
        self._value = secret.reveal()
        self._header = header
        self._scheme = scheme

    async def headers(self) -> Mapping[str, str]:
        value = f"{self._scheme} {self._value}" if self._scheme else self._value
        return {self._header: value}

    async def unauthorized(self, sent: Mapping[str, str]) -> bool:
        return False  # a static key does not get better by asking again

    def secret_values(self) -> tuple[str, ...]:
        return (self._value,)

    def __repr__(self) -> str:
        return f"ApiKeyAuth({self._header}: ***)"


#: sends a token request (through the provider's limiter) and returns the raw answer
TokenPoster = Callable[[RequestSpec], Awaitable[Response]]

#: when the identity provider does not say how long a token lives (``expires_in`` is only
#: RECOMMENDED by RFC 6749), assume a short life: a needless refresh costs one request
DEFAULT_LIFETIME_S = 300.0
#: a lifetime beyond this is treated as this (a corrupt ``expires_in`` must not pin a token)
MAX_LIFETIME_S = 24 * 3600.0
#: after a failed refresh, a still-valid token is used this long before trying again
REFRESH_RETRY_S = 5.0


class OAuth2ClientCredentials:
    """A bearer token from an OAuth2 client-credentials grant, cached and refreshed.

    The token request is built (``build_token_request``) and its answer parsed
    (``parse_token``) here; sending it is the injected ``post``'s job, so token requests obey
    the provider's limiter like any other request and tests need no network. One refresh
    serves every concurrent caller (a lock, checked twice). The client secret is read from its
    reference at each token request, so a rotated secret file is picked up without a restart;
    neither the secret nor a token ever appears in ``repr`` or in an error message.
    """

    __slots__ = (
        "_access",
        "_clock",
        "_expires_at",
        "_fetched_at",
        "_hold_until",
        "_lock",
        "_post",
        "_secret",
        "client_id",
        "provider",
        "refresh_margin_s",
        "refreshes",
        "scopes",
        "token_url",
    )

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: SecretRef,
        scopes: Sequence[str],
        *,
        post: TokenPoster,
        clock: Clock,
        refresh_margin_s: float = 60.0,
        provider: str | None = None,
    ) -> None:
        if not (math.isfinite(refresh_margin_s) and refresh_margin_s >= 0):
            raise ValueError(f"refresh_margin_s must be >= 0, got {refresh_margin_s!r}")
        self.token_url = token_url
        self.client_id = client_id
        self._secret = client_secret
        self.scopes = tuple(scopes)
        self._post = post
        self._clock = clock
        self.refresh_margin_s = float(refresh_margin_s)
        self.provider = provider
        self._access: str | None = None
        self._expires_at = 0.0
        self._fetched_at = 0.0
        self._hold_until = 0.0
        self._lock = anyio.Lock()
        self.refreshes = 0  #: token requests answered with a token (for tests and metrics)

    # -- sans-I/O halves ----------------------------------------------------------------
    def build_token_request(self) -> RequestSpec:
        form = {
            "grant_type": "client_credentials",
            "client_id": self.client_id,
            "client_secret": self._secret.reveal(),
        }
        if self.scopes:
            form["scope"] = " ".join(self.scopes)
        return RequestSpec(
            "POST",
            self.token_url,
            endpoint="token",
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "application/json",
            },
            form=form,
            # Asking for a token twice is harmless, and the identity provider is not the API:
            # no bearer token may go there.
            idempotent=True,
            send_credentials=False,
        )

    def parse_token(self, resp: Response, *, now: float | None = None) -> tuple[str, float]:
        """``(access_token, expires_at)`` on the monotonic clock, or a typed error.

        ``now`` should be when the request was sent, so the lifetime is never overestimated.
        """
        sent = self._clock.monotonic() if now is None else now
        kw: dict[str, Any] = {
            "provider": self.provider,
            "status": resp.status,
            "request_id": resp.request_id,
        }
        if resp.status == 429:
            retry = parse_retry_after(resp.headers.get("Retry-After"), now_wall=self._clock.wall())
            raise RateLimited("token request rate limited", retry_after=retry, **kw)
        if resp.status >= 500:
            raise ProviderUnavailable(f"token endpoint failed: {self._snippet(resp.body)}", **kw)
        try:
            body = orjson.loads(resp.body)
        except orjson.JSONDecodeError:
            body = None
        if not 200 <= resp.status < 300:
            error = body.get("error") if isinstance(body, dict) else None
            description = body.get("error_description") if isinstance(body, dict) else None
            if isinstance(error, str) and error:
                text = f"{error}: {description}" if isinstance(description, str) else error
                raise CredentialsError(
                    f"token request refused: {self._scrub(text)[:300]}", code=error, **kw
                )
            raise CredentialsError(f"token request refused: {self._snippet(resp.body)}", **kw)
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            # A 2xx without a token is a token_url pointing at the wrong thing: a person
            # must fix the config, so this is as fatal as a refused secret.
            raise CredentialsError(
                "token endpoint answered without an access_token (is token_url right?)", **kw
            )
        assert isinstance(body, dict)
        kind = body.get("token_type")
        if kind is not None and (not isinstance(kind, str) or kind.lower() != "bearer"):
            raise CredentialsError(
                f"token endpoint issued a {str(kind)[:40]!r} token; only bearer tokens work",
                **kw,
            )
        return token, sent + _lifetime(body.get("expires_in"))

    # -- Auth ---------------------------------------------------------------------------
    async def headers(self) -> Mapping[str, str]:
        return {"Authorization": f"Bearer {await self.token()}"}

    async def token(self) -> str:
        """A valid access token, fetching one only when the cached one is (nearly) expired."""
        cached = self._usable()
        if cached is not None:
            return cached
        async with self._lock:
            # Whoever held the lock before us may just have refreshed.
            cached = self._usable()
            if cached is not None:
                return cached
            return await self._refresh()

    async def unauthorized(self, sent: Mapping[str, str]) -> bool:
        async with self._lock:
            # Drop the token only if it is the one that was refused: requests that were in
            # flight with an older token come back 401 after another one already refreshed,
            # and must not throw the fresh token away (one refresh, not one per request).
            # A token revoked a second after it was issued is refused and replaced all the same.
            if self._access is not None and sent.get("Authorization") == f"Bearer {self._access}":
                self._access = None
        return True

    async def _refresh(self) -> str:
        sent = self._clock.monotonic()
        try:
            resp = await self._post(self.build_token_request())
            token, expires_at = self.parse_token(resp, now=sent)
        except RetryableError as exc:
            # A token inside its refresh margin still works: use it rather than fail a
            # request because the identity provider hiccupped.
            now = self._clock.monotonic()
            if self._access is not None and now < self._expires_at:
                # ... and not every caller in the meantime should wait on another attempt.
                self._hold_until = now + REFRESH_RETRY_S
                log.warning(
                    "token refresh failed; using the current one",
                    provider=self.provider,
                    error=str(exc),
                )
                return self._access
            raise
        self._access, self._expires_at, self._fetched_at = token, expires_at, sent
        self.refreshes += 1
        log.info(
            "access token obtained",
            provider=self.provider,
            lifetime_s=round(expires_at - sent, 1),
        )
        return token

    def _usable(self) -> str | None:
        if self._access is None:
            return None
        now = self._clock.monotonic()
        lifetime = self._expires_at - self._fetched_at
        # A token shorter-lived than twice the margin would otherwise be refreshed on every
        # request: refresh it at half its life instead.
        margin = min(self.refresh_margin_s, lifetime / 2)
        if now < self._expires_at - margin or (now < self._hold_until and now < self._expires_at):
            return self._access
        return None

    def secret_values(self) -> tuple[str, ...]:
        """Values a log redactor must never let through."""
        values = [self._secret.reveal()]
        if self._access is not None:
            values.append(self._access)
        return tuple(values)

    def _scrub(self, text: str) -> str:
        # An identity provider echoing the request back must not put the secret in our error.
        try:
            secret = self._secret.reveal()
        except HarvesterError:
            return text
        return text.replace(secret, "***") if secret else text

    def _snippet(self, body: bytes) -> str:
        text = body[:200].decode("utf-8", "replace").strip() or "empty answer"
        return self._scrub(text)

    def __repr__(self) -> str:
        if self._access is None:
            state = "no token"
        else:
            left = self._expires_at - self._clock.monotonic()
            state = f"token expires in {left:.0f}s" if left > 0 else "token expired"
        return (
            f"OAuth2ClientCredentials({self.provider or 'oauth'}: {safe_url(self.token_url)},"
            f" client_id={self.client_id!r}, secret=***, {state})"
        )


def _lifetime(value: Any) -> float:
    """Seconds from ``expires_in``: a number, or a numeric string as some IdPs send."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return DEFAULT_LIFETIME_S
    if isinstance(value, bool) or not isinstance(value, int | float):
        return DEFAULT_LIFETIME_S
    seconds = float(value)
    if not (math.isfinite(seconds) and seconds > 0):
        return DEFAULT_LIFETIME_S
    return min(seconds, MAX_LIFETIME_S)


def safe_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
