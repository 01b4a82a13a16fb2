"""A job store that no longer matches the output it harvested is refused before anything is
sent.

Deleted, truncated to 0 bytes or swapped for an empty store, the sqlite file used to start
afresh silently: ``status --check`` said "no problems" and the rerun created every job a
second time. The output directory records the id of the store that made it
(``.harvester-store.json``), so now ``harvest`` and ``run`` refuse with one line (exit 2),
``status --check`` reports it, and ``bind-output`` or moving the output away are the ways to
go on on purpose. ``copy-store`` carries the id, so a copied store still matches.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from harvester.config import load_config
from harvester.store.binding import MARKER
from harvester.store.sqlite import SqliteStore

from .harness import (
    Case,
    EmulatorThread,
    case,
    check_final,
    child_env,
    harvester,
    scenario,
)


def _files(db: Path) -> list[Path]:
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]


def delete(db: Path) -> None:
    for path in _files(db):
        path.unlink(missing_ok=True)


def truncate(db: Path) -> None:
    for path in _files(db)[1:]:
        path.unlink(missing_ok=True)
    db.write_bytes(b"")


def replace_with_empty(db: Path) -> None:
    fresh = db.with_name("fresh.db")

    async def make() -> None:
        async with SqliteStore(fresh):
            pass

    anyio.run(make)
    delete(db)
    fresh.replace(db)


DAMAGE: dict[str, Callable[[Path], None]] = {
    "deleted": delete,
    "truncated": truncate,
    "replaced": replace_with_empty,
}


def harvested_once(emu: EmulatorThread, folder: Path, prefix: str) -> Case:
    c = case(folder, emu.urls, prefix, playment=3, others=1)
    run = c.harvest()
    assert run.returncode == 0, run.tail()
    check_final(c.config, emu, c.lines, crashed=False)
    return c


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_store_that_does_not_match_its_output_is_refused(
    emu: EmulatorThread, tmp_path: Path, damage: str
) -> None:
    prefix = f"ident-{damage}"
    c = harvested_once(emu, tmp_path, prefix)
    config = c.config
    loaded = load_config(config)
    assert loaded.store.path is not None
    DAMAGE[damage](loaded.store.path)
    env = child_env()
    requests = emu.stats()["requests"]

    for command in (["harvest", str(c.jobs), "--no-progress"], ["run"]):
        refused = c.cli(*command, env=env, timeout=30)
        assert refused.returncode == 2, refused.log
        # (JSON lines are the daemon's log; the error is the one line that is not)
        said = [ln for ln in refused.log.splitlines() if ln.strip() and not ln.startswith("{")]
        assert len(said) == 1 and "Traceback" not in refused.log, refused.log
        assert said[0].startswith(f"harvester: {loaded.output.dir} was harvested by job store")
        marker = json.loads((loaded.output.dir / MARKER).read_text())
        assert marker["store_id"] in said[0] and "bind-output" in said[0], said[0]
    assert emu.stats()["requests"] == requests, "nothing was sent"

    check = c.cli("status", "--check", "--json", env=env, timeout=30)
    assert check.returncode == 1, check.log
    problems = json.loads(check.stdout)["check"]
    assert len(problems) == 1 and marker["store_id"] in problems[0], problems

    # On purpose: adopt the output for the new store; from then on it is the output's store.
    bound = c.cli("bind-output", env=env, timeout=30)
    assert bound.returncode == 0, bound.log
    assert marker["store_id"] in bound.stdout, bound.stdout
    after = json.loads((loaded.output.dir / MARKER).read_text())
    assert after["store_id"] != marker["store_id"]
    fine = c.cli("status", "--check", env=env, timeout=30)
    assert fine.returncode == 0, fine.stdout + fine.log


@pytest.fixture
def own_emu() -> Iterator[EmulatorThread]:
    """An emulator of its own: this test creates jobs twice on purpose."""
    with EmulatorThread(scenario()) as e:
        yield e


def test_moving_the_output_away_lets_a_new_store_start_afresh(
    own_emu: EmulatorThread, tmp_path: Path
) -> None:
    emu = own_emu
    c = harvested_once(emu, tmp_path, "ident-moved")
    loaded = load_config(c.config)
    assert loaded.store.path is not None
    delete(loaded.store.path)
    shutil.move(loaded.output.dir, tmp_path / "out.old")
    old_id = json.loads((tmp_path / "out.old" / MARKER).read_text())["store_id"]
    # The old remote jobs are the user's business now: this run starts afresh, on purpose
    # (Cognite, Bentley and Modzy jobs are created again; Playment answers that the reference
    # ids exist already, and those jobs end in error saying so: exit 1).
    env = child_env()
    creates = sum(emu.stats()[p]["creates"] for p in ("cognite", "bentley", "modzy"))
    run = c.harvest(env=env)
    assert run.returncode in (0, 1), run.tail()
    assert sum(emu.stats()[p]["creates"] for p in ("cognite", "bentley", "modzy")) == creates + 3
    check = c.cli("status", "--check", env=env, timeout=30)
    assert check.returncode == 0, check.stdout + check.log
    assert json.loads((loaded.output.dir / MARKER).read_text())["store_id"] != old_id


def test_a_copied_store_still_matches_its_output(emu: EmulatorThread, tmp_path: Path) -> None:
    c = harvested_once(emu, tmp_path / "old", "ident-copy")
    config, jobs = c.config, c.jobs
    old = load_config(config)
    new_config = tmp_path / "new" / "harvester.toml"
    new_config.parent.mkdir()
    new_config.write_text(
        config.read_text()
        .replace('url = "sqlite://state.db"', f'url = "sqlite://{tmp_path}/new/state.db"')
        .replace('dir = "out"', f'dir = "{old.output.dir}"')
    )
    env = child_env()
    copied = harvester("copy-store", "-c", str(new_config), "--from-config", str(config), env=env)
    assert copied.returncode == 0, copied.log
    requests = emu.stats()["requests"]
    rerun = harvester("harvest", "-c", str(new_config), str(jobs), "--no-progress", env=env)
    assert rerun.returncode == 0, rerun.log
    assert emu.stats()["requests"] == requests, "every job was harvested already"
    check = harvester("status", "-c", str(new_config), "--check", env=env, timeout=30)
    assert check.returncode == 0, check.stdout + check.log
