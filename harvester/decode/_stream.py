"""The lifecycle both streaming decoders share: counters, ``feed``/``finish``, and refusing
input after an error or after ``finish``."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from harvester.decode._digits import U8, Labels
from harvester.errors import DecodeError


class StreamDecoder:
    """Sans-I/O: ``feed`` chunks as they arrive, then ``finish``. Subclasses decode in
    ``_feed``/``_finish`` and raise ``DecodeError``; after one, every call is refused."""

    __slots__ = ("_count", "_done", "_dtype", "_error", "_max_label", "_offset")

    #: how this decoder's messages begin: "mask", "PCD"
    WHAT: ClassVar[str]

    def __init__(self, dtype: np.dtype[Any]) -> None:
        self._dtype = dtype
        self._error: DecodeError | None = None
        self._done = False
        self._offset = 0
        self._count = 0
        self._max_label = -1

    @property
    def count(self) -> int:
        """Labels emitted so far."""
        return self._count

    @property
    def max_label(self) -> int:
        """Largest label emitted so far, -1 when none."""
        return self._max_label

    @property
    def offset(self) -> int:
        """Bytes fed so far (an unfinished number or row is held until its end arrives)."""
        return self._offset

    def feed(self, chunk: bytes | bytearray | memoryview) -> Labels:
        """Decode ``chunk``; returns the labels it completes (possibly none)."""
        self._check_usable()
        data = np.frombuffer(chunk, dtype=np.uint8)
        base = self._offset
        self._offset += len(data)
        try:
            return self._feed(data, base)
        except DecodeError as exc:
            self._fail(exc)
            raise

    def finish(self) -> Labels:
        """Check that the input ended where it may; returns the labels still pending."""
        self._check_usable()
        try:
            labels = self._finish()
        except DecodeError as exc:
            self._fail(exc)
            raise
        self._done = True
        return labels

    def _feed(self, data: U8, base: int) -> Labels:
        raise NotImplementedError

    def _finish(self) -> Labels:
        raise NotImplementedError

    def _release(self) -> None:
        """Drop what is held for the next chunk: after an error there is none."""

    def _empty(self) -> Labels:
        return np.empty(0, dtype=self._dtype)

    def _emitted(self, labels: Labels, top: int) -> None:
        self._count += len(labels)
        self._max_label = max(self._max_label, top)

    def _state(self, phase: str) -> str:
        """``phase`` as a reader of ``repr`` wants it: failed and finished win."""
        return "failed" if self._error is not None else "finished" if self._done else phase

    def _check_usable(self) -> None:
        if self._error is not None:
            raise DecodeError(
                f"{self.WHAT}: decoder already failed ({self._error.message})",
                offset=self._error.offset,
            )
        if self._done:
            raise RuntimeError(f"{type(self).__name__} used after finish()")

    def _fail(self, exc: DecodeError) -> None:
        self._error = exc
        self._release()
