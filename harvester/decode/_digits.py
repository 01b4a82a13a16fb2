"""Pieces shared by the mask and PCD decoders: byte classes, digit runs, dtypes.

Everything here works on whole arrays of numbers at once; the decoders only loop per chunk
and per digit position (at most 20 of them), never per number or per byte.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt

U8 = npt.NDArray[np.uint8]
U64 = npt.NDArray[np.uint64]
Idx = npt.NDArray[np.intp]
Labels = npt.NDArray[np.unsignedinteger[Any]]

UINT64_MAX: Final = 2**64 - 1

ZERO: Final = 0x30
COMMA: Final = 0x2C
NEWLINE: Final = 0x0A
CR: Final = 0x0D
TAB: Final = 0x09
SPACE: Final = 0x20
OPEN: Final = 0x5B
CLOSE: Final = 0x5D

#: byte classes for the slow, exact paths (the fast paths count instead of classifying)
OTHER: Final = 0
WS: Final = 1
DIGIT: Final = 2
SEP: Final = 3


def _class_table(sep: int) -> U8:
    table = np.full(256, OTHER, dtype=np.uint8)
    table[[TAB, NEWLINE, CR, SPACE]] = WS
    table[ZERO : ZERO + 10] = DIGIT
    table[sep] = SEP
    return table


#: classes for the mask grammar: the comma is the separator
MASK_CLASSES: Final = _class_table(COMMA)


def smallest_uint_dtype(max_label: int) -> np.dtype[Any]:
    """The smallest unsigned dtype holding ``max_label`` (uint8 for 0, and for -1 = "none")."""
    if max_label < -1:
        raise ValueError(f"max_label must be >= -1, not {max_label}")
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"max_label {max_label} does not fit in 64 bits")


def max_digits(max_value: int) -> int:
    """How many digits a label may have: enough for ``max_value``, so no run ever overflows."""
    if not 0 <= max_value <= UINT64_MAX:
        raise ValueError(f"max_value must be within 0..2**64-1, not {max_value}")
    return len(str(max_value))


def accumulator_dtype(k: int) -> np.dtype[Any]:
    """The smallest dtype holding any number of ``k + 1`` digits (``k`` < 19)."""
    return _ACCUMULATORS[k]


#: looked up, not computed: the decoders ask once or twice per block and ``np.iinfo`` is slow
_ACCUMULATORS: Final = tuple(smallest_uint_dtype(10 ** (k + 1) - 1) for k in range(19))


def run_values(buf: U8, ends: Idx, lengths: Idx) -> tuple[U64, npt.NDArray[np.bool_]]:
    """Values of the digit runs ``buf[ends - lengths + 1 : ends + 1]``, and which overflow 64 bits.

    ``lengths`` must be at most 20; callers reject longer runs first. Digits are gathered per
    position from the right, so one pass per digit position covers every run at once.
    """
    value = np.zeros(len(ends), dtype=np.uint64)
    overflow = np.zeros(len(ends), dtype=np.bool_)
    if len(ends) == 0:
        return value, overflow
    longest = int(lengths.max())
    for k in range(longest):
        live = lengths > k
        digit = (buf.take(np.where(live, ends - k, 0)) - ZERO) * live
        if k == 19:
            # The 20th digit is the only one that can push a run past 2**64 - 1.
            high = digit.astype(np.uint64)
            room = np.uint64(UINT64_MAX - 10**19)
            overflow = (high > 1) | ((high == 1) & (value > room))
            value += np.where(overflow, np.uint64(0), high * np.uint64(10**19))
        else:
            value += digit.astype(np.uint64) * np.uint64(10**k)
    return value, overflow


def describe_byte(byte: int) -> str:
    """A byte as a reader wants to see it in an error message."""
    if 0x20 < byte < 0x7F:
        return repr(chr(byte))
    return f"byte 0x{byte:02x}"
