"""The OAuth2 token endpoint (client-credentials grant), mounted at ``/oauth2/token``, and the
bearer-token check the Cognite and Bentley APIs run on every request.

The endpoint follows RFC 6749 as identity providers implement it: a form body
(``grant_type=client_credentials&client_id&client_secret&scope``, space-separated scopes, as
cognite-sdk sends it) or HTTP Basic client authentication; errors are ``{"error",
"error_description"}`` with 400 (request) or 401 (client). Tokens are opaque, see ``tokens``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from aiohttp import web

from harvester.emulator.bodies import BodyError, read_body
from harvester.emulator.middleware import provider_middlewares
from harvester.emulator.responses import json_response
from harvester.emulator.state import EmulatorState
from harvester.emulator.tokens import Verdict

PROVIDER = "token"
GRANT = "client_credentials"
FORM = "application/x-www-form-urlencoded"
# RFC 6749 5.1: token answers must never be cached by intermediaries.
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class OAuthError(Exception):
    def __init__(self, status: int, error: str, description: str, *, basic: bool = False) -> None:
        super().__init__(f"{status} {error}: {description}")
        self.status = status
        self.error = error
        self.description = description
        self.basic = basic  # the client tried Basic auth: 401 must then carry WWW-Authenticate


def oauth_error(
    status: int, error: str, description: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"error": error, "error_description": description}
    return json_response(body, status, {**_NO_STORE, **(headers or {})})


def _render_error(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.StreamResponse:
    if status == 429 or status == 503:
        error = "temporarily_unavailable"
    elif status >= 500:
        error = "server_error"
    else:
        error = "invalid_request"
    return oauth_error(status, error, message, headers)


class TokenEndpoint:
    def __init__(self, state: EmulatorState) -> None:
        self.state = state
        self.scenario = state.scenario.oauth
        self._clients = dict(self.scenario.clients)
        state.declare_counters(PROVIDER, "tokens_issued")
        state.add_stats_source(PROVIDER, self._stats)

    def build_app(self) -> web.Application:
        middlewares = provider_middlewares(
            PROVIDER, self.state, _render_error, rate_limit=self.scenario.rate_limit
        )
        app = web.Application(middlewares=middlewares)
        app.router.add_post("/token", self._token)
        return app

    def _stats(self) -> dict[str, Any]:
        return {
            "tokens_active": self.state.tokens.active(),
            "revocations": self.state.tokens.revocations,
        }

    async def _token(self, request: web.Request) -> web.StreamResponse:
        try:
            params = await _form(request)
            client_id = self._authenticate(request, params)
        except OAuthError as exc:
            self.state.record_auth_refusal(PROVIDER, exc.error)
            headers = {"WWW-Authenticate": 'Basic realm="emulator"'} if exc.basic else None
            return oauth_error(exc.status, exc.error, exc.description, headers)
        scope = params.get("scope", "")
        token = self.state.tokens.issue(client_id, frozenset(scope.split()))
        self.state.remember_api_key(token)
        self.state.count(PROVIDER, "tokens_issued")
        doc: dict[str, Any] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.state.tokens.expires_in,
        }
        if scope:
            doc["scope"] = scope
        return json_response(doc, 200, _NO_STORE)

    def _authenticate(self, request: web.Request, params: dict[str, str]) -> str:
        """Check the grant and the client; returns the client id."""
        grant = params.get("grant_type")
        if not grant:
            raise OAuthError(400, "invalid_request", "grant_type is required")
        if grant != GRANT:
            raise OAuthError(
                400, "unsupported_grant_type", f"grant_type {grant!r} is not supported"
            )
        basic = _basic_credentials(request.headers.get("Authorization"))
        form_id, form_secret = params.get("client_id"), params.get("client_secret")
        if basic is not None:
            if form_id is not None and form_id != basic[0]:
                raise OAuthError(
                    400, "invalid_request", "client_id differs between Basic auth and the form"
                )
            client_id, secret = basic
        else:
            client_id, secret = form_id or "", form_secret or ""
        if not client_id:
            raise OAuthError(401, "invalid_client", "client_id is required")
        if not secret:
            raise OAuthError(401, "invalid_client", "client_secret is required")
        if self._clients and self._clients.get(client_id) != secret:
            # One message for both cases: an IdP does not reveal which client ids exist.
            raise OAuthError(
                401, "invalid_client", "client authentication failed", basic=basic is not None
            )
        self.state.remember_api_key(secret)
        return client_id


async def _form(request: web.Request) -> dict[str, str]:
    if request.content_type != FORM:
        raise OAuthError(400, "invalid_request", f"the request body must be {FORM}")
    try:
        text = (await read_body(request)).decode("utf-8")
    except BodyError as exc:
        raise OAuthError(400, "invalid_request", exc.message) from exc
    except UnicodeDecodeError as exc:
        raise OAuthError(400, "invalid_request", f"the form is not UTF-8: {exc}") from exc
    params: dict[str, str] = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        if key in params:  # RFC 6749 3.2: parameters must not repeat
            raise OAuthError(400, "invalid_request", f"parameter {key!r} is repeated")
        params[key] = value
    return params


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    """(client_id, client_secret) from ``Authorization: Basic``; None without that header."""
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise OAuthError(401, "invalid_client", f"unsupported client authentication {scheme!r}")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise OAuthError(401, "invalid_client", "malformed Basic credentials", basic=True) from exc
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise OAuthError(401, "invalid_client", "malformed Basic credentials", basic=True)
    # RFC 6749 2.3.1: both halves are form-urlencoded before base64.
    return unquote_plus(client_id), unquote_plus(secret)


# -- the resource servers' side ----------------------------------------------------------


def check_bearer(
    state: EmulatorState, provider: str, request: web.Request, required_scope: str = ""
) -> str | None:
    """None when the request carries a usable bearer token (with ``required_scope`` if one
    is given); else the refusal reason, already counted for ``provider``."""
    check = state.tokens.check_header(request.headers.get("Authorization"))
    if check.ok:
        assert check.token is not None
        if not required_scope or required_scope in check.token.scopes:
            return None
        reason = "scope"
    else:
        reason = check.verdict.value
    state.record_auth_refusal(provider, reason)
    return reason


REFUSAL_MESSAGES = {
    Verdict.MISSING.value: "the Authorization header is missing",
    Verdict.MALFORMED.value: "the Authorization header is not 'Bearer <token>'",
    Verdict.UNKNOWN.value: "the access token is invalid",
    Verdict.EXPIRED.value: "the access token has expired",
    Verdict.REVOKED.value: "the access token has been revoked",
    "scope": "the access token lacks the required scope",
}
