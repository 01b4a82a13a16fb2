"""Provider adapters and the factory that builds one (with its auth) from config."""

from __future__ import annotations

from typing import TYPE_CHECKING

from harvester.config import (
    BentleyConfig,
    CogniteConfig,
    ModzyConfig,
    PlaymentConfig,
    ProviderConfig,
)
from harvester.errors import ConfigError
from harvester.providers.base import Provider
from harvester.providers.bentley import BentleyProvider
from harvester.providers.cognite import CogniteProvider
from harvester.providers.modzy import ModzyProvider
from harvester.providers.playment import PlaymentProvider

if TYPE_CHECKING:
    from harvester.auth import Auth, TokenPoster
    from harvester.clock import Clock

__all__ = ["make_auth", "make_provider", "validator_for"]


def make_provider(cfg: ProviderConfig) -> Provider:
    if isinstance(cfg, PlaymentConfig):
        return PlaymentProvider(cfg)
    if isinstance(cfg, CogniteConfig):
        return CogniteProvider(cfg)
    if isinstance(cfg, BentleyConfig):
        return BentleyProvider(cfg)
    if isinstance(cfg, ModzyConfig):
        return ModzyProvider(cfg)
    raise ConfigError(f"providers.{cfg.name}: this provider is not supported yet")


def make_auth(
    cfg: ProviderConfig, *, post: TokenPoster | None = None, clock: Clock | None = None
) -> Auth:
    """The credentials for one provider's API.

    OAuth providers (Cognite, Bentley) need ``post``, which sends a token request through
    the provider's limiter, and the ``clock`` their token expiry is measured on.
    """
    # auth.py builds RequestSpecs, so it imports this package's base module; importing it
    # here at call time keeps either import order free of a cycle.
    from harvester.auth import ApiKeyAuth, OAuth2ClientCredentials

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


def validator_for(cfg: ProviderConfig) -> Provider:
    """An adapter used only to validate payloads (no secrets are read)."""
    return make_provider(cfg)
