from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harvester.decode import PcdHeader, PcdLabelDecoder, decode_pcd_labels
from harvester.errors import DecodeError

U32_MAX = 2**32 - 1

HEADER = b"""# .PCD v0.7 - Point Cloud Data file format
VERSION .7
FIELDS x y z label_key
SIZE 4 4 4 4
TYPE F F F U
COUNT 1 1 1 1
WIDTH 3
HEIGHT 1
VIEWPOINT 0 0 0 1 0 0 0
POINTS 3
DATA ascii
"""
ROWS = b"0.5 -1.25 3 16\n1e-3 2 0 58\nnan 0 0 7\n"


def header(**changes: bytes) -> bytes:
    """HEADER with whole lines replaced: ``header(FIELDS=b"FIELDS x y z label")``."""
    text = HEADER
    for key, line in changes.items():
        text = re.sub(rb"(?m)^" + key.encode() + rb" .*$", line, text)
    return text


def header_of(decoder: PcdLabelDecoder) -> PcdHeader | None:
    return decoder.header  # a call, so mypy does not keep an earlier narrowing


def feed_all(
    data: bytes, cuts: Sequence[int] = (), **kw: str
) -> tuple[np.ndarray, PcdLabelDecoder]:
    decoder = PcdLabelDecoder(**kw)  # type: ignore[arg-type]
    bounds = [0, *sorted(set(cuts)), len(data)]
    parts = [decoder.feed(data[a:b]) for a, b in itertools.pairwise(bounds)]
    parts.append(decoder.finish())
    assert len({p.dtype for p in parts}) == 1
    return np.concatenate(parts), decoder


def rejects(data: bytes, message: str, offset: int, **kw: str) -> None:
    chunkings: list[Sequence[int]] = [[], range(len(data))]
    for cuts in chunkings:
        with pytest.raises(DecodeError, match=message) as info:
            feed_all(data, cuts, **kw)
        assert info.value.offset == offset, (cuts, str(info.value))
        assert str(info.value).endswith(f"at byte {offset}")


# -- examples -----------------------------------------------------------------------------


def test_decodes_the_label_column() -> None:
    labels, decoder = feed_all(HEADER + ROWS)
    assert labels.tolist() == [16, 58, 7]
    assert labels.dtype == np.uint32
    assert (decoder.count, decoder.max_label, decoder.offset) == (3, 58, len(HEADER + ROWS))
    assert decoder.header == PcdHeader(
        fields=("x", "y", "z", "label_key"),
        size=(4, 4, 4, 4),
        type=("F", "F", "F", "U"),
        count=(1, 1, 1, 1),
        width=3,
        height=1,
        points=3,
        data="ascii",
    )


def test_header_is_none_until_the_data_line_arrives() -> None:
    decoder = PcdLabelDecoder()
    decoder.feed(HEADER[:-5])
    assert header_of(decoder) is None
    assert decoder.feed(HEADER[-5:] + b"1 2 3 4\n").tolist() == [4]
    head = header_of(decoder)
    assert head is not None and head.points == 3


def test_column_accounts_for_fields_with_count_above_one() -> None:
    head = header(
        FIELDS=b"FIELDS x y z normal label_key intensity",
        SIZE=b"SIZE 4 4 4 4 4 4",
        TYPE=b"TYPE F F F F U F",
        COUNT=b"COUNT 1 1 1 3 1 1",
    )
    rows = b"1 2 3 9 9 9 16 0.5\n1 2 3 9 9 9 58 0.5\n1 2 3 9 9 9 7 0.5\n"
    assert decode_pcd_labels(head + rows).tolist() == [16, 58, 7]


def test_other_field_names_and_first_column() -> None:
    head = header(FIELDS=b"FIELDS label x y z")
    assert decode_pcd_labels(head + b"5 1 2 3\n6 1 2 3\n7 1 2 3", field="label").tolist() == [
        5,
        6,
        7,
    ]


@pytest.mark.parametrize(
    "rows",
    [
        b"1 2 3 16\r\n1 2 3 58\r\n1 2 3 7\r\n",
        b"1 2 3 16\n1 2 3 58\n1 2 3 7",
        b"  1\t2  3 16  \n\n1 2 3 58\n \t \n1 2 3   7\t\n\n",
    ],
)
def test_line_endings_blank_lines_and_spacing(rows: bytes) -> None:
    assert decode_pcd_labels(HEADER + rows).tolist() == [16, 58, 7]


def test_header_comments_blank_lines_and_crlf() -> None:
    head = HEADER.replace(b"\n", b"\r\n").replace(b"VERSION .7", b"# note\r\n\r\nVERSION .7")
    assert decode_pcd_labels(head + ROWS).tolist() == [16, 58, 7]


