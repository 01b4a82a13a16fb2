"""Shared fixtures: the anyio backend for every async test."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import pytest


def _bind_own_tests_package() -> None:
    """modzy-sdk (a dev dependency) ships its own test suite as a top-level ``tests``
    package; a regular package wins over this folder (which has no ``__init__``), so
    ``from tests.integration.helpers import ...`` would look inside the SDK. Bind the name
    to this folder before any test module imports it."""
    here = str(Path(__file__).resolve().parent)
    current = sys.modules.get("tests")
    if current is not None and here in list(getattr(current, "__path__", ())):
        return
    spec = importlib.machinery.ModuleSpec("tests", None, is_package=True)
    spec.submodule_search_locations = [here]
    sys.modules["tests"] = importlib.util.module_from_spec(spec)


_bind_own_tests_package()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
