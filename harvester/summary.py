"""What a person sees: the progress bar while harvesting and the tables at the end."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from harvester.jobs import TERMINAL, UNSUCCESSFUL, Job, JobState

_ORDER = list(JobState)
MAX_FAILURES_SHOWN = 20


def status_json(
    counts: dict[tuple[str, JobState], int],
    failures: Sequence[Job],
    *,
    providers: Sequence[str] | None = None,
    unknown: Mapping[tuple[str, str], int] | None = None,
) -> dict[str, Any]:
    by_provider: dict[str, dict[str, int]] = {}
    for (provider, state), n in sorted(counts.items()):
        if providers is not None and provider not in providers:
            continue
        by_provider.setdefault(provider, {})[state.value] = n
    return {
        "providers": by_provider,
        "total": sum(sum(v.values()) for v in by_provider.values()),
        "failed": [
            {
                "provider": j.provider,
                "key": j.key,
                "reference_id": j.reference_id,
                "remote_id": j.remote_id,
                "state": j.state.value,
                "remote_status": j.remote_status,
                "reason": j.reason,
            }
            for j in failures
            if providers is None or j.provider in providers
        ],
        # Jobs kept polling because their provider answered a status it does not document.
        "unknown_statuses": [
            {"provider": p, "status": raw, "jobs": n}
            for (p, raw), n in sorted((unknown or {}).items(), key=lambda kv: (-kv[1], kv[0]))
            if providers is None or p in providers
        ],
    }


def unknown_line(doc: Mapping[str, Any]) -> str | None:
    """``N jobs in a status harvester does not know: playment "in_review" x2, ...``."""
    rows = doc["unknown_statuses"]
    if not rows:
        return None
    total = sum(r["jobs"] for r in rows)
    each = ", ".join(f"{r['provider']} {json.dumps(r['status'])} x{r['jobs']}" for r in rows)
    noun = "job" if total == 1 else "jobs"
    return f"{total} {noun} in a status harvester does not know (polled as running): {each}"


def render_run(run: dict[str, float], console: Console | None = None) -> None:
    console = console or Console(file=sys.stdout)
    mb = run["downloaded_bytes"] / 1e6
    console.print(
        f"{run['elapsed_s']:.1f} s: {int(run['requests'])} requests"
        f" ({int(run['rate_limited'])} rate-limited, {int(run['retries'])} retried),"
        f" {mb:.1f} MB downloaded, {run['decode_seconds']:.2f} s decoding"
    )


def render_status(
    counts: dict[tuple[str, JobState], int],
    failures: Sequence[Job],
    *,
    providers: Sequence[str] | None = None,
    console: Console | None = None,
    unknown: Mapping[tuple[str, str], int] | None = None,
) -> None:
    console = console or Console(file=sys.stdout)
    doc = status_json(counts, failures, providers=providers, unknown=unknown)
    states = [s for s in _ORDER if any(s.value in row for row in doc["providers"].values())]
    table = Table(title="harvester jobs", show_footer=False)
    table.add_column("provider")
    for state in states:
        table.add_column(state.value, justify="right")
    table.add_column("total", justify="right")
    for provider, row in doc["providers"].items():
        table.add_row(provider, *(str(row.get(s.value, 0)) for s in states), str(sum(row.values())))
    if not doc["providers"]:
        console.print("no jobs in the store")
        return
    console.print(table)
    line = unknown_line(doc)
    if line:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    failed = doc["failed"]
    if failed:
        ftable = Table(title=f"jobs that did not harvest ({len(failed)})")
        for col in ("provider", "job", "state", "reason"):
            ftable.add_column(col, overflow="fold")
        for f in failed[:MAX_FAILURES_SHOWN]:
            ftable.add_row(f["provider"], f["key"], f["state"], f["reason"] or "")
        console.print(ftable)
        if len(failed) > MAX_FAILURES_SHOWN:
            console.print(
                f"... and {len(failed) - MAX_FAILURES_SHOWN} more: harvester status --json"
            )


class Progress:
    """A progress bar of terminal jobs over all jobs, fed by the engine's ``on_change``."""

    def __init__(
        self,
        counts: dict[tuple[str, JobState], int],
        providers: Sequence[str],
        *,
        enabled: bool,
    ) -> None:
        self.enabled = enabled
        self.providers = set(providers)
        self.states: dict[tuple[str, str], JobState] = {}
        self.base = {k: v for k, v in counts.items() if k[0] in self.providers}
        self.total = sum(self.base.values())
        self.done = sum(n for (_, s), n in self.base.items() if s in TERMINAL)
        self._bar: RichProgress | None = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self._bar = RichProgress(
                TextColumn("[bold]harvesting"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                console=Console(file=sys.stderr),
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(
                "harvest", total=self.total, completed=self.done, detail=""
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, tb)
            self._bar = None

    def update(self, job: Job) -> None:
        key = (job.provider, job.key)
        before = self.states.get(key)
        self.states[key] = job.state
        if job.terminal and (before is None or before not in TERMINAL):
            self.done += 1
        if self._bar is not None:
            failed = sum(1 for s in self.states.values() if s in UNSUCCESSFUL)
            detail = f"[red]{failed} failed[/]" if failed else ""
            self._bar.update(self._task, completed=min(self.done, self.total), detail=detail)
