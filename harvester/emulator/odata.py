"""The ``$filter`` expressions of Bentley's job listings (an OData subset), parsed and run.

Bentley documents, for ``GET .../jobs``: properties ``id, iTwinId, name, email, type, state,
createdDateTime, inputId, outputId``; operators ``eq, lt, le, gt, ge, ne, in, and, or``;
values bare (``iTwinId eq dc720f05-...``, ``createdDateTime gt 2024-06-24T13:00:00Z``) or
quoted (``inputId in ('...', '...')``). Quoted values double a quote inside (``'it''s'``), as
OData does. ``and`` binds tighter than ``or``; no parentheses other than ``in``'s list.
Strings compare exactly; ``createdDateTime`` compares as an instant.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

PROPERTIES = (
    "id", "iTwinId", "name", "email", "type", "state", "createdDateTime", "inputId", "outputId",
)  # fmt: skip
#: a property whose job has several values (inputs, outputs) matches when any of them does
MULTI = frozenset({"inputId", "outputId"})
_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq, "ne": operator.ne, "lt": operator.lt,
    "le": operator.le, "gt": operator.gt, "ge": operator.ge,
}  # fmt: skip
_COMPARE = tuple(_OPERATORS)
_TOKEN = re.compile(r"\s*(?:(?P<quoted>'(?:[^']|'')*')|(?P<punct>[(),])|(?P<word>[^\s(),']+))")


class FilterError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class _Term:
    prop: str
    op: str
    values: tuple[str, ...]


Values = Mapping[str, tuple[str, ...]]  #: property -> the job's values of it
Predicate = Callable[[Values], bool]


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise FilterError(f"cannot read $filter at character {pos + 1}")
        pos = m.end()
        if m["quoted"] is not None:
            out.append(("value", m["quoted"][1:-1].replace("''", "'")))
        elif m["punct"] is not None:
            out.append(("punct", m["punct"]))
        else:
            out.append(("word", m["word"]))
    return out


def parse(text: str) -> Predicate:
    """A predicate over a job's property values; ``FilterError`` says what is wrong."""
    tokens = _tokens(text)
    if not tokens:
        raise FilterError("$filter is empty: at least one criterion is required")
    groups: list[list[_Term]] = [[]]
    i = 0
    while True:
        term, i = _term(tokens, i)
        groups[-1].append(term)
        if i == len(tokens):
            break
        kind, word = tokens[i]
        if kind != "word" or word not in ("and", "or"):
            raise FilterError(f"expected 'and' or 'or', got {word!r}")
        if word == "or":
            groups.append([])
        i += 1
    return lambda values: any(all(_holds(t, values) for t in g) for g in groups)


def _term(tokens: list[tuple[str, str]], i: int) -> tuple[_Term, int]:
    if len(tokens) - i < 3:
        raise FilterError("a criterion is incomplete: property operator value")
    (pkind, prop), (okind, op) = tokens[i], tokens[i + 1]
    if pkind != "word" or prop not in PROPERTIES:
        raise FilterError(
            f"{prop!r} is not a property supported for filtering ({', '.join(PROPERTIES)})"
        )
    if okind != "word" or op not in (*_COMPARE, "in"):
        raise FilterError(f"{op!r} is not a supported operator ({', '.join(_COMPARE)}, in)")
    if op != "in":
        kind, value = tokens[i + 2]
        if kind == "punct":
            raise FilterError(f"{prop} {op} needs a value")
        return _Term(prop, op, (value,)), i + 3
    if tokens[i + 2] != ("punct", "("):
        raise FilterError(f"{prop} in needs a list: ('a', 'b')")
    values: list[str] = []
    j = i + 3
    while j < len(tokens):
        kind, value = tokens[j]
        if kind == "punct":
            raise FilterError(f"{prop} in: a value is missing")
        values.append(value)
        if j + 1 >= len(tokens):
            break
        if tokens[j + 1] == ("punct", ")"):
            return _Term(prop, op, tuple(values)), j + 2
        if tokens[j + 1] != ("punct", ","):
            raise FilterError(f"{prop} in: expected ',' or ')'")
        j += 2
    raise FilterError(f"{prop} in: the list is not closed")


def _instant(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _compare(prop: str, op: str, have: str, want: str) -> bool:
    compare = _OPERATORS[op]
    if prop == "createdDateTime":
        a, b = _instant(have), _instant(want)
        if a is not None and b is not None:
            return compare(a, b)
    return compare(have, want)


def _holds(term: _Term, values: Values) -> bool:
    have = values.get(term.prop, ())
    if term.op == "in":
        return any(h in term.values for h in have)
    if term.op == "ne" and term.prop not in MULTI:
        return all(_compare(term.prop, "ne", h, term.values[0]) for h in have)
    return any(_compare(term.prop, term.op, h, term.values[0]) for h in have)
