"""The schema's upgrade steps after the first, written once for both dialects.

Each step upgrades a store by one version; a store opened by a newer harvester replays the
steps from where it stopped, in place. Append only: a released step never changes (files and
databases written by older versions depend on replaying exactly what they missed). Step 1,
the tables themselves, is each dialect's own (PostgreSQL's carries the lease columns).
"""

from __future__ import annotations

from dataclasses import dataclass

from harvester.errors import StoreError


@dataclass(frozen=True, slots=True)
class Types:
    """How a dialect spells the column types the later steps add."""

    text: str
    real: str
    flag: str  #: a true/false column, NOT NULL with this default: false
    false: str


SQLITE = Types(text="TEXT", real="REAL", flag="INTEGER", false="0")
POSTGRES = Types(text="text", real="double precision", flag="boolean", false="false")


def later_steps(t: Types) -> tuple[tuple[str, ...], ...]:
    """Steps 2 to 4, in ``t``'s spelling (a dialect may add its own after them)."""
    return (
        # 2: a status the provider does not document, so `harvester status` can name it
        (f"ALTER TABLE jobs ADD COLUMN status_unknown {t.flag} NOT NULL DEFAULT {t.false}",),
        # 3: control (harvester cancel / retry / job_timeout_s): who cancelled, the remote
        # ids of earlier remote attempts (a JSON array), and when the current attempt started
        (
            f"ALTER TABLE jobs ADD COLUMN cancelled_by {t.text}",
            f"ALTER TABLE jobs ADD COLUMN past_remote_ids {t.text}",
            f"ALTER TABLE jobs ADD COLUMN started_at {t.real}",
            # Jobs already running have no start on record; their last change is the best
            # bound we have (never earlier than the start), or job_timeout_s would never end
            # them.
            "UPDATE jobs SET started_at = updated_at WHERE state = 'running'",
        ),
        # 4: a cancel asked of a job another replica holds (kept by the row, never by a write)
        (f"ALTER TABLE jobs ADD COLUMN cancel_requested_at {t.real}",),
    )


def steps_to_apply(
    steps: tuple[tuple[str, ...], ...], current: int, where: str
) -> tuple[tuple[str, ...], ...]:
    """The steps a store at version ``current`` misses; refused if it is newer than us."""
    if current > len(steps):
        raise StoreError(
            f"{where}: job store schema version {current} is newer than this"
            f" harvester understands ({len(steps)}); upgrade harvester"
        )
    return steps[current:]
