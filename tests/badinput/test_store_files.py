"""A damaged sqlite store (cut short, overwritten with garbage, not a database at all) gets one
clear line naming the file from every command that opens it, exit 2, no traceback, and the
file is left as it was. (A file cut to 0 bytes is an empty database to SQLite: that case is
the output marker's, ``tests/chaos/test_store_identity.py``.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from .helpers import GOOD_LINE, SECRET_ENV, Workspace, cli

PAGE = 4096


def cut_short(db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(data[: 2 * PAGE])


def garbage_pages(db: Path) -> None:
    with open(db, "r+b") as fh:
        fh.seek(PAGE)
        fh.write(bytes(range(256)) * (2 * PAGE // 256))


def not_a_database(db: Path) -> None:
    db.write_bytes(b"this is not an SQLite file\n" * 400)


DAMAGE: dict[str, Callable[[Path], None]] = {
    "cut-short": cut_short,
    "garbage-pages": garbage_pages,
    "not-a-database": not_a_database,
}


def damaged_workspace(tmp_path: Path, damage: str) -> tuple[Workspace, Path]:
    ws = Workspace(tmp_path)
    # Enough rows for several pages, all in the main file (no WAL to fall back on).
    many = [dict(GOOD_LINE, reference_id=f"bulk-{i:03d}") for i in range(60)]
    bulk = ws.write("bulk.jsonl", "".join(json.dumps(line) + "\n" for line in many))
    assert cli("submit", "-c", str(ws.config), str(bulk)).code == 0
    db = tmp_path / "state.db"
    for suffix in ("-wal", "-shm"):
        assert not Path(f"{db}{suffix}").exists(), "closed cleanly: everything is in the file"
    assert db.stat().st_size > 3 * PAGE
    DAMAGE[damage](db)
    return ws, db


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize(
    "command",
    [["status"], ["status", "--check"], ["submit", "GOOD"], ["harvest", "--no-progress"], ["run"]],
    ids=lambda c: "-".join(c).replace("--", ""),
)
def test_a_damaged_store_file_gets_one_line(
    tmp_path: Path, damage: str, command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    ws, db = damaged_workspace(tmp_path, damage)
    good = ws.write("good2.jsonl", json.dumps(dict(GOOD_LINE, reference_id="good-2")) + "\n")
    args = [str(good) if a == "GOOD" else a for a in command]
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    done = cli(args[0], "-c", str(ws.config), *args[1:])
    assert done.code == 2, (done.code, done.out, done.err)
    said = [line for line in done.lines if not line.startswith("{")]
    assert len(said) == 1 and "Traceback" not in done.err, done.err
    assert said[0].startswith(f"harvester: {db}: "), said[0]
    assert "the file is damaged" in said[0] or "not a database" in said[0], said[0]
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before, "the file is left as it was"
