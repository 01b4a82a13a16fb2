"""Provider adapters and the factory that builds one from config (no credentials here:
those are ``harvester.credentials``, built beside the lanes)."""

from __future__ import annotations

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

__all__ = ["make_provider"]


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
