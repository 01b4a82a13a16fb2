"""The providers' own documents (``../shared/seeds``), read by test code, never retyped.

A seed is a documentation page as the provider publishes it; its examples sit in fenced code
blocks that are *almost* JSON: GitBook pages carry ``// comments`` and placeholders such as
``<UUID>`` or a bare ``UUID`` where a string goes. ``examples`` turns each block into a JSON
value with those replaced by a string, and skips blocks that are not JSON at all (curl lines,
the mask sample in C notation).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

SEEDS = Path(__file__).resolve().parents[2].parent / "shared" / "seeds"
PLACEHOLDER = "placeholder-from-the-docs"

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_COMMENT = re.compile(r"//[^\n\"]*$", re.M)  # a trailing // comment outside a string
_ANGLE = re.compile(r"<([A-Za-z_]+)>")  # "work_flow_id": <UUID>
_BARE = re.compile(r"(?<=:)\s*([A-Z][A-Z_]*)\s*(?=[,\n}])")  # "job_id": UUID


def seed(title: str) -> str:
    """The text of the seed whose first heading is ``# <title>``; fails loudly if absent."""
    if not SEEDS.is_dir():
        raise FileNotFoundError(f"the seeds folder {SEEDS} is missing: clone shared/ beside")
    found = [
        p.read_text()
        for p in sorted(SEEDS.glob("*.txt"))
        if re.search(rf"^# {re.escape(title)}\s*$", p.read_text(), re.M)
    ]
    if len(found) != 1:
        raise LookupError(f"{len(found)} seeds titled {title!r} in {SEEDS}")
    return found[0]


def section(text: str, heading: str) -> str:
    """``text`` from the line ``## <heading>`` (or ``{% tab title="<heading>" %}``) to the
    next heading of the same kind."""
    m = re.search(rf'^## {re.escape(heading)}\s*$|{{% tab title="{re.escape(heading)}', text, re.M)
    if m is None:
        raise LookupError(f"no section {heading!r}")
    rest = text[m.end() :]
    end = re.search(r"^## |{% endtab %}" if m.group(0).startswith("{%") else r"^## ", rest, re.M)
    return rest[: end.start()] if end else rest


def to_json(block: str) -> Any:
    text = _COMMENT.sub("", block)
    text = _ANGLE.sub(f'"{PLACEHOLDER}"', text)
    text = _BARE.sub(f' "{PLACEHOLDER}"', text)
    return json.loads(text)


def examples(text: str) -> list[Any]:
    """Every fenced block of ``text`` that reads as JSON once de-GitBooked, in order."""
    out: list[Any] = []
    for _lang, body in _FENCE.findall(text):
        try:
            out.append(to_json(body))
        except json.JSONDecodeError:
            continue
    return out


def example(text: str) -> Any:
    """The one JSON example of ``text`` (a section); fails if there is not exactly one."""
    found = examples(text)
    if len(found) != 1:
        raise LookupError(f"{len(found)} JSON examples where one was expected")
    return found[0]


def shape_problems(model: Any, actual: Any, path: str = "$") -> list[str]:
    """Where ``actual`` does not have ``model``'s shape: the same keys in every object and
    the same JSON type at every place (a placeholder or a null in the model matches any
    value; the n-th item of a list is compared with the model's n-th, or its last)."""
    if model is None or model == PLACEHOLDER:
        return []
    if isinstance(model, dict):
        if not isinstance(actual, dict):
            return [f"{path}: an object in the docs, {type(actual).__name__} here"]
        problems = []
        missing, extra = set(model) - set(actual), set(actual) - set(model)
        if missing:
            problems.append(f"{path}: missing {sorted(missing)}")
        if extra:
            problems.append(f"{path}: not in the docs {sorted(extra)}")
        for k in set(model) & set(actual):
            problems += shape_problems(model[k], actual[k], f"{path}.{k}")
        return problems
    if isinstance(model, list):
        if not isinstance(actual, list):
            return [f"{path}: a list in the docs, {type(actual).__name__} here"]
        if not model:
            return []
        return [
            p
            for i, a in enumerate(actual)
            for p in shape_problems(model[min(i, len(model) - 1)], a, f"{path}[{i}]")
        ]
    numbers = (int, float)
    if isinstance(model, bool) or isinstance(actual, bool):
        same = isinstance(model, bool) and isinstance(actual, bool)
    elif isinstance(model, numbers):
        same = isinstance(actual, numbers)
    else:
        same = type(model) is type(actual)
    return [] if same else [f"{path}: {type(model).__name__} in the docs, {actual!r} here"]
