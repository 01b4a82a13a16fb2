"""The durable job table: ``make_store(config)`` picks the implementation from ``store.url``."""

from __future__ import annotations

from harvester.config import StoreConfig
from harvester.errors import ConfigError
from harvester.store.base import AddResult, JobRef, NewJob, Renewal, SharedStore, Store

__all__ = ["AddResult", "JobRef", "NewJob", "Renewal", "SharedStore", "Store", "make_store"]


def make_store(cfg: StoreConfig, *, read_only: bool = False) -> Store:
    """An unopened store for ``cfg`` (call ``await store.open()``).

    ``read_only``: the caller only reads (``harvester status``, listings): a sqlite file then
    opens without reading every page first (``SqliteStore``), and refuses writes."""
    if cfg.path is not None:
        from harvester.store.sqlite import SqliteStore

        # FULL: a power loss must not lose a recorded "submitting" intent whose POST left.
        return SqliteStore(cfg.path, synchronous="FULL", read_only=read_only)
    try:
        from harvester.store.postgres import PostgresStore
    except ImportError as exc:  # asyncpg is the optional "postgres" extra
        raise ConfigError(
            f"store.url is a PostgreSQL URL but its driver is missing ({exc.name});"
            " install harvester[postgres]"
        ) from exc
    password = cfg.password.reveal() if cfg.password is not None else None
    return PostgresStore(cfg.url, password=password, pool_size=cfg.pool_size)
