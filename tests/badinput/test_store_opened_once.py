"""Every command opens its store once (``lifecycle.opened``). ``harvest`` used to add its jobs
through one opening and work through a second (removed in 509f804); this keeps it so for
every command, the daemon's ``run`` aside (tests/daemon)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harvester.store.sqlite import SqliteStore

from .helpers import GOOD_LINE, SECRET_ENV, Workspace, cli


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The path of every sqlite store opened, in order."""
    seen: list[Path] = []
    real = SqliteStore.open

    async def counting(self: SqliteStore, *args: Any, **kw: Any) -> Any:
        seen.append(self.path)
        return await real(self, *args, **kw)

    monkeypatch.setattr(SqliteStore, "open", counting)
    return seen


def test_each_command_opens_its_store_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opened: list[Path]
) -> None:
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    ws = Workspace(tmp_path)
    config = str(ws.config)
    jobs = ws.write("jobs.jsonl", json.dumps({**GOOD_LINE, "reference_id": "good-2"}) + "\n")
    target = ws.write(
        "target.toml",
        ws.config.read_text().replace(f"sqlite://{tmp_path}/state.db", f"sqlite://{tmp_path}/b.db"),
    )
    commands: list[tuple[str, ...]] = [
        ("submit", "-c", config, str(jobs)),
        ("status", "-c", config),
        ("status", "-c", config, "--check"),
        ("jobs", "-c", config),
        ("retry", "-c", config, "no-such-key"),
        ("cancel", "-c", config, "no-such-key"),
        ("bind-output", "-c", config),
        # Every provider at 127.0.0.1:9 (nothing listens): the timeout ends it, exit 3.
        ("harvest", "-c", config, str(jobs), "--timeout", "0.5", "--no-progress"),
    ]
    for args in commands:
        opened.clear()
        done = cli(*args)
        assert done.code in (0, 2, 3), (args, done.err)
        assert opened == [tmp_path / "state.db"], args
    opened.clear()
    done = cli("copy-store", "-c", str(target), "--from-config", config)
    assert done.code == 0, done.err
    assert opened == [tmp_path / "state.db", tmp_path / "b.db"]  # each of its two stores once
