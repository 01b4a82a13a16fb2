"""The durable job table: ``open_store(config)`` picks the implementation from ``store.url``."""

from __future__ import annotations

from harvester.config import StoreConfig
from harvester.errors import ConfigError
from harvester.store.base import AddResult, NewJob, Store

__all__ = ["AddResult", "NewJob", "Store", "make_store"]


def make_store(cfg: StoreConfig) -> Store:
    """An unopened store for ``cfg`` (call ``await store.open()``)."""
    if cfg.path is not None:
        from harvester.store.sqlite import SqliteStore

        # FULL: a power loss must not lose a recorded "submitting" intent whose POST left.
        return SqliteStore(cfg.path, synchronous="FULL")
    raise ConfigError(
        f"store.url {cfg.url.split('@')[-1]!r}: the PostgreSQL store is not available yet;"
        " use sqlite://"
    )
