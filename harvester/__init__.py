"""harvester: submit, track and harvest jobs from remote annotation/ML providers.

The Python API: ``from harvester import Harvester, SyncHarvester, JobSpec`` (harvester.client),
imported on first use so the CLI does not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harvester.client import Harvester, JobSpec, SyncHarvester

__version__ = "0.1.0"
__all__ = ["Harvester", "JobSpec", "SyncHarvester", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Harvester", "JobSpec", "SyncHarvester"):
        from harvester import client

        return getattr(client, name)
    raise AttributeError(f"module 'harvester' has no attribute {name!r}")
