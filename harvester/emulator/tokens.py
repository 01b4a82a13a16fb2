"""Bearer tokens issued by the emulated OAuth2 server, and the verdict on one that comes back.

Tokens are opaque random strings, as an identity provider's are to a resource server; the book
remembers who got each one, for which scopes and until when. Revocation marks every token
issued so far, so "the token was revoked mid-run" can be staged at any moment without knowing
which token the client holds.
"""

from __future__ import annotations

import enum
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass


class Verdict(enum.Enum):
    VALID = "valid"
    MISSING = "missing"  # no Authorization header at all
    MALFORMED = "malformed"  # present, but not "Bearer <token>"
    UNKNOWN = "unknown"  # never issued here
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(slots=True)
class Token:
    client_id: str
    scopes: frozenset[str]
    issued_at: float
    expires_at: float
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class Check:
    verdict: Verdict
    token: Token | None = None

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.VALID


class TokenBook:
    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_s
        self._clock = clock
        self._tokens: dict[str, Token] = {}
        self.revocations = 0

    @property
    def expires_in(self) -> int:
        """The ``expires_in`` to announce: whole seconds, rounded down, so a client that trusts
        it never holds a token the emulator already considers expired."""
        return math.floor(self._ttl)

    def issue(self, client_id: str, scopes: frozenset[str]) -> str:
        value = secrets.token_urlsafe(32)
        now = self._clock()
        self._tokens[value] = Token(client_id, scopes, now, now + self._ttl)
        return value

    def check_header(self, header: str | None) -> Check:
        """Judge an ``Authorization`` header value."""
        if header is None or not header.strip():
            return Check(Verdict.MISSING)
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return Check(Verdict.MALFORMED)
        return self.check(value.strip())

    def check(self, value: str) -> Check:
        token = self._tokens.get(value)
        if token is None:
            return Check(Verdict.UNKNOWN)
        if token.revoked:
            return Check(Verdict.REVOKED, token)
        if self._clock() >= token.expires_at:
            return Check(Verdict.EXPIRED, token)
        return Check(Verdict.VALID, token)

    def revoke_all(self) -> int:
        """Revoke every token issued so far; returns how many were still usable."""
        now = self._clock()
        live = 0
        for token in self._tokens.values():
            live += not token.revoked and now < token.expires_at
            token.revoked = True
        self.revocations += 1
        return live

    def active(self) -> int:
        now = self._clock()
        return sum(not t.revoked and now < t.expires_at for t in self._tokens.values())

    def __repr__(self) -> str:
        return f"<TokenBook issued={len(self._tokens)} active={self.active()} ttl={self._ttl}s>"
