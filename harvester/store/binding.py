"""The job store and the output directory know each other.

A store that was deleted, truncated or swapped for an empty one looks like a fresh start:
every job of the jobs file is new again, and harvesting would create each remote job a second
time. So the first engine to work a store gives it a random id (meta ``store_id``) and writes
that id into ``output.dir/.harvester-store.json``; from then on ``harvest`` and ``run`` refuse
(one line, exit 2, before anything is added or sent) a store whose id is missing or different
from the marker's, and ``status --check`` reports it.

- A fresh start (no marker, a store without id) binds both: first the store, then the marker,
  so a crash in between leaves a store with an id and no marker, which binds again.
- An output directory without a marker is adopted: it was moved away on purpose, or it
  predates this check. Replicas (one PostgreSQL store, one shared output directory) agree on
  one id through ``add_meta``; each writes the same id into the marker.
- ``copy-store`` copies the meta values, the id with them, so the output still matches.
- ``harvester bind-output`` makes the marker name the current store on purpose.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from harvester.config import StoreConfig
from harvester.errors import OutputError, StoreError
from harvester.fsutil import Tree, write_atomic
from harvester.objstore import Bucket
from harvester.store.base import SharedStore, Store

__all__ = [
    "MARKER",
    "STORE_ID_META",
    "bind_output",
    "binding_problem",
    "rebind_output",
    "store_name",
]

STORE_ID_META = "store_id"
MARKER = ".harvester-store.json"
_MAX_MARKER = 64 * 1024


@dataclass(frozen=True, slots=True)
class Marker:
    store_id: str
    store: str  #: where that store was when it was bound (a path or a URL without password)


def store_name(cfg: StoreConfig) -> str:
    """The store as messages and the marker name it: its path, or its URL (no password)."""
    return str(cfg.path) if cfg.path is not None else cfg.url


#: a local output folder, or an object-store bucket (``output.dir = "s3://..."``)
Output = Path | Bucket


def read_marker(output: Output) -> Marker | None:
    """The marker in ``output`` (None if there is none); ``StoreError`` if it is unreadable."""
    if isinstance(output, Bucket):
        path = output.url(MARKER)
        try:
            got = output.read(MARKER, _MAX_MARKER + 1)
        except OutputError as exc:
            raise StoreError(str(exc)) from exc
        if got is None:
            return None
        data = got
    else:
        path = str(output / MARKER)
        try:
            with open(path, "rb") as fh:
                data = fh.read(_MAX_MARKER + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        doc = orjson.loads(data) if len(data) <= _MAX_MARKER else None
    except orjson.JSONDecodeError:
        doc = None
    if not (isinstance(doc, dict) and isinstance(doc.get("store_id"), str) and doc["store_id"]):
        raise StoreError(
            f"{path}: not a store marker (no store_id); restore it, or run harvester"
            " bind-output to bind this output directory to the configured store"
        )
    return Marker(doc["store_id"], str(doc.get("store", "?")))


async def binding_problem(store: Store, output: Output, where: str) -> str | None:
    """Why ``store`` (named ``where``) must not harvest into ``output``; None if it may."""
    try:
        marker = read_marker(output)
    except StoreError as exc:
        return str(exc)
    if marker is None:
        return None
    store_id = await store.get_meta(STORE_ID_META)
    if store_id == marker.store_id:
        return None
    if store_id is not None:
        what = f"is job store {store_id}"
    elif not any((await store.counts()).values()):
        what = "is now a new, empty one (deleted, truncated or replaced?)"
    else:
        what = "is a store without an id"
    return (
        f"{output} was harvested by job store {marker.store_id} ({marker.store}), but"
        f" {where} {what}; harvesting would submit its jobs again. Restore that store, move"
        " the output directory away, or adopt it on purpose with harvester bind-output"
    )


async def bind_output(store: Store, output: Output, where: str) -> str:
    """Refuse (``StoreError``) a store that does not match ``output``; otherwise make sure
    both record the same id, and return it. Call before anything is added or sent."""
    store_id = await store_binding(store, output, where)
    ensure_marker(output, store_id, where)
    return store_id


async def store_binding(store: Store, output: Output, where: str) -> str:
    """The store's id, once it is known not to contradict ``output`` (else ``StoreError``);
    the marker is left to ``ensure_marker``, which the daemon calls once output.dir can be
    written (it may start on a read-only or full disk and wait, not ready)."""
    problem = await binding_problem(store, output, where)
    if problem is not None:
        raise StoreError(problem)
    return await _ensure_id(store)


def ensure_marker(output: Output, store_id: str, where: str) -> None:
    """Write ``output``'s marker naming ``store_id`` unless it already does (blocking I/O;
    ``OutputError`` when output.dir cannot be written)."""
    marker = read_marker(output)
    if marker is None or marker.store_id != store_id:
        _write_marker(output, store_id, where)


async def rebind_output(store: Store, output: Output, where: str) -> tuple[str | None, str]:
    """Make ``output`` belong to ``store`` whatever its marker said; returns (the id the
    marker had, the store's id)."""
    try:
        marker = read_marker(output)
    except StoreError:
        marker = None
    store_id = await _ensure_id(store)
    _write_marker(output, store_id, where)
    return (marker.store_id if marker else None), store_id


async def _ensure_id(store: Store) -> str:
    store_id = await store.get_meta(STORE_ID_META)
    if store_id is not None:
        return store_id
    new = secrets.token_hex(16)
    if isinstance(store, SharedStore):
        # Replicas starting together on a new store: the first id recorded wins.
        return await store.add_meta(STORE_ID_META, new)
    # sqlite: the engine lock makes this process the only one binding it.
    await store.set_meta(STORE_ID_META, new)
    return new


def _write_marker(output: Output, store_id: str, where: str) -> None:
    doc = {
        "store_id": store_id,
        "store": where,
        "bound_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "about": "the harvester job store this output belongs to; see harvester bind-output",
    }
    data = orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"
    if isinstance(output, Bucket):
        output.put_bytes(MARKER, data)
        return
    # Through output.dir's own descriptor like every other write there (no symlink followed);
    # a failure is an OutputError naming the file.
    with Tree(output).folder(()) as fd:
        write_atomic(
            fd,
            MARKER,
            data,
            shown=str(output / MARKER),
        )
