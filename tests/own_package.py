"""Bind the name ``tests`` to this folder.

modzy-sdk (a dev dependency) ships its own test suite as a top-level ``tests`` package; a
regular package wins over this folder (which has no ``__init__``), so ``from
tests.integration.helpers import ...`` would look inside the SDK. pytest (``conftest``) and
scripts that import test modules (``chaos/summary.py``) call ``bind()`` first.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path


def bind() -> None:
    here = str(Path(__file__).resolve().parent)
    current = sys.modules.get("tests")
    if current is not None and here in list(getattr(current, "__path__", ())):
        return
    spec = importlib.machinery.ModuleSpec("tests", None, is_package=True)
    spec.submodule_search_locations = [here]
    sys.modules["tests"] = importlib.util.module_from_spec(spec)
