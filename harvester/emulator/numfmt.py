"""Vectorised number-to-ASCII rendering.

Each field of a text row becomes a ``Columns`` pair: a (rows, width) byte matrix and a mask of
the bytes that are really there. Fields are laid side by side and the masked bytes read out in
row-major order, so a whole file is rendered with a handful of numpy operations instead of one
Python ``str()`` per number (millions of points must render in well under a second).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

_ZERO = ord("0")


class Columns(NamedTuple):
    chars: npt.NDArray[np.uint8]
    keep: npt.NDArray[np.bool_]


def digits(values: npt.NDArray[np.integer], *, width: int | None = None) -> Columns:
    """Decimal digits of non-negative integers, right-aligned, without leading zeros."""
    v = np.asarray(values).astype(np.uint64, copy=False)
    if v.size and int(np.asarray(values).min()) < 0:
        raise ValueError("digits() takes non-negative integers")
    w = width if width is not None else _width(v)
    chars = _digit_matrix(v, w)
    ndig = np.ones(v.shape, dtype=np.int64)
    for k in range(1, w):
        ndig += v >= np.uint64(10**k)
    keep = np.arange(w)[None, :] >= (w - ndig)[:, None]
    return Columns(chars, keep)


def zero_padded(values: npt.NDArray[np.integer], width: int) -> Columns:
    """Exactly ``width`` digits, leading zeros kept (fractional parts)."""
    v = np.asarray(values).astype(np.uint64, copy=False)
    chars = _digit_matrix(v, width)
    return Columns(chars, np.ones(chars.shape, dtype=np.bool_))


def fixed_point(values: npt.NDArray[np.floating], decimals: int) -> list[Columns]:
    """``-12.345`` style columns: sign (only when negative), integer part, '.', fraction."""
    scale = 10**decimals
    scaled = np.rint(np.abs(np.asarray(values, dtype=np.float64)) * scale).astype(np.uint64)
    negative = (np.asarray(values) < 0) & (scaled > 0)  # never print "-0.000"
    n = scaled.shape[0]
    sign = Columns(np.full((n, 1), ord("-"), dtype=np.uint8), negative[:, None])
    return [
        sign,
        digits(scaled // np.uint64(scale)),
        constant(n, b"."),
        zero_padded(scaled % np.uint64(scale), decimals),
    ]


def constant(rows: int, text: bytes) -> Columns:
    chars = np.broadcast_to(np.frombuffer(text, dtype=np.uint8), (rows, len(text)))
    return Columns(np.ascontiguousarray(chars), np.ones((rows, len(text)), dtype=np.bool_))


def render(fields: list[Columns]) -> bytes:
    if not fields or fields[0].chars.shape[0] == 0:
        return b""
    chars = np.concatenate([f.chars for f in fields], axis=1)
    keep = np.concatenate([f.keep for f in fields], axis=1)
    return bytes(chars[keep].tobytes())


def _width(v: npt.NDArray[np.uint64]) -> int:
    return len(str(int(v.max()))) if v.size else 1


def _digit_matrix(v: npt.NDArray[np.uint64], width: int) -> npt.NDArray[np.uint8]:
    # Narrow dtypes keep the (rows, width) temporaries small for multi-million-point frames.
    dtype = np.uint32 if (not v.size or int(v.max()) < 2**32) else np.uint64
    work: npt.NDArray[np.unsignedinteger] = v.astype(dtype)
    powers: npt.NDArray[np.unsignedinteger] = (10 ** np.arange(width - 1, -1, -1)).astype(dtype)
    out = (work[:, None] // powers[None, :]) % dtype(10)
    return (out + _ZERO).astype(np.uint8)
