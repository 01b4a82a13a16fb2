"""The integrity rules of a job table (``Store.check``), written once for both dialects.

Each rule is a query and how its rows read as problems. The dialects run every query in one
read-only snapshot and add their own engine's check (sqlite's ``integrity_check``); what
differs between them is only the cursor column (``rowid``/``seq``) and how a group's keys are
joined.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from harvester.jobs import JobState
from harvester.store.rows import ID_COLUMNS, NEED_REASON, NEED_REMOTE_ID, safe_key, states_sql

#: (condition, the problem, formatted with the row's state, version and attempts)
_ROW_RULES = (
    (f"state NOT IN ({states_sql(JobState)})", "state {state!r} is not a job state"),
    (
        f"state IN ({states_sql(NEED_REMOTE_ID)}) AND (remote_id IS NULL OR remote_id = '')",
        "{state} without a remote id",
    ),
    (
        f"state IN ({states_sql(NEED_REASON)}) AND (reason IS NULL OR reason = '')",
        "{state} without a reason",
    ),
    (
        "state = 'harvested' AND (output IS NULL OR output = '')",
        "harvested without an output directory",
    ),
    ("reference_id IS NULL AND remote_id IS NULL", "neither a reference id nor a remote id"),
    ("version < 0", "negative version {version}"),
    ("attempts < 0", "negative attempt count {attempts}"),
)


@dataclass(frozen=True, slots=True)
class Rule:
    sql: str
    problems: Callable[[Iterable[Any]], list[str]]  #: the query's rows -> problems found


def rules(order: str, keys_of_group: str) -> list[Rule]:
    """Every rule, for a dialect whose insertion-order column is ``order`` and whose
    aggregate ``keys_of_group`` joins a group's keys into one text."""
    found = [
        Rule(
            "SELECT provider, key, state, version, attempts FROM jobs"
            f" WHERE {condition} ORDER BY {order}",
            _row_problems(problem),
        )
        for condition, problem in _ROW_RULES
    ]
    found += [
        Rule(
            f"SELECT provider, {column}, {keys_of_group} FROM jobs"
            f" WHERE {column} IS NOT NULL GROUP BY provider, {column} HAVING count(*) > 1",
            _shared_problems(name),
        )
        for column, name in ID_COLUMNS
    ]
    found.append(Rule(f"SELECT provider, key FROM jobs ORDER BY {order}", _unsafe_keys))
    return found


def _row_problems(problem: str) -> Callable[[Iterable[Any]], list[str]]:
    def problems(rows: Iterable[Any]) -> list[str]:
        return [
            f"{provider}/{key}: " + problem.format(state=state, version=version, attempts=attempts)
            for provider, key, state, version, attempts in rows
        ]

    return problems


def _shared_problems(name: str) -> Callable[[Iterable[Any]], list[str]]:
    def problems(rows: Iterable[Any]) -> list[str]:
        return [f"{p}: {name} {value!r} is shared by jobs {keys}" for p, value, keys in rows]

    return problems


def _unsafe_keys(rows: Iterable[Any]) -> list[str]:
    # The key names the job's output directory, so an unsafe one is a path traversal.
    return [
        f"{provider}/{key}: key is not a safe path component"
        for provider, key in rows
        if not safe_key(str(key))
    ]
