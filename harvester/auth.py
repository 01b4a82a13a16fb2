"""Credentials on requests: API-key headers and OAuth2 client-credentials bearer tokens.

An ``Auth`` hands the transport the headers for one request and hears about a 401, after
which it may refresh once. Headers are built fresh per request (never written into a dict the
caller keeps), and secret values are read from their references only here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from harvester.config import SecretRef


class Auth(Protocol):
    async def headers(self) -> Mapping[str, str]:
        """Headers that authenticate one request to the provider's API."""

    async def unauthorized(self) -> bool:
        """A 401 came back: refresh what can be refreshed. True if retrying may help."""


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

    async def unauthorized(self) -> bool:
        return False  # a static key does not get better by asking again

    def secret_values(self) -> tuple[str, ...]:
        return (self._value,)

    def __repr__(self) -> str:
        return f"ApiKeyAuth({self._header}: ***)"


class NoAuth:
    async def headers(self) -> Mapping[str, str]:
        return {}

    async def unauthorized(self) -> bool:
        return False


TokenFetcher = Callable[[], Awaitable[tuple[str, float]]]
