"""The control tests' emulator: one per test module (see ``tests.chaos.harness``)."""

from __future__ import annotations

import pytest

from tests.chaos.harness import module_emulator

emu = pytest.fixture(scope="module", name="emu")(module_emulator)