def test_optional_header_lines_have_defaults() -> None:
    head = b"FIELDS x label_key\nSIZE 4 4\nTYPE F U\nWIDTH 2\nHEIGHT 1\nDATA ascii\n"
    labels, decoder = feed_all(head + b"0 1\n0 2\n")
    assert labels.tolist() == [1, 2]
    assert decoder.header is not None
    assert (decoder.header.count, decoder.header.points) == ((1, 1), 2)


@pytest.mark.parametrize("end", [b"", b"\n", b"\n\n  \r\n"])
def test_empty_cloud(end: bytes) -> None:
    head = header(WIDTH=b"WIDTH 0", POINTS=b"POINTS 0").removesuffix(b"\n") + end
    labels, decoder = feed_all(head, range(len(head)))
    assert labels.size == 0 and decoder.count == 0 and decoder.max_label == -1


def test_large_cloud_in_uneven_chunks() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 70000, 200_000)
    xyz = rng.normal(size=(len(labels), 3)).round(4)
    rows = "".join(f"{x} {y} {z} {v}\n" for (x, y, z), v in zip(xyz.tolist(), labels, strict=True))
    head = header(WIDTH=b"WIDTH 200000", POINTS=b"POINTS 200000")
    data = head + rows.encode()
    cuts = [*rng.integers(0, len(data), 30).tolist(), len(head) - 1, 1 << 20]
    got, decoder = feed_all(data, cuts)
    assert np.array_equal(got, labels)
    assert decoder.max_label == labels.max()


def test_max_value_sets_the_dtype_and_the_limit() -> None:
    assert decode_pcd_labels(HEADER + ROWS, max_value=255).dtype == np.uint8
    data = HEADER + b"1 2 3 16\n1 2 3 300\n1 2 3 7\n"
    with pytest.raises(DecodeError, match="300 is larger than 255") as info:
        decode_pcd_labels(data, max_value=255)
    assert info.value.offset == len(HEADER) + 15


def test_decoder_refuses_input_after_an_error() -> None:
    decoder = PcdLabelDecoder()
    with pytest.raises(DecodeError):
        decoder.feed(HEADER + b"1 2 3 -1\n")
    with pytest.raises(DecodeError, match="already failed"):
        decoder.feed(b"1 2 3 4\n")


# -- rejections ---------------------------------------------------------------------------

DATA_AT = HEADER.index(b"DATA")
FIELDS_AT = HEADER.index(b"FIELDS")
BODY_AT = len(HEADER)


@pytest.mark.parametrize("kind", [b"binary", b"binary_compressed"])
def test_rejects_binary_data(kind: bytes) -> None:
    data = header(DATA=b"DATA " + kind) + b"\x00\x01\x02\x03" * 12
    rejects(data, f"DATA {kind.decode()} is not supported", DATA_AT)


def test_rejects_a_missing_field() -> None:
    rejects(header(FIELDS=b"FIELDS x y z label") + ROWS, "'label_key' is not in FIELDS", FIELDS_AT)
    rejects(HEADER + ROWS, "'class' is not in FIELDS", FIELDS_AT, field="class")


@pytest.mark.parametrize(
    ("rows", "at", "message"),
    [
        (b"1 2 3 16\n1 2 3\n1 2 3 7\n", 9, "row has 3 values, FIELDS/COUNT say 4"),
        (b"1 2 3 16\n1 2 3 58 0\n1 2 3 7\n", 9, "row has 5 values"),
        (b"1 2 3 16\n1 2 3 -58\n1 2 3 7\n", 15, "negative label: '-58'"),
        (b"1 2 3 16\n1 2 3 5.8\n1 2 3 7\n", 15, "not a non-negative integer: '5.8'"),
        (b"1 2 3 16\n1 2 3 nan\n1 2 3 7\n", 15, "not a non-negative integer: 'nan'"),
        (b"1 2 3 16\n1 2 3 1e3\n1 2 3 7\n", 15, "not a non-negative integer"),
        (b"1 2 3 16\n1 2 3 4294967296\n", 15, "larger than 4294967295"),
        (b"1 2 3 16\n1 2 3 99999999999999\n", 15, "more than 10 digits"),
        (b"1 2 3 16\n1 2 3 58\n", 18, "POINTS says 3 points, the body has 2"),
        (b"1 2 3 16\n1 2 3 58", 17, "POINTS says 3 points, the body has 2"),
        (b"1 2 3 16\n1 2 3 58\n1 2 3 7\n1 2 3 9\n", 26, r"more rows than POINTS \(3\)"),
        # An earlier bad label is reported before a later bad row.
        (b"1 2 3 x\n1 2 3\n", 6, "not a non-negative integer"),
    ],
)
def test_rejects_bad_rows(rows: bytes, at: int, message: str) -> None:
    rejects(HEADER + rows, message, BODY_AT + at)


