"""What holds for every provider adapter alike: the factory builds it from its config, and its
module stays sans-I/O (it builds specs and parses answers; it never touches the network)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from harvester.config import ProviderConfig
from harvester.providers import make_provider
from harvester.providers.bentley import BentleyProvider
from harvester.providers.cognite import CogniteProvider
from harvester.providers.modzy import ModzyProvider
from harvester.providers.playment import PlaymentProvider
from tests.unit.test_bentley_adapter import CFG as BENTLEY
from tests.unit.test_cognite_adapter import CFG as COGNITE
from tests.unit.test_modzy_adapter import CFG as MODZY
from tests.unit.test_playment_adapter import CFG as PLAYMENT

#: what an adapter module must never import
NETWORK_MODULES = ("aiohttp", "harvester.transport", "harvester.engine", "anyio")


@pytest.mark.parametrize(
    ("config", "adapter"),
    [
        (PLAYMENT, PlaymentProvider),
        (COGNITE, CogniteProvider),
        (BENTLEY, BentleyProvider),
        (MODZY, ModzyProvider),
    ],
    ids=["playment", "cognite", "bentley", "modzy"],
)
def test_factory_builds_it(config: ProviderConfig, adapter: type) -> None:
    assert isinstance(make_provider(config), adapter)


@pytest.mark.parametrize(
    "modules",
    [
        ("harvester.providers.playment",),
        ("harvester.providers.cognite",),
        # Bentley's harvest lists and reads Azure containers: those modules are its too.
        ("harvester.providers.bentley", "harvester.azure", "harvester.providers.azure_container"),
        ("harvester.providers.modzy",),
    ],
    ids=["playment", "cognite", "bentley", "modzy"],
)
def test_module_has_no_network_imports(modules: tuple[str, ...]) -> None:
    for name in modules:
        path = importlib.import_module(name).__file__
        assert path is not None
        source = Path(path).read_text()
        for forbidden in NETWORK_MODULES:
            assert forbidden not in source, (name, forbidden)
