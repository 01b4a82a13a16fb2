"""Credentials for one provider's API, built beside its lane (not in the adapter package).

Adapters never see a secret: the engine builds each lane's transport with the ``Auth`` made
here, and an OAuth ``Auth`` sends its token requests through that same transport (its
limiter and retries), which hands it its own sender (``Transport(credentials=...)``).
"""

from __future__ import annotations

from collections.abc import Callable

from harvester.auth import ApiKeyAuth, Auth, OAuth2ClientCredentials, TokenPoster
from harvester.clock import Clock
from harvester.config import (
    BentleyConfig,
    CogniteConfig,
    ModzyConfig,
    PlaymentConfig,
    ProviderConfig,
)
from harvester.errors import ConfigError


def make_auth(
    cfg: ProviderConfig, *, post: TokenPoster | None = None, clock: Clock | None = None
) -> Auth:
    """The credentials for one provider's API.

    OAuth providers (Cognite, Bentley) need ``post``, which sends a token request through
    the provider's limiter, and the ``clock`` their token expiry is measured on.
    """
    if isinstance(cfg, PlaymentConfig):
        assert cfg.api_key is not None
        return ApiKeyAuth(cfg.api_key, header="x-api-key")
    if isinstance(cfg, ModzyConfig):
        assert cfg.api_key is not None
        return ApiKeyAuth(cfg.api_key, header="Authorization", scheme="ApiKey")
    if isinstance(cfg, CogniteConfig | BentleyConfig):
        if post is None or clock is None:
            raise TypeError(
                f"make_auth(providers.{cfg.name}): OAuth2 needs post= (a token-request sender)"
                " and clock="
            )
        assert cfg.client_secret is not None
        if isinstance(cfg, CogniteConfig):
            scopes = cfg.scopes or (f"{cfg.base_url.rstrip('/')}/.default",)
        else:
            scopes = cfg.scopes or ("itwin-platform",)
        return OAuth2ClientCredentials(
            cfg.token_url,
            cfg.client_id,
            cfg.client_secret,
            scopes,
            post=post,
            clock=clock,
            provider=cfg.name,
        )
    raise ConfigError(f"providers.{cfg.name}: this provider is not supported yet")


def credentials_for(cfg: ProviderConfig, clock: Clock) -> Callable[[TokenPoster], Auth]:
    """``make_auth`` waiting for the token sender a transport hands it when it is built."""
    return lambda post: make_auth(cfg, post=post, clock=clock)