@pytest.mark.parametrize(
    ("data", "at", "message"),
    [
        (b"<html><body>Access Denied</body></html>\n", 0, "unknown header line"),
        (HEADER[:60], 60, "no DATA line"),
        (b"", 0, "no DATA line"),
        (header(SIZE=b"SIZE 4 4 4"), HEADER.index(b"SIZE"), "SIZE has 3 values for 4 FIELDS"),
        (header(TYPE=b"TYPE F F F Q"), HEADER.index(b"TYPE"), "TYPE must be I, U or F"),
        (header(COUNT=b"COUNT 1 1 1 2"), HEADER.index(b"COUNT"), "has COUNT 2"),
        (header(POINTS=b"POINTS 4"), HEADER.index(b"POINTS"), "not WIDTH x HEIGHT"),
        (header(WIDTH=b"WIDTH three"), HEADER.index(b"WIDTH"), "WIDTH must be integers"),
        (header(FIELDS=b"FIELDS x label_key z label_key"), FIELDS_AT, "is twice in FIELDS"),
        (
            HEADER.replace(b"WIDTH 3\n", b"WIDTH 3\nWIDTH 3\n"),
            HEADER.index(b"WIDTH") + 8,
            "WIDTH appears twice",
        ),
        (HEADER.replace(b"SIZE 4 4 4 4\n", b""), DATA_AT - 13, "no SIZE line"),
        (HEADER.replace(b"VERSION", b"VERSI\xc3\xb6N"), HEADER.index(b"VERSION"), "not ASCII"),
    ],
)
def test_rejects_bad_headers(data: bytes, at: int, message: str) -> None:
    rejects(data + ROWS if data.endswith(b"ascii\n") else data, message, at)


def test_rejects_an_endless_row_without_holding_it() -> None:
    decoder = PcdLabelDecoder()
    decoder.feed(HEADER)
    with pytest.raises(DecodeError, match="row longer than") as info:
        for _ in range(100):
            decoder.feed(b"1" * 4096)
    assert info.value.offset == BODY_AT


# -- properties ---------------------------------------------------------------------------

blank_st = st.sampled_from([b" ", b"  ", b"\t", b" \t"])
value_st = st.one_of(
    st.floats(allow_nan=True, allow_infinity=False, width=32).map(lambda f: repr(f).encode()),
    st.integers(-(10**6), 10**6).map(lambda v: str(v).encode()),
)


@st.composite
def clouds(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """A random ASCII PCD: field order, COUNTs, spacing, line endings and blank lines vary."""
    names = draw(st.permutations(["x", "y", "z", "rgb", "label_key"]))
    counts = [1 if name == "label_key" else draw(st.integers(1, 3)) for name in names]
    labels = draw(st.lists(st.integers(0, U32_MAX), max_size=40))
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    head = b"".join(
        line + eol
        for line in [
            b"# generated",
            b"VERSION .7",
            b"FIELDS " + " ".join(names).encode(),
            b"SIZE " + b" ".join(b"4" for _ in names),
            b"TYPE " + b" ".join(b"U" if n == "label_key" else b"F" for n in names),
            b"COUNT " + " ".join(map(str, counts)).encode(),
            f"WIDTH {len(labels)}".encode(),
            b"HEIGHT 1",
            f"POINTS {len(labels)}".encode(),
            b"DATA ascii",
        ]
    )
    rows = []
    for label in labels:
        values: list[bytes] = []
        for name, count in zip(names, counts, strict=True):
            if name == "label_key":
                values.append(str(label).encode())
            else:
                values += [draw(value_st) for _ in range(count)]
        lead = draw(st.sampled_from([b"", b" "]))
        row = lead + b"".join(v + draw(blank_st) for v in values[:-1]) + values[-1]
        rows.append(row + draw(st.sampled_from([b"", b" "])) + eol)
        if draw(st.integers(0, 9)) == 0:
            rows.append(eol)
    body = b"".join(rows)
    unterminated = draw(st.booleans())
    if rows and unterminated:
        body = body[: -len(eol)]  # no newline after the last row
    return head + body, labels


@settings(max_examples=200, deadline=None)
@given(st.data(), clouds())
def test_any_layout_and_chunking_round_trips(
    data: st.DataObject, cloud: tuple[bytes, list[int]]
) -> None:
    text, labels = cloud
    if len(text) < 600 and data.draw(st.booleans()):
        cuts: list[int] = list(range(1, len(text)))
    else:
        cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    got, decoder = feed_all(text, cuts)
    assert np.array_equal(got, np.array(labels, dtype=np.uint64))
    assert got.dtype == np.uint32
    assert decoder.count == len(labels)
    assert decoder.max_label == max(labels, default=-1)
    assert decoder.offset == len(text)
