"""The storage host's objects: produced on demand from ground truth, cached within a budget.

Providers mount a resolver under a path prefix; the resolver says whether an object exists
*now* (a result exists only once its job is complete) and how to produce its bytes. Because
production is deterministic, evicting an object costs CPU, never correctness, so the cache is
bounded by bytes and benchmarks with thousands of jobs keep flat memory.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ObjectSource:
    produce: Callable[[], bytes]  # pure, may be slow: run off the event loop
    content_type: str


@dataclass(frozen=True, slots=True)
class StoredObject:
    body: bytes
    content_type: str
    etag: str
    md5: bytes  # digest of body: Azure's Content-MD5, S3's ETag


Resolver = Callable[[str], ObjectSource | None]


class ObjectStore:
    def __init__(self, *, cache_bytes: int = 256 * 1024 * 1024) -> None:
        self._mounts: list[tuple[str, Resolver]] = []
        self._cache: OrderedDict[str, StoredObject] = OrderedDict()
        self._cached_bytes = 0
        self._budget = cache_bytes
        self._pending: dict[str, asyncio.Task[StoredObject]] = {}

    def mount(self, prefix: str, resolver: Resolver) -> None:
        self._mounts.append((prefix, resolver))

    def source(self, path: str) -> ObjectSource | None:
        for prefix, resolver in self._mounts:
            if path.startswith(prefix):
                return resolver(path)
        return None

    def exists(self, path: str) -> bool:
        return self.source(path) is not None

    async def get(self, path: str) -> StoredObject | None:
        source = self.source(path)
        if source is None:
            return None
        cached = self._cache.get(path)
        if cached is not None:
            self._cache.move_to_end(path)
            return cached
        task = self._pending.get(path)
        if task is None:
            # Production belongs to no single request: one client giving up must not
            # cancel it for the others waiting on the same object.
            task = asyncio.create_task(self._produce(path, source))
            self._pending[path] = task
        return await asyncio.shield(task)

    async def _produce(self, path: str, source: ObjectSource) -> StoredObject:
        try:
            obj = await asyncio.to_thread(_build, source)
        finally:
            del self._pending[path]
        self._remember(path, obj)
        return obj

    def _remember(self, path: str, obj: StoredObject) -> None:
        if len(obj.body) > self._budget:
            return
        self._cache[path] = obj
        self._cached_bytes += len(obj.body)
        while self._cached_bytes > self._budget:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= len(old.body)


def _build(source: ObjectSource) -> StoredObject:
    body = source.produce()
    digest = hashlib.md5(body, usedforsecurity=False).digest()
    return StoredObject(body, source.content_type, f'"{digest.hex()}"', digest)
