"""The store and the output directory know each other (``harvester.store.binding``), on every
backend: a fresh pair binds, the same store passes, a store without the output's id (emptied,
replaced) or with another one is refused, ``copy-store`` carries the id, and replicas that
bind one new PostgreSQL store together agree on one id."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from harvester.errors import StoreError
from harvester.store.base import NewJob, Store
from harvester.store.binding import (
    MARKER,
    STORE_ID_META,
    bind_output,
    binding_problem,
    rebind_output,
)
from harvester.store.copy import copy_store
from harvester.store.sqlite import SqliteStore

from .backends import Backend, PostgresBackend

pytestmark = pytest.mark.anyio


async def test_a_fresh_pair_binds_and_the_same_store_passes(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert await binding_problem(store, out, "here") is None, "fresh: nothing to say"
    first = await bind_output(store, out, "here")
    marker = json.loads((out / MARKER).read_text())
    assert marker["store_id"] == first == await store.get_meta(STORE_ID_META)
    assert await bind_output(store, out, "here") == first
    assert await binding_problem(store, out, "here") is None


async def test_an_output_moved_away_is_adopted(store: Store, tmp_path: Path) -> None:
    first = await bind_output(store, tmp_path / "out", "here")
    (tmp_path / "out").rename(tmp_path / "out.old")
    assert await bind_output(store, tmp_path / "out", "here") == first
    assert json.loads((tmp_path / "out" / MARKER).read_text())["store_id"] == first


@pytest.mark.parametrize("swap", ["emptied", "other-id", "jobs-but-no-id"])
async def test_a_store_that_is_not_the_outputs_is_refused_until_rebound(
    store: Store, backend: Backend, tmp_path: Path, swap: str
) -> None:
    out = tmp_path / "out"
    first = await bind_output(store, out, "here")
    if swap == "other-id":
        backend.raw("UPDATE meta SET value = 'another' WHERE name = ?", (STORE_ID_META,))
        says = "is job store another"
    else:
        backend.raw("DELETE FROM meta WHERE name = ?", (STORE_ID_META,))
        says = "is now a new, empty one"
        if swap == "jobs-but-no-id":
            await store.add_jobs([NewJob("playment", "j", "j", None, {"a": 1}, "t:1")], now=1.0)
            says = "is a store without an id"
    problem = await binding_problem(store, out, "here")
    assert problem is not None and first in problem and says in problem, problem
    before = (out / MARKER).read_bytes()
    with pytest.raises(StoreError) as refused:
        await bind_output(store, out, "here")
    assert str(refused.value) == problem
    assert (out / MARKER).read_bytes() == before, "a refusal writes nothing"
    assert await store.get_meta(STORE_ID_META) == ("another" if swap == "other-id" else None)

    was, now = await rebind_output(store, out, "here")
    assert was == first and now != first
    assert await bind_output(store, out, "here") == now


async def test_a_marker_that_is_not_one_is_reported(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text("{}")
    problem = await binding_problem(store, out, "here")
    assert problem is not None and "not a store marker" in problem, problem


async def test_copy_store_carries_the_id(backend: Backend, tmp_path: Path) -> None:
    out = tmp_path / "out"
    async with SqliteStore(tmp_path / "old.db") as old:
        first = await bind_output(old, out, "old")
        new = backend.make()
        await new.open()
        try:
            await copy_store(old, new, target_name="new")
            assert await binding_problem(new, out, "new") is None
            assert await bind_output(new, out, "new") == first
        finally:
            await new.close()


async def test_replicas_binding_a_new_store_together_agree_on_one_id(
    shared_backend: PostgresBackend, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    stores = [shared_backend.make_shared() for _ in range(4)]
    ids: list[str] = []
    try:
        for s in stores:
            await s.open()

        async def bind(s: Store) -> None:
            ids.append(await bind_output(s, out, "db"))

        async with anyio.create_task_group() as tg:
            for s in stores:
                tg.start_soon(bind, s)
    finally:
        for s in stores:
            await s.close()
    assert len(ids) == 4 and len(set(ids)) == 1, ids
    assert json.loads((out / MARKER).read_text())["store_id"] == ids[0]
