"""The providers' own documents in ``../shared/seeds``, read as contracts by test code.

Nothing here is retyped from a seed: shapes and enums are parsed out of the seed text, so a
seed that changes changes the contract. A missing seed fails loudly (never a skip).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

SEEDS = Path(__file__).resolve().parents[2].parent / "shared" / "seeds"
#: seed 001: Cognite's "Retrieve results from a segmentation job" reference page
COGNITE_SEGMENT = "001_"
#: seed 003: Modzy's SDK reference for ``client.results.get`` (the results document)
MODZY_RESULTS = "003_"


def seed_text(prefix: str) -> str:
    found = sorted(SEEDS.glob(f"{prefix}*.txt"))
    assert found, f"seed {prefix}* missing from {SEEDS}: the shared folder must sit beside the repo"
    return found[0].read_text(encoding="utf-8")


# -- Cognite -----------------------------------------------------------------------------
def cognite_job_example() -> dict[str, Any]:
    """The sample job document of the segmentation reference (its first JSON object)."""
    text = seed_text(COGNITE_SEGMENT)
    start = text.index("{", text.index("Bearer <token>"))
    doc, _ = json.JSONDecoder().raw_decode(text, start)
    assert isinstance(doc, dict)
    return doc


def cognite_statuses() -> set[str]:
    """The enum printed under "The status of the job." in the reference."""
    text = seed_text(COGNITE_SEGMENT)
    line = text[text.index("The status of the job.") :].splitlines()[1]
    match = re.match(r"\s*((?:[A-Z][a-z]+, )+[A-Z][a-z]+)", line)
    assert match, line
    return set(match.group(1).split(", "))


def conforms(doc: Any, example: Any, where: str = "$") -> list[str]:
    """How ``doc`` departs from the reference's sample: a field the sample does not have, or a
    value of another JSON type. Absent fields are not departures (the sample shows them all,
    the reference requires few); ``null`` in the sample allows any scalar (a confidence is a
    number, an ``errorMessage`` a string, when there is one).
    """
    problems: list[str] = []
    if isinstance(example, dict):
        if not isinstance(doc, dict):
            return [f"{where}: expected an object, got {type(doc).__name__}"]
        for key, value in doc.items():
            if key not in example:
                problems.append(f"{where}.{key}: not a field of the documented answer")
            else:
                problems += conforms(value, example[key], f"{where}.{key}")
    elif isinstance(example, list):
        if not isinstance(doc, list):
            return [f"{where}: expected a list, got {type(doc).__name__}"]
        for i, item in enumerate(doc):
            problems += conforms(item, example[0], f"{where}[{i}]")
    elif example is None:
        if isinstance(doc, dict | list):
            problems.append(f"{where}: expected null or a scalar, got {type(doc).__name__}")
    elif isinstance(example, bool):
        if not isinstance(doc, bool):
            problems.append(f"{where}: expected a boolean, got {doc!r}")
    elif isinstance(example, int):
        if not isinstance(doc, int) or isinstance(doc, bool):
            problems.append(f"{where}: expected an integer, got {doc!r}")
    elif isinstance(example, float):
        if not _number(doc):
            problems.append(f"{where}: expected a number, got {doc!r}")
    elif isinstance(example, str) and not isinstance(doc, str):
        problems.append(f"{where}: expected a string, got {doc!r}")
    return problems


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# -- Modzy -------------------------------------------------------------------------------
ANY_ITEM = "<input item>"
ANY_OUTPUT = "<model output>"


def modzy_results_structure() -> dict[str, Any]:
    """The results document's structure as the SDK reference prints it: field -> type name.

    Its two placeholders become ``ANY_ITEM`` (every input item's key) and ``ANY_OUTPUT``;
    hyphens in field names (``update-time``) are the page's typos for underscores.
    """
    text = seed_text(MODZY_RESULTS)
    start = text.index('{\n  "job_identifier"')
    end = text.index("\nExamples", start)
    block = text[start:end]
    block = re.sub(r"<<<<input-item-key>>>>", json.dumps(ANY_ITEM), block)
    block = re.sub(
        r"<<<<data-output-item-key>>>>: <<model-output-value>>",
        f'"{ANY_OUTPUT}": "any"',
        block,
    )
    structure = json.loads(block)
    assert isinstance(structure, dict)
    return _underscored(structure)


def _underscored(node: Any) -> Any:
    if isinstance(node, dict):
        return {k.replace("-", "_"): _underscored(v) for k, v in node.items()}
    return node


def is_type(value: Any, name: str) -> bool:
    """Whether a value is of one of the reference's type names (JSON Schema's)."""
    if name == "string":
        return isinstance(value, str)
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return _number(value)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "date-time":  # JSON Schema's date-time is RFC 3339
        if not isinstance(value, str):
            return False
        try:
            Timestamp().FromJsonString(value)
        except ValueError:
            return False
        return True
    if name == "any":
        return True
    raise AssertionError(f"unknown type name {name!r} in the seed")
