"""The chaos tests' emulator: one per test module (see ``harness.module_emulator``); a module
that needs another kind defines its own ``emu``."""

from __future__ import annotations

import pytest

from .harness import module_emulator

emu = pytest.fixture(scope="module", name="emu")(module_emulator)
