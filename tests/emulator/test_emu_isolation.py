"""The emulator is an independent implementation: it must not share code with the client."""

from __future__ import annotations

import ast
from pathlib import Path

import harvester.emulator

FORBIDDEN = (
    "harvester.providers",
    "harvester.transport",
    "harvester.engine",
    "harvester.auth",
)


def test_emulator_imports_nothing_from_the_client_side() -> None:
    package = Path(harvester.emulator.__file__).parent
    offenders = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.name}: {n}" for n in names if n.startswith(FORBIDDEN)]
    assert offenders == []
