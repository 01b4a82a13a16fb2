"""``copy_store`` and ``harvester copy-store``: an exact copy into an empty store, the old one
marked as moved; a refused copy changes nothing on either side."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import orjson
import pytest
import structlog

from harvester.cli import main
from harvester.errors import StoreError
from harvester.jobs import Event, JobState
from harvester.store.base import Store
from harvester.store.copy import copy_store
from harvester.store.sqlite import SqliteStore

from .backends import Backend, PostgresBackend, SqliteBackend
from .pgserver import PgServer
from .test_store import NOW, PAYLOAD, new

pytestmark = pytest.mark.anyio

PAIRS = [("sqlite", "sqlite"), ("sqlite", "postgres"), ("postgres", "sqlite")]


def make_backend(kind: str, where: Path, request: pytest.FixtureRequest) -> Backend:
    if kind == "sqlite":
        return SqliteBackend(where)
    server: PgServer = request.getfixturevalue("postgres_server")
    return PostgresBackend(server, request.getfixturevalue("postgres_database"))


async def fill(store: Store) -> None:
    """Jobs in every kind of state, with versions > 0, and a meta value."""
    added = await store.add_jobs(
        [
            new("scan-new"),
            new("scan-submitting"),
            new("scan-running"),
            new("scan-error"),
            new(None, remote_id="remote-tracked", payload=None),
        ],
        now=NOW,
    )
    assert len(added.added) == 5
    by_ref = {j.reference_id or j.remote_id: j for j in await store.jobs()}
    await store.transition(by_ref["scan-submitting"], Event.SUBMIT, now=NOW + 1)
    running = await store.transition(by_ref["scan-running"], Event.SUBMIT, now=NOW + 1)
    running = await store.transition(running, Event.ACCEPTED, now=NOW + 2, remote_id="r-1")
    await store.update(running, now=NOW + 3, remote_status="ongoing", progress=42.5)
    await store.transition(by_ref["scan-error"], Event.GIVE_UP, now=NOW + 4, reason="bad ✗")
    await store.set_meta("playment.batch_id", "batch-1")


@dataclass
class Pair:
    source_backend: Backend
    source: Store
    target: Store


@pytest.fixture(params=PAIRS, ids=["->".join(p) for p in PAIRS])
async def pair(
    request: pytest.FixtureRequest, tmp_path: Path, anyio_backend: str
) -> AsyncIterator[Pair]:
    """Two open stores, the source filled by ``fill``; both closed afterwards."""
    source_kind, target_kind = request.param
    src_backend = make_backend(source_kind, tmp_path / "a", request)
    source, target = src_backend.make(), make_backend(target_kind, tmp_path / "b", request).make()
    await source.open()
    try:
        await target.open()
        try:
            await fill(source)
            yield Pair(src_backend, source, target)
        finally:
            await target.close()
    finally:
        await source.close()


async def test_a_copy_is_exact_and_the_old_store_is_marked_moved(pair: Pair) -> None:
    source, target = pair.source, pair.target
    before = await source.jobs()
    result = await copy_store(source, target, target_name="the new store")
    assert result.jobs == 5 and result.meta == 1
    assert result.by_state[("playment", JobState.SUBMITTING)] == 1
    copied = await target.jobs()
    assert copied == before  # every field, versions included
    for job in copied:
        assert await target.load_payload(job) == await source.load_payload(job)
    assert await target.load_payload(copied[0]) == PAYLOAD
    assert await target.get_meta("playment.batch_id") == "batch-1"
    refs, _ = await target.added_since(0)
    assert sorted(r.key for r in refs) == sorted(j.key for j in copied if not j.terminal)
    # The copied versions are the ones writes must name.
    running = next(j for j in copied if j.state == JobState.RUNNING and j.remote_id == "r-1")
    done = await target.transition(running, Event.COMPLETED, now=NOW + 5)
    assert done.version == running.version + 1
    again = pair.source_backend.make()
    with pytest.raises(StoreError, match="copied to the new store"):
        await again.open()
    await again.close()


async def test_a_copy_into_a_store_that_is_not_empty_changes_nothing(pair: Pair) -> None:
    source, target = pair.source, pair.target
    await target.add_jobs([new("already-here")], now=NOW)
    before = await target.jobs()
    with pytest.raises(StoreError, match="copied only into an empty one"):
        await copy_store(source, target, target_name="the new store")
    assert await target.jobs() == before
    assert await target.get_meta("playment.batch_id") is None
    reopened = pair.source_backend.make()
    await reopened.open()  # not marked: the failed copy left it in use
    try:
        assert len(await reopened.jobs()) == 5
    finally:
        await reopened.close()


def write_config(path: Path, store_url: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'[store]\nurl = "{store_url}"\n\n[providers.playment]\n'
        'api_key_env = "CS_KEY"\nproject_id = "p"\n'
    )
    return path


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """``main`` points structlog at the captured stderr, which is closed after the test."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.mark.usefixtures("logging_restored")
def test_the_command_copies_once_and_refuses_the_old_store_afterwards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CS_KEY", "k")
    old = write_config(tmp_path / "old" / "harvester.toml", "sqlite://state.db")
    fresh = write_config(tmp_path / "new" / "harvester.toml", "sqlite://state.db")

    async def prepare() -> None:
        # The old config's store: state.db beside its config file.
        async with SqliteStore(tmp_path / "old" / "state.db") as source:
            await fill(source)

    anyio.run(prepare)

    assert main(["copy-store", "-c", str(fresh), "--from-config", str(old)]) == 0
    out = capsys.readouterr().out
    assert "copied 5 jobs" in out and "playment submitting: 1" in out, out

    assert main(["copy-store", "-c", str(fresh), "--from-config", str(old)]) == 2
    err = capsys.readouterr().err
    assert "was copied to sqlite://state.db" in err, err
    assert main(["status", "-c", str(old)]) == 2
    assert "harvester copy-store" in capsys.readouterr().err
    assert main(["copy-store", "-c", str(old), "--from-config", str(old)]) == 2
    assert "name the same store" in capsys.readouterr().err
    assert main(["status", "-c", str(fresh), "--json"]) == 0
    status = orjson.loads(capsys.readouterr().out)
    assert [f["reason"] for f in status["failed"]] == ["bad ✗"], status
