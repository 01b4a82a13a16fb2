"""Browser sessions for the status page: the API token, typed once, kept as a cookie.

A browser cannot send ``Authorization: Bearer`` by itself, and a token in a URL lands in
access logs, proxies and the browser's history. So the status page takes the token once, in
the body of a POST from the login form, and answers with a cookie that is:

- **derived, not the token**: ``<expiry>.<HMAC-SHA256(key, expiry)>`` where ``key`` is a
  SHA-256 digest of the token. It opens the status page and nothing else (the job routes
  still need the bearer header), cannot be turned back into the token, and stops working
  when it expires or the token changes. Every replica derives the same key from the same
  token, so a session works whichever replica a Service routes the browser to, and nothing
  is kept server-side.
- ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other site's page makes the
  browser send it), ``Path=/``, ``Secure`` when the request came over HTTPS.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

COOKIE = "harvester_session"
#: how long a login lasts
SESSION_S = 12 * 3600
#: the login form's body: a token and its field name, nothing more
MAX_LOGIN_BODY = 4096
_KEY_LABEL = b"harvester status-page session v1\0"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Sessions:
    """Issues and checks session cookies for one token."""

    def __init__(self, token: str) -> None:
        self._token_digest = _digest(token)
        self._key = hashlib.sha256(_KEY_LABEL + token.encode()).digest()

    def token_ok(self, given: str) -> bool:
        # Hashing both sides makes the comparison constant-time whatever their lengths.
        return hmac.compare_digest(_digest(given), self._token_digest)

    def issue(self, now: float) -> str:
        expires = int(now) + SESSION_S
        return f"{expires}.{self._mac(expires)}"

    def valid(self, value: str | None, now: float) -> bool:
        if not value:
            return False
        expires_text, _, mac = value.partition(".")
        if not expires_text.isdigit() or len(expires_text) > 12:
            return False
        expires = int(expires_text)
        if not math.isfinite(now) or expires <= now:
            return False
        return hmac.compare_digest(mac.encode(), self._mac(expires).encode())

    def _mac(self, expires: int) -> str:
        return hmac.new(self._key, str(expires).encode(), hashlib.sha256).hexdigest()


def set_cookie_header(value: str, *, secure: bool) -> str:
    return _cookie(value, max_age=SESSION_S, secure=secure)


def clear_cookie_header(*, secure: bool) -> str:
    return _cookie("", max_age=0, secure=secure)


def _cookie(value: str, *, max_age: int, secure: bool) -> str:
    cookie: SimpleCookie = SimpleCookie()
    cookie[COOKIE] = value
    morsel = cookie[COOKIE]
    morsel["path"] = "/"
    morsel["httponly"] = True
    morsel["samesite"] = "Strict"
    morsel["max-age"] = str(max_age)
    if secure:
        morsel["secure"] = True
    return morsel.OutputString()


def token_from_form(body: bytes) -> str | None:
    """The ``token`` field of an ``application/x-www-form-urlencoded`` body, or None."""
    try:
        fields = parse_qs(body.decode("ascii"), max_num_fields=4, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        return None
    values = fields.get("token")
    if not values or len(values) != 1:
        return None
    return values[0].strip()
