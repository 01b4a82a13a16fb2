"""Streaming decoder for the label field of an ASCII PCD (the point cloud format, v0.7).

Playment's second result variant ships labels as a point cloud whose ``FIELDS`` include
``label_key``. The header is parsed line by line (it is short); the body is decoded per block
of rows, vectorised: newline positions split the rows, token starts (a non-blank byte after a
blank one) are found once per block, and ``searchsorted`` of the newlines into the token starts
gives every row's token count and its label token in one call. The label's digits are then
gathered position by position for all rows at once.

Only the label column is validated as a number; the other columns are only counted.
Blank lines in the body are skipped, as PCL's reader does.

The header bounds the body: ``POINTS`` rows of ``columns`` values, each given
``_BYTES_PER_VALUE`` bytes (a float with every digit it can need, its sign, exponent and the
blanks around it fit several times over). A body that goes on past that is refused as soon as
it does, so an endless or inflating file costs at most that much, not a full disk.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

import numpy as np

from harvester.decode._digits import (
    CR,
    NEWLINE,
    SPACE,
    TAB,
    U8,
    ZERO,
    Idx,
    Labels,
    max_digits,
    run_values,
    smallest_uint_dtype,
)
from harvester.decode._stream import StreamDecoder
from harvester.errors import DecodeError

__all__ = ["PcdHeader", "PcdLabelDecoder", "decode_pcd_labels"]

#: bytes of body decoded per vectorised pass
BLOCK = 1 << 20
#: a header longer than this is not a PCD header
_HEADER_MAX: Final = 1 << 20
#: a body row longer than this is rejected, which keeps the carried bytes bounded
_ROW_MAX: Final = 1 << 16
#: spaces after each block: forward gathers of finished labels may run past the last row
_PAD: Final = 32
#: body bytes allowed per value the header declares (see the module docstring)
_BYTES_PER_VALUE: Final = 64
#: ... plus this much for blank lines and comments at the end
_BODY_SLACK: Final = 1 << 16

_KEYWORDS: Final = (
    "VERSION",
    "FIELDS",
    "SIZE",
    "TYPE",
    "COUNT",
    "WIDTH",
    "HEIGHT",
    "VIEWPOINT",
    "POINTS",
    "DATA",
)


@dataclass(frozen=True, slots=True)
class PcdHeader:
    """The parsed header of a PCD file."""

    fields: tuple[str, ...]
    size: tuple[int, ...]
    type: tuple[str, ...]
    count: tuple[int, ...]
    width: int
    height: int
    points: int
    data: str

    def column(self, field: str) -> int:
        """Index of ``field``'s first value in a row (fields before it may have COUNT > 1)."""
        index = self.fields.index(field)
        return sum(self.count[:index])

    @property
    def columns(self) -> int:
        """Values per row."""
        return sum(self.count)


class _Phase(enum.Enum):
    HEADER = "in the header"
    BODY = "in the body"


