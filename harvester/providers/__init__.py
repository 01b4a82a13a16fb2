"""Provider adapters and the factory that builds one (with its auth) from config."""

from __future__ import annotations

from harvester.auth import ApiKeyAuth, Auth
from harvester.config import PlaymentConfig, ProviderConfig
from harvester.errors import ConfigError
from harvester.providers.base import Provider
from harvester.providers.playment import PlaymentProvider


def make_provider(cfg: ProviderConfig) -> Provider:
    if isinstance(cfg, PlaymentConfig):
        return PlaymentProvider(cfg)
    raise ConfigError(f"providers.{cfg.name}: this provider is not supported yet")


def make_auth(cfg: ProviderConfig) -> Auth:
    if isinstance(cfg, PlaymentConfig):
        assert cfg.api_key is not None
        return ApiKeyAuth(cfg.api_key, header="x-api-key")
    raise ConfigError(f"providers.{cfg.name}: this provider is not supported yet")


def validator_for(cfg: ProviderConfig) -> Provider:
    """An adapter used only to validate payloads (no secrets are read)."""
    return make_provider(cfg)
