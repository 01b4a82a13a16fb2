"""One table of exit codes and one signal handler for every command (``harvester.lifecycle``).

README's "Exit codes" table is read here and must say, row for row, what the code's table
says; no module but ``lifecycle`` (and the emulator, which is its own program) handles
signals or spells an exit code of its own.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import harvester
from harvester.lifecycle import EXIT_CODES, Exit

REPO = Path(__file__).resolve().parents[2]
PACKAGE = Path(harvester.__file__).parent


def _readme_table() -> dict[int, str]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n### Exit codes\n", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| \*\*(\d+)\*\* \| (.*) \|$", section, re.M)
    assert rows, "README's Exit codes section has no table rows"
    return {int(code): meaning for code, meaning in rows}


def test_readme_exit_code_table_is_the_codes_table() -> None:
    assert _readme_table() == {int(code): meaning for code, meaning in EXIT_CODES.items()}


def test_every_exit_code_is_described() -> None:
    assert set(EXIT_CODES) == set(Exit)


def _sources() -> list[tuple[Path, ast.Module]]:
    return [
        (path, ast.parse(path.read_text(), str(path)))
        for path in sorted(PACKAGE.rglob("*.py"))
        if "emulator" not in path.relative_to(PACKAGE).parts and path.name != "lifecycle.py"
    ]


def test_signals_are_handled_only_by_lifecycle() -> None:
    """The CLI and the daemon each had their own receiver; a second copy would drift."""
    offenders = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in (
                "open_signal_receiver",
                "add_signal_handler",
                "SIGINT",
                "SIGTERM",
            ):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.attr}")
    assert offenders == []


def test_no_module_defines_exit_codes_of_its_own() -> None:
    offenders = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else []
            names = [
                n.id
                for t in targets
                for n in ast.walk(t)
                if isinstance(n, ast.Name) and n.id.startswith("EXIT_")
            ]
            offenders += [f"{path.relative_to(PACKAGE)}:{node.lineno} {n}" for n in names]
    assert offenders == []
