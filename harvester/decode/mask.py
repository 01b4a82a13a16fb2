"""Streaming decoder for Playment label masks: a text array of integers, one label per point.

A mask looks like ``[16, 58, 58, 1, 4,\\n 7, 0, ...]``, arrives in chunks that split numbers
anywhere, and holds millions of labels, so decoding is vectorised per block of bytes:

1. The block is copied into a work buffer behind spaces and a sentinel comma that stands for the
   previous separator, so every number has a separator before it, and reads that run off the
   front of the block see a harmless non-digit.
2. Commas are found with one comparison and one ``nonzero``, run over 2-byte pairs rather than
   bytes: ``nonzero`` costs per element scanned, and valid commas are at least two bytes apart.
   The pairs are offset by one byte from the buffer's 2-byte words, so pair p is bytes 2p - 1
   and 2p, and the word just before it (bytes 2p - 2 and 2p - 1) ends with the comma or with
   the units digit.
3. A number's digits end right before its comma: the units digit is one byte before it, the
   tens digit two bytes, and so on. So the 2-byte words before every comma's pair are gathered
   for all numbers at once (one ``take`` per two digit positions, five digits need three), and
   each digit is picked from them by whether the comma is byte 2p - 1 or 2p.
4. Validation is a count, not a classification: the block is well formed when its gathered
   digits, commas and bytes up to ' ' add up to its length, and none of the latter is a control
   byte (one XOR and one minimum; tabs and CRs, once seen, are counted instead). The gather loop
   stops as soon as they do.
5. Anything unusual (whitespace before a comma, a stray byte, a long number, the closing ``]``)
   goes to the exact path, which classifies every byte, reports the first problem by absolute
   byte offset, or decodes the block when there is no problem after all.

The bytes after the last comma of a block are carried into the next block.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from harvester.decode._digits import (
    CLOSE,
    COMMA,
    CR,
    DIGIT,
    MASK_CLASSES,
    NEWLINE,
    OPEN,
    OTHER,
    SEP,
    SPACE,
    TAB,
    U8,
    ZERO,
    Idx,
    Labels,
    accumulator_dtype,
    describe_byte,
    max_digits,
    run_values,
    smallest_uint_dtype,
)
from harvester.decode._stream import StreamDecoder
from harvester.errors import DecodeError

__all__ = ["MaskDecoder", "decode_mask"]

#: bytes decoded per vectorised pass: large enough to amortise ~100 numpy calls per block, small
#: enough for a block and its temporaries to stay in a 2 MiB L2 cache
BLOCK = 1 << 20
#: spaces in front of each block (even, for 2-byte words): more than the longest number
_PAD: Final = 32
#: a carry longer than this (only whitespace runs do that) is squeezed to its digits
_CARRY_MAX: Final = 64
#: ``b ^ _XOR_LOW`` is 31 for '\\n', above 31 for ' ' to '9', below 31 for any other byte below ' '
_XOR_LOW: Final = np.uint8(21)


class _Phase(enum.Enum):
    START = "before '['"
    BODY = "inside the array"
    DONE = "after ']'"


@dataclass(slots=True)
class _Where:
    """Maps an index of the assembled block back to an absolute byte offset of the stream."""

    sep: int  #: offset of the separator the sentinel stands for
    carry: Idx  #: offsets of the carried bytes (not contiguous once squeezed)
    piece: int  #: offset of the first byte of the new piece

    def __call__(self, i: int) -> int:
        if i == 0:
            return self.sep
        if i - 1 < len(self.carry):
            return int(self.carry[i - 1])
        return self.piece + i - 1 - len(self.carry)


class _Result(NamedTuple):
    labels: Labels
    top: int  #: largest label, -1 when there is none
    last: int  #: index of the last separator whose number is complete
    close: int  #: index of the closing ']', or -1


class MaskDecoder(StreamDecoder):
    """Sans-I/O decoder: ``feed`` chunks as they arrive, then ``finish``.

    Every returned array has the same dtype, the smallest unsigned type that holds
    ``max_value`` (uint32 by default). A number may have at most as many digits as
    ``max_value`` (so a run of leading zeros cannot smuggle in an unbounded digit run).
    After a ``DecodeError`` the decoder refuses further input.
    """

    __slots__ = (
        "_carry",
        "_carry_pos",
        "_flags",
        "_kmax",
        "_max_value",
        "_more_ws",
        "_open",
        "_phase",
        "_sep",
        "_step",
        "_words",
        "_work",
    )

    WHAT = "mask"

    def __init__(self, *, max_value: int = 2**32 - 1) -> None:
        super().__init__(smallest_uint_dtype(max_value))
        self._kmax = max_digits(max_value)
        self._max_value = max_value
        self._phase = _Phase.START
        self._carry: U8 = np.empty(0, dtype=np.uint8)
        self._carry_pos: Idx = np.empty(0, dtype=np.intp)
        self._sep = -1
        self._open = True  # the last separator is the '[' itself, so `[]` is still allowed
        self._more_ws = False  # tabs or CRs seen once: count them in every later block
        self._step = BLOCK
        size = _PAD + 2 + _CARRY_MAX + BLOCK
        # Whole 2-byte words. Each block is copied in behind the padding, and nothing past a
        # block's end is ever read, so only the padding needs a value: no 2 MiB of memset for
        # each decoder (one per label file).
        self._work = np.empty(size + (size & 1), dtype=np.uint8)
        self._work[:_PAD] = SPACE
        self._words = self._work.view(np.uint16)
        self._flags = np.empty(len(self._work), dtype=np.bool_)

    def __repr__(self) -> str:
        return (
            f"<MaskDecoder {self._state(self._phase.value)} count={self._count} "
            f"max_label={self._max_label} offset={self._offset}>"
        )

    def _finish(self) -> Labels:
        """The array must have been closed; nothing is pending after ']'."""
        if self._phase is _Phase.START:
            raise DecodeError("mask: no '[' found, this is not a label array", offset=self._offset)
        if self._phase is _Phase.BODY:
            if len(self._carry):
                # An error inside the carried bytes comes before the missing ']'.
                self._check_carry()
            raise DecodeError("mask: the array is not closed by ']'", offset=self._offset)
        return self._empty()

    def _release(self) -> None:
        self._carry = np.empty(0, dtype=np.uint8)

    def _feed(self, data: U8, base: int) -> Labels:
        out: list[Labels] = []
        pos = 0
        while pos < len(data):
            if self._phase is _Phase.BODY:
                pos += self._block(data[pos : pos + self._step], base + pos, out)
            elif self._phase is _Phase.START:
                skip = _first_non_ws(data[pos:])
                if skip < 0:
                    break
                pos += skip
                if data[pos] != OPEN:
                    found = describe_byte(int(data[pos]))
                    raise DecodeError(f"mask: expected '[', found {found}", offset=base + pos)
                self._phase = _Phase.BODY
                self._sep = base + pos
                pos += 1
            else:
                skip = _first_non_ws(data[pos:])
                if skip >= 0:
                    found = describe_byte(int(data[pos + skip]))
                    raise DecodeError(
                        f"mask: data after the closing ']': {found}", offset=base + pos + skip
                    )
                break
        if not out:
            return self._empty()
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _block(self, piece: U8, piece_at: int, out: list[Labels]) -> int:
        """Decode one block; returns how many bytes of ``piece`` it consumed."""
        nc, npc = len(self._carry), len(piece)
        work = self._work
        work[_PAD] = COMMA
        work[_PAD + 1 : _PAD + 1 + nc] = self._carry
        work[_PAD + 1 + nc : _PAD + 1 + nc + npc] = piece
        buf = work[_PAD : _PAD + 1 + nc + npc]
        where = _Where(self._sep, self._carry_pos, piece_at)

        res = self._fast(buf)
        if res is None:
            res = self._exact(buf, where, 0)
        elif res.close >= 0:
            tail = self._exact(buf, where, res.last)
            res = _Result(
                np.concatenate((res.labels, tail.labels)),
                max(res.top, tail.top),
                tail.last,
                tail.close,
            )
        if len(res.labels):
            out.append(res.labels)
            self._emitted(res.labels, res.top)

        if res.close >= 0:
            self._phase = _Phase.DONE
            self._carry = np.empty(0, dtype=np.uint8)
            self._carry_pos = np.empty(0, dtype=np.intp)
            return res.close - nc  # ']' is always in the piece: the carry was scanned before

        if res.last > 0:
            self._sep = where(res.last)
            self._open = False
        keep = res.last + 1  # first byte after the last complete separator
        tail_pos = piece_at + np.arange(max(keep - 1 - nc, 0), npc, dtype=np.intp)
        if keep - 1 < nc:
            tail_pos = np.concatenate((self._carry_pos[keep - 1 :], tail_pos))
        self._carry = buf[keep:].copy()
        self._carry_pos = tail_pos
        if len(self._carry) > _CARRY_MAX:
            self._squeeze_carry()
        return npc

    def _fast(self, buf: U8) -> _Result | None:
        """The common case, or None when the block needs the exact path."""
        close = -1
        region = buf
        if buf.max() > ZERO + 9:
            close = int(np.argmax(buf > ZERO + 9))
            if buf[close] != CLOSE:
                return None
            region = buf[:close]
        n = len(region)
        flags = self._flags
        # Valid commas are at least two bytes apart, so each 2-byte pair holds at most one:
        # scanning pairs halves the elements `nonzero` walks (two commas in a pair make the
        # counts below disagree, and the exact path reports them). The marks go one byte late,
        # flags[i + 1] for region[i], so pair p covers bytes 2p - 1 and 2p and the word before
        # it already holds the comma or the units digit: one fewer `take` (see _gather).
        np.equal(region, COMMA, out=flags[1 : n + 1])  # flags[0] pairs with the sentinel
        flags[n + 1] = False
        size = n + 1 + ((n + 1) & 1)
        pairs = np.flatnonzero(flags[:size].view(np.uint16) != 0)[1:]
        if len(pairs) == 0:
            return _Result(np.empty(0, dtype=self._dtype), -1, 0, close)
        end = 2 * int(pairs[-1])
        last = end if flags[end + 1] else end - 1
        body = region[: last + 1]
        # The marks are no longer needed: count whitespace into them (no new 1 MiB arrays).
        # Without tabs or CRs, one pass counts every byte up to ' ': whitespace, or a control
        # byte that one more pass rules out once the counts agree (below).
        marks = flags[: len(body)]
        controls = False
        if self._more_ws:
            ws = _whitespace(body, marks)
        else:
            ws = int(np.count_nonzero(np.less_equal(body, SPACE, out=marks)))
            # Which of those bytes are whitespace is told below; this pass runs here, while
            # the block is still in the cache. x ^ 21 maps '\n' to 31, bytes from ' ' to '9'
            # above 31, and every other byte below ' ' below 31.
            controls = bool(np.bitwise_xor(body, _XOR_LOW, out=marks.view(np.uint8)).min() < 31)
        # Every byte up to the last comma is a comma, whitespace or a digit of some number,
        # so this many digits must be found; the gather loop stops when they are.
        digits = last + 1 - (1 + len(pairs)) - ws
        got = self._gather(pairs, digits)
        if got is None:
            return None
        values, total = got
        if total != digits:
            return None
        # Now every byte above ' ' is a comma or a gathered digit, and those up to ' ' must be
        # whitespace: tabs and CRs are, any other control byte is not.
        if controls:
            if _whitespace(body, marks) != ws:
                return None
            self._more_ws = True
        top = int(values.max())
        if top > self._max_value:
            return None
        return _Result(values.astype(self._dtype, copy=False), top, last, close)

    def _gather(self, pairs: Idx, digits: int) -> tuple[Labels, int] | None:
        """Values of the numbers before the commas in ``pairs``, and how many digits they span.

        Pair p's comma is byte 2p - 1 or 2p. Going back from byte 2p - 1, the bytes are
        ``seq`` = high byte of word p - 1, low byte of word p - 1, high of word p - 2, ...,
        taken as whole 2-byte words from views of the work buffer shifted by whole words, so
        no index array is ever computed. Digit k (units first) is ``seq[k]`` when the comma is
        byte 2p, ``seq[k + 1]`` when it is ``seq[0]``. The loop stops once ``digits`` digits
        are found, or no number has a digit left.
        """
        words = self._words
        base = _PAD // 2 - 1
        seq: list[U8] = []

        def back(i: int) -> U8:
            while len(seq) <= i:
                # mode="wrap" skips the bounds check (the views hold every index): a cheaper loop
                word = words[base - len(seq) // 2 :].take(pairs, mode="wrap")
                seq.append((word // np.uint16(256)).astype(np.uint8))  # faster than >> 8
                seq.append(word.astype(np.uint8))
            return seq[i]

        # 0xFF where seq[0] is the comma, else 0: picks a digit with three bitwise operations
        pick = (back(0) != COMMA).view(np.uint8)
        pick -= 1

        def digit(k: int) -> U8:
            here = back(k)
            d = np.bitwise_xor(here, back(k + 1))
            d &= pick
            d ^= here
            d -= ZERO
            return d

        unit = digit(0)
        if unit.max() > 9:
            return None  # whitespace before a comma, or two separators in a row
        values: Labels = unit
        total = len(pairs)
        alive: npt.NDArray[np.bool_] | None = None
        pending: tuple[int, U8] | None = None  # an even position's digits, awaiting a partner
        k = 1
        while total < digits:
            d = digit(k)
            more = d < 10
            if alive is not None:
                more &= alive
            live = int(np.count_nonzero(more))
            if live == 0:
                break
            if k >= self._kmax:
                return None  # longer than any allowed label
            total += live
            d *= more.view(np.uint8)  # same dtypes: a bool operand takes a slower loop
            alive = more
            if k >= 18:
                # Past 18 digits, one position at a time: only the 20th can overflow 64 bits
                # (the exact path reports it).
                room = np.uint64(2**64 - 1 - 10**19)
                if k == 19 and np.any((d > 1) | ((d == 1) & (values > room))):
                    return None
                values = _scaled_add(values, d, k, k)
            elif k == 1:
                d *= np.uint8(10)
                values += d
            elif k % 2 == 0:
                pending = (k, d)
            else:
                # Two digits fit a uint8 (at most 99), so widen once per pair, not per digit.
                assert pending is not None
                d *= np.uint8(10)
                d += pending[1]
                values = _scaled_add(values, d, k - 1, k)
                pending = None
            k += 1
        if pending is not None:
            values = _scaled_add(values, pending[1], pending[0], pending[0])
        return values, total

    def _exact(self, buf: U8, where: _Where, start: int) -> _Result:
        """Classify every byte of ``buf[start:]``; raise at the first problem, else decode it."""
        seg = buf[start:]
        is_open = self._open and start == 0
        cls = MASK_CLASSES.take(seg)
        cls[0] = SEP
        bad = np.flatnonzero(cls == OTHER)
        lim = int(bad[0]) if len(bad) else len(seg)
        digit = cls[:lim] == DIGIT
        begins = np.flatnonzero(digit & ~np.concatenate(([False], digit[:-1])))
        ends = np.flatnonzero(digit & ~np.concatenate((digit[1:], [False])))
        seps = np.flatnonzero(cls[:lim] == SEP)
        lengths = ends - begins + 1

        # Candidate problems as (index in seg, message); the earliest is reported.
        problems: list[tuple[int, str]] = []
        at = np.concatenate((seps, begins))
        is_num = np.concatenate((np.zeros(len(seps), bool), np.ones(len(begins), bool)))
        order = np.argsort(at, kind="stable")
        at, is_num = at[order], is_num[order]
        twice = np.flatnonzero(is_num[1:] == is_num[:-1])
        if len(twice):
            i = int(twice[0]) + 1
            if is_num[i]:
                problems.append((int(at[i]), "missing comma between two numbers"))
            elif i == 1 and is_open:
                problems.append((int(at[i]), "expected a number after '[', found ','"))
            else:
                problems.append((int(at[i]), "two commas in a row"))

        values, overflow = run_values(seg, ends, np.minimum(lengths, 20))
        big = (lengths <= 20) & (overflow | (values > self._max_value))
        long = lengths > self._kmax
        for i in np.flatnonzero(big | long)[:1]:
            if big[i]:
                shown = "" if overflow[i] else f" {int(values[i])}"
                problems.append((int(begins[i]), f"label{shown} is larger than {self._max_value}"))
            else:
                zeros = " (counting leading zeros)" if seg[begins[i]] == ZERO else ""
                problems.append(
                    (int(begins[i]), f"number has more than {self._kmax} digits{zeros}")
                )

        close = -1
        if lim < len(seg):
            if seg[lim] == CLOSE:
                close = lim
                if not is_num[-1] and not (len(is_num) == 1 and is_open):
                    problems.append((int(at[-1]), "trailing comma before ']'"))
            else:
                problems.append((lim, _bad_byte(seg, lim)))
        if problems:
            index, message = min(problems, key=lambda p: p[0])
            raise DecodeError(f"mask: {message}", offset=where(start + index))

        complete = len(begins) if close >= 0 else int(np.searchsorted(begins, seps[-1]))
        labels = values[:complete]
        top = int(labels.max()) if complete else -1
        return _Result(
            labels.astype(self._dtype),
            top,
            start + int(seps[-1]),
            start + close if close >= 0 else -1,
        )

    def _check_carry(self) -> None:
        """Raise for any problem the carried bytes already have, whatever follows them."""
        buf = np.concatenate((np.array([COMMA], dtype=np.uint8), self._carry))
        self._exact(buf, _Where(self._sep, self._carry_pos, -1), 0)

    def _squeeze_carry(self) -> None:
        """Shrink a long carry (a long whitespace run) to its digits and one following space."""
        self._check_carry()
        digits = np.flatnonzero((self._carry - ZERO) < 10)
        if len(digits) == 0:
            keep = np.empty(0, dtype=np.intp)
        else:
            stop = min(int(digits[-1]) + 2, len(self._carry))
            keep = np.arange(int(digits[0]), stop, dtype=np.intp)
        self._carry = self._carry[keep]
        self._carry_pos = self._carry_pos[keep]


def _scaled_add(values: Labels, part: U8, scale: int, top: int) -> Labels:
    """``values + part * 10**scale`` in a dtype holding any number of ``top + 1`` digits."""
    dtype = accumulator_dtype(min(top, 18))
    out: Labels = part.astype(dtype)
    out *= dtype.type(10**scale)
    out += values.astype(dtype, copy=False)  # same dtypes, as above
    return out


def _whitespace(body: U8, marks: npt.NDArray[np.bool_]) -> int:
    """How many bytes of ``body`` are whitespace (``marks`` is scratch space of its length)."""
    return sum(
        int(np.count_nonzero(np.equal(body, ws, out=marks))) for ws in (SPACE, NEWLINE, TAB, CR)
    )


def _first_non_ws(data: U8) -> int:
    """Index of the first byte of ``data`` that is not whitespace, or -1 when there is none.

    Looks at growing windows, so finding the '[' at the start of a whole block stays cheap.
    """
    start, size = 0, 64
    while start < len(data):
        part = data[start : start + size]
        ws = (part == SPACE) | (part == NEWLINE) | (part == CR) | (part == TAB)
        if not ws.all():
            return start + int(np.argmin(ws))
        start += size
        size *= 8
    return -1


def _bad_byte(seg: U8, i: int) -> str:
    byte = int(seg[i])
    if byte == ord("-"):
        return "negative label (minus sign)"
    if byte == ord("."):
        return "decimal point: labels are integers"
    if byte in (ord("e"), ord("E")) and ZERO <= int(seg[i - 1]) <= ZERO + 9:
        return "exponent: labels are integers"
    if byte == OPEN:
        return "unexpected '[' inside the array"
    return f"unexpected {describe_byte(byte)}"


def decode_mask(data: bytes | bytearray | memoryview, *, max_value: int = 2**32 - 1) -> Labels:
    """Decode a whole mask held in memory."""
    decoder = MaskDecoder(max_value=max_value)
    labels = decoder.feed(data)
    rest = decoder.finish()
    return np.concatenate((labels, rest)) if len(rest) else labels
