"""Which jobs a process still has to finish: the engine's ``remaining``."""

from __future__ import annotations

from collections.abc import Iterator


class Remaining:
    """A set of (provider, key) held as one set of keys per provider.

    A set of tuples costs a 64-byte tuple per job on top of the key; with 100,000 tracked jobs
    that was about 6 MB of a 100 MB budget. The interface is the set's.
    """

    __slots__ = ("_by_provider", "_n")

    def __init__(self) -> None:
        self._by_provider: dict[str, set[str]] = {}
        self._n = 0

    def add(self, item: tuple[str, str]) -> None:
        provider, key = item
        keys = self._by_provider.setdefault(provider, set())
        if key not in keys:
            keys.add(key)
            self._n += 1

    def discard(self, item: tuple[str, str]) -> None:
        provider, key = item
        keys = self._by_provider.get(provider)
        if keys is not None and key in keys:
            keys.remove(key)
            self._n -= 1

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, tuple) or len(item) != 2:
            return False
        keys = self._by_provider.get(item[0])
        return keys is not None and item[1] in keys

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for provider, keys in self._by_provider.items():
            for key in keys:
                yield provider, key

    def count(self, provider: str) -> int:
        """How many jobs of ``provider`` remain."""
        return len(self._by_provider.get(provider, ()))