class PcdLabelDecoder(StreamDecoder):
    """Sans-I/O decoder of one integer field of an ASCII PCD: ``feed`` chunks, then ``finish``.

    Returned arrays all have the smallest unsigned dtype holding ``max_value``. ``DATA
    binary`` and ``binary_compressed`` are rejected. After a ``DecodeError`` the decoder
    refuses further input.
    """

    __slots__ = (
        "_body_max",
        "_carry",
        "_column",
        "_columns",
        "_field",
        "_head",
        "_header",
        "_kmax",
        "_lines",
        "_max_value",
        "_phase",
        "_rows",
        "_scan",
        "_work",
    )

    WHAT = "PCD"

    def __init__(self, *, field: str = "label_key", max_value: int = 2**32 - 1) -> None:
        super().__init__(smallest_uint_dtype(max_value))
        self._field = field
        self._kmax = max_digits(max_value)
        self._max_value = max_value
        self._phase = _Phase.HEADER
        self._rows = 0
        self._head = bytearray()
        self._scan = 0  # header bytes already split into lines
        self._lines: dict[str, tuple[list[str], int]] = {}  # keyword -> (values, offset)
        self._header: PcdHeader | None = None
        self._column = 0
        self._columns = 0
        self._carry: U8 = np.empty(0, dtype=np.uint8)
        self._work = np.empty(0, dtype=np.uint8)
        self._body_max = 0  #: the offset the body may not go past, once the header is read

    @property
    def header(self) -> PcdHeader | None:
        """The header, once its ``DATA`` line has been read."""
        return self._header

    def __repr__(self) -> str:
        return (
            f"<PcdLabelDecoder {self._field!r} {self._state(self._phase.value)} "
            f"rows={self._rows} max_label={self._max_label} offset={self._offset}>"
        )

    def _feed(self, data: U8, base: int) -> Labels:
        """The labels of the rows ``data`` completes."""
        if self._phase is _Phase.HEADER:
            used = self._feed_header(data)
            if used < 0:
                return self._empty()
            data, base = data[used:], base + used
            assert self._header is not None
            row_max = self._header.columns * _BYTES_PER_VALUE + 2
            self._body_max = base + self._header.points * row_max + _BODY_SLACK
        out: list[Labels] = []
        for start in range(0, len(data), BLOCK):
            labels = self._block(data[start : start + BLOCK], base + start)
            if len(labels):
                out.append(labels)
        if self._offset > self._body_max:
            assert self._header is not None
            raise DecodeError(
                f"PCD: the body goes on past the {self._body_max} bytes that POINTS"
                f" {self._header.points} of {self._header.columns} values allows",
                offset=self._body_max,
            )
        if not out:
            return self._empty()
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _finish(self) -> Labels:
        """Decode a last row without a newline, and check the row count against ``POINTS``."""
        # An empty cloud may end right after "DATA ascii", without a newline.
        if self._phase is _Phase.HEADER and not (
            self._scan < len(self._head) and self._head_line(self._scan, len(self._head))
        ):
            raise DecodeError("PCD: the header has no DATA line", offset=self._offset)
        labels = self._empty()
        if len(self._carry):
            # The last row may lack its newline: supply one.
            labels = self._block(np.array([NEWLINE], dtype=np.uint8), self._offset)
        assert self._header is not None
        if self._rows != self._header.points:
            raise DecodeError(
                f"PCD: POINTS says {self._header.points} points, the body has {self._rows}",
                offset=self._offset,
            )
        return labels

    def _release(self) -> None:
        self._carry = np.empty(0, dtype=np.uint8)

    # -- header -----------------------------------------------------------------------------

    def _feed_header(self, data: U8) -> int:
        """Buffer header bytes; returns how many bytes of ``data`` the header took, or -1 when
        the header is still incomplete (all of ``data`` was taken)."""
        before = len(self._head)
        self._head += data[: _HEADER_MAX + 1 - before].tobytes()
        while True:
            end = self._head.find(b"\n", self._scan)
            if end < 0:
                if len(self._head) > _HEADER_MAX:
                    raise DecodeError(
                        f"PCD: no DATA line within the first {_HEADER_MAX} bytes", offset=self._scan
                    )
                return -1
            start, self._scan = self._scan, end + 1
            if self._head_line(start, end):
                used = self._scan - before
                self._head = bytearray()
                self._phase = _Phase.BODY
                return used

    def _head_line(self, start: int, end: int) -> bool:
        """Check one header line; returns True after the DATA line (the header is complete)."""
        raw = bytes(self._head[start:end]).rstrip(b"\r")
        try:
            line = raw.decode("ascii").strip()
        except UnicodeDecodeError:  # no cause: the message and offset say it all
            raise DecodeError("PCD: header line is not ASCII text", offset=start) from None
        if not line or line.startswith("#"):
            return False
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword not in _KEYWORDS:
            raise DecodeError(f"PCD: unknown header line {line[:40]!r}", offset=start)
        if keyword == "DATA":
            self._header = self._make_header(rest.split(), start)
            return True
        if keyword in self._lines:
            raise DecodeError(f"PCD: {keyword} appears twice in the header", offset=start)
        self._lines[keyword] = (rest.split(), start)
        return False

    def _make_header(self, data_words: list[str], data_at: int) -> PcdHeader:
        seen = self._lines

        def words(key: str) -> tuple[list[str], int]:
            if key not in seen:
                raise DecodeError(f"PCD: the header has no {key} line", offset=data_at)
            return seen[key]

        def ints(key: str, *, minimum: int) -> tuple[int, ...]:
            values, at = words(key)
            try:
                parsed = tuple(int(v) for v in values)
            except ValueError:  # no cause: the message and offset say it all
                raise DecodeError(f"PCD: {key} must be integers", offset=at) from None
            if not parsed or min(parsed) < minimum:
                raise DecodeError(f"PCD: {key} must be integers >= {minimum}", offset=at)
            return parsed

        def one(key: str) -> int:
            values = ints(key, minimum=0)
            if len(values) != 1:
                raise DecodeError(f"PCD: {key} takes one value", offset=words(key)[1])
            return values[0]

        if len(data_words) != 1:
            raise DecodeError("PCD: DATA takes one value", offset=data_at)
        data = data_words[0].lower()
        if data != "ascii":
            raise DecodeError(
                f"PCD: DATA {data_words[0]} is not supported (only DATA ascii)", offset=data_at
            )
        fields = tuple(words("FIELDS")[0])
        if not fields:
            raise DecodeError("PCD: FIELDS is empty", offset=words("FIELDS")[1])
        size = ints("SIZE", minimum=1)
        types, types_at = words("TYPE")
        count = ints("COUNT", minimum=1) if "COUNT" in seen else (1,) * len(fields)
        for key, values in (("SIZE", size), ("TYPE", types), ("COUNT", count)):
            if len(values) != len(fields):
                at = seen[key][1] if key in seen else data_at
                raise DecodeError(
                    f"PCD: {key} has {len(values)} values for {len(fields)} FIELDS", offset=at
                )
        if any(t.upper() not in ("I", "U", "F") for t in types):
            raise DecodeError(f"PCD: TYPE must be I, U or F, not {types}", offset=types_at)
        width, height = one("WIDTH"), one("HEIGHT")
        points = one("POINTS") if "POINTS" in seen else width * height
        if points != width * height:
            raise DecodeError(
                f"PCD: POINTS {points} is not WIDTH x HEIGHT ({width} x {height})",
                offset=words("POINTS")[1],
            )
        header = PcdHeader(
            fields=fields,
            size=size,
            type=tuple(t.upper() for t in types),
            count=count,
            width=width,
            height=height,
            points=points,
            data=data,
        )
        fields_at = words("FIELDS")[1]
        if fields.count(self._field) != 1:
            found = "twice" if self._field in fields else "not"
            raise DecodeError(
                f"PCD: field {self._field!r} is {found} in FIELDS {' '.join(fields)}",
                offset=fields_at,
            )
        if count[fields.index(self._field)] != 1:
            raise DecodeError(
                f"PCD: field {self._field!r} has COUNT {count[fields.index(self._field)]}, "
                "expected 1",
                offset=seen["COUNT"][1],
            )
        self._column = header.column(self._field)
        self._columns = header.columns
        self._lines = {}
        return header

    # -- body -------------------------------------------------------------------------------

    def _block(self, piece: U8, piece_at: int) -> Labels:
        """Decode the complete rows of carry + ``piece``; keep the incomplete last row."""
        nc, npc = len(self._carry), len(piece)
        n = 1 + nc + npc
        if len(self._work) < n + _PAD:
            self._work = np.full(max(n, BLOCK + _ROW_MAX + 2) + _PAD, SPACE, dtype=np.uint8)
        work = self._work
        work[0] = NEWLINE  # stands for the newline before the carried row
        work[1 : 1 + nc] = self._carry
        work[1 + nc : n] = piece
        work[n : n + _PAD] = SPACE
        buf = work[:n]
        # The carry is contiguous and ends where the piece starts, and the sentinel stands for
        # the newline right before the carry: one offset maps every index.
        origin = piece_at - nc - 1

        newlines = np.flatnonzero(buf == NEWLINE)
        last = int(newlines[-1])
        labels = self._empty()
        if last > 0:
            labels = self._rows_of(buf[: last + 1], newlines, origin)
        if n - 1 - last > _ROW_MAX:
            raise DecodeError(f"PCD: row longer than {_ROW_MAX} bytes", offset=origin + last + 1)
        self._carry = buf[last + 1 :].copy()
        return labels

    def _rows_of(self, body: U8, newlines: Idx, origin: int) -> Labels:
        """Labels of the rows between consecutive ``newlines`` (``body`` ends with one)."""
        blank = (body == SPACE) | (body == TAB) | (body == CR) | (body == NEWLINE)
        starts = np.flatnonzero(~blank[1:] & blank[:-1]) + 1
        first = np.searchsorted(starts, newlines)
        tokens = np.diff(first)
        rows = np.flatnonzero(tokens)  # blank lines are skipped
        # Rows up to the first one with the wrong width or past POINTS are decoded first, so
        # an earlier bad label is reported before a later bad row.
        assert self._header is not None
        room = self._header.points - self._rows
        wide = np.flatnonzero(tokens.take(rows) != self._columns)
        good = min(int(wide[0]) if len(wide) else len(rows), room)
        labels = self._labels(body, starts.take(first.take(rows[:good]) + self._column), origin)
        self._rows += good
        if good < len(rows):
            row = int(rows[good])
            if good == room:
                message = f"PCD: more rows than POINTS ({self._header.points})"
            else:
                message = (
                    f"PCD: row has {int(tokens[row])} values, FIELDS/COUNT say {self._columns}"
                )
            raise DecodeError(message, offset=origin + int(newlines[row]) + 1)
        return labels

    def _labels(self, body: U8, at: Idx, origin: int) -> Labels:
        """Values of the label tokens starting at ``at``."""
        if len(at) == 0:
            return self._empty()
        lengths = np.zeros(len(at), dtype=np.intp)
        alive = np.ones(len(at), dtype=np.bool_)
        work = self._work
        for k in range(self._kmax + 1):
            alive &= (work.take(at + k) - ZERO) < 10
            if not alive.any():
                break
            lengths += alive
        stop = work.take(at + lengths)
        ends_blank = (stop == SPACE) | (stop == TAB) | (stop == CR) | (stop == NEWLINE)
        malformed = (lengths == 0) | ~ends_blank | (lengths > self._kmax)
        values, overflow = run_values(work, at + lengths - 1, np.minimum(lengths, 20))
        big = overflow | (values > self._max_value)
        wrong = np.flatnonzero(malformed | big)
        if len(wrong):
            i = int(wrong[0])
            if malformed[i]:
                self._reject(body, int(at[i]), origin)
            shown = "" if overflow[i] else f" {int(values[i])}"
            raise DecodeError(
                f"PCD: label{shown} is larger than {self._max_value}", offset=origin + int(at[i])
            )
        labels = values.astype(self._dtype)
        self._emitted(labels, int(values.max()))
        return labels

    def _reject(self, body: U8, at: int, origin: int) -> None:
        """Raise for the malformed label token starting at ``at``."""
        end = at
        while end < len(body) and body[end] not in (SPACE, TAB, CR, NEWLINE) and end - at < 40:
            end += 1
        token = bytes(body[at:end]).decode("ascii", "replace")
        if body[at] == ord("-"):
            reason = "negative label"
        elif end - at > self._kmax and all(ZERO <= b <= ZERO + 9 for b in body[at:end]):
            reason = f"label with more than {self._kmax} digits"
        else:
            reason = "label is not a non-negative integer"
        raise DecodeError(f"PCD: {reason}: {token!r}", offset=origin + at)


def decode_pcd_labels(
    data: bytes | bytearray | memoryview, field: str = "label_key", *, max_value: int = 2**32 - 1
) -> Labels:
    """Decode ``field`` of a whole ASCII PCD held in memory."""
    decoder = PcdLabelDecoder(field=field, max_value=max_value)
    labels = decoder.feed(data)
    rest = decoder.finish()
    return np.concatenate((labels, rest)) if len(rest) else labels
