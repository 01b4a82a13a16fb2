"""What the contract tests share: a job to build requests for, and ``harvester emulator`` run
as a user runs it (a subprocess on a free loopback port) for the providers' own SDKs."""

from __future__ import annotations

import json
import urllib.request
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from harvester.config import CogniteConfig, ModzyConfig, SecretRef
from harvester.jobs import Job, JobState
from harvester.providers.cognite import CogniteProvider
from harvester.providers.modzy import ModzyProvider
from tests.integration.helpers import emulator_process

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 20.0  # bound on any single SDK call against the local emulator


def cognite(
    base_url: str = "https://westeurope-1.cognitedata.com", project: str = "p"
) -> CogniteProvider:
    """harvester's Cognite adapter (no secret is read: only requests are built and parsed)."""
    cfg = CogniteConfig(
        name="cognite",
        base_url=base_url,
        project=project,
        token_url="https://login.example/token",
        client_id="c",
        client_secret=SecretRef("s", env="UNUSED"),
    )
    return CogniteProvider(cfg)


def modzy(base_url: str = "https://app.modzy.example") -> ModzyProvider:
    """harvester's Modzy adapter (no key is read: only requests are built and parsed)."""
    return ModzyProvider(
        ModzyConfig(name="modzy", base_url=base_url, api_key=SecretRef("k", env="UNUSED"))
    )


def new_job(provider: str) -> Job:
    return Job(
        provider=provider,
        key="k",
        reference_id="k",
        remote_id=None,
        state=JobState.NEW,
        created_at=0.0,
        updated_at=0.0,
    )


def emulator(folder: Path, scenario_toml: str) -> AbstractContextManager[dict[str, str]]:
    """``harvester emulator --port 0`` with a scenario; yields the URLs it prints."""
    return emulator_process(folder, scenario_toml)


def introspect(urls: dict[str, str], path: str, body: Any = None) -> Any:
    """The emulator's own ``/_emulator`` API (stats, faults), beside the provider mounts."""
    origin = urls["playment"].removesuffix("/playment")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{origin}/_emulator{path}",
        data=data,
        method="GET" if data is None else "POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=WAIT_S) as answer:
        return json.loads(answer.read())
