"""An OAuth2 token endpoint in memory (client-credentials grant), for the providers whose API
takes a bearer token (Bentley, Cognite).

Tokens are the emulator's own (``TokenBook``), timed by the engine's clock, so a token expires
after ``ttl_s`` of virtual time and the API handlers judge a bearer header as the emulator's
do. Only what a client-credentials client exercises is answered: a form body with
``grant_type``, ``client_id``, ``client_secret`` and ``scope``; errors are RFC 6749's
``{"error", "error_description"}``.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from harvester.clock import Clock
from harvester.emulator.tokens import Check, TokenBook
from harvester.testing.network import MemoryAnswer, MemoryNetwork, MemoryRequest

__all__ = ["MemoryTokens"]

_NO_STORE = {"Cache-Control": "no-store"}


class MemoryTokens:
    """``POST <origin><path>`` issues tokens to the clients in ``clients`` (id → secret)."""

    def __init__(
        self,
        clock: Clock,
        clients: dict[str, str],
        *,
        origin: str = "http://login.test",
        path: str = "/oauth2/token",
        ttl_s: float = 3600.0,
    ) -> None:
        self.origin = origin.rstrip("/")
        self.path = path
        self.clients = dict(clients)
        self.book = TokenBook(ttl_s, clock.monotonic)
        self.issued = 0

    @property
    def url(self) -> str:
        return self.origin + self.path

    def mount(self, network: MemoryNetwork) -> MemoryTokens:
        network.route(self.origin, self.handle)
        return self

    def check(self, header: str | None, scope: str) -> Check | None:
        """The token behind an ``Authorization`` header, or None when it must be refused
        (missing, unknown, expired, revoked, or without ``scope``)."""
        check = self.book.check_header(header)
        if not check.ok or check.token is None or scope not in check.token.scopes:
            return None
        return check

    async def handle(self, req: MemoryRequest) -> MemoryAnswer:
        if req.method != "POST" or req.path != self.path:
            return _error(404, "invalid_request", f"no route {req.method} {req.path}")
        form = dict(parse_qsl((req.body or b"").decode(), keep_blank_values=True))
        if form.get("grant_type") != "client_credentials":
            return _error(400, "unsupported_grant_type", "only client_credentials")
        client = form.get("client_id", "")
        if not client or self.clients.get(client) != form.get("client_secret"):
            return _error(401, "invalid_client", "client authentication failed")
        scope = form.get("scope", "")
        token = self.book.issue(client, frozenset(scope.split()))
        self.issued += 1
        doc = {"access_token": token, "token_type": "Bearer", "expires_in": self.book.expires_in}
        return MemoryAnswer.json(doc, 200, _NO_STORE)


def _error(status: int, error: str, description: str) -> MemoryAnswer:
    return MemoryAnswer.json({"error": error, "error_description": description}, status, _NO_STORE)
