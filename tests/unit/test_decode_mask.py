from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harvester.decode import MaskDecoder, decode_mask, smallest_uint_dtype
from harvester.decode import mask as mask_module
from harvester.errors import DecodeError

WS = b" \t\r\n"
U32_MAX = 2**32 - 1


def feed_all(data: bytes, cuts: Sequence[int] = (), **kw: int) -> tuple[np.ndarray, MaskDecoder]:
    """Decode ``data`` split at ``cuts``; returns the labels and the finished decoder."""
    decoder = MaskDecoder(**kw)
    bounds = [0, *sorted(set(cuts)), len(data)]
    parts = [decoder.feed(data[a:b]) for a, b in itertools.pairwise(bounds)]
    parts.append(decoder.finish())
    dtypes = {p.dtype for p in parts}
    assert len(dtypes) == 1, dtypes
    return np.concatenate(parts), decoder


def error_offset(data: bytes, cuts: Sequence[int] = (), **kw: int) -> int:
    with pytest.raises(DecodeError) as info:
        feed_all(data, cuts, **kw)
    assert info.value.offset is not None
    assert str(info.value).endswith(f"at byte {info.value.offset}")
    return info.value.offset


@contextmanager
def small_blocks(size: int) -> Iterator[None]:
    """Shrink the decoder's block so small inputs cross many block boundaries."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mask_module, "BLOCK", size)
        yield


def reference(data: bytes, max_value: int = U32_MAX) -> list[int] | int:
    """The mask grammar, one byte at a time: the labels, or the offset of the first error."""
    digits_max = len(str(max_value))
    n, i = len(data), 0

    def skip(i: int) -> int:
        while i < n and data[i] in WS:
            i += 1
        return i

    i = skip(i)
    if i == n or data[i] != ord("["):
        return i
    labels: list[int] = []
    i = skip(i + 1)
    comma = -1  # offset of the comma before the expected number, -1 right after '['
    if i < n and data[i] == ord("]"):
        i += 1
    else:
        while True:
            if i == n:
                return n
            if data[i] == ord("]") and comma >= 0:
                return comma  # trailing comma
            if not 0x30 <= data[i] <= 0x39:
                return i
            start = i
            while i < n and 0x30 <= data[i] <= 0x39:
                i += 1
            if i - start > digits_max or int(data[start:i]) > max_value:
                return start
            labels.append(int(data[start:i]))
            i = skip(i)
            if i == n:
                return n
            if data[i] == ord("]"):
                i += 1
                break
            if data[i] != ord(","):
                return i
            comma = i
            i = skip(i + 1)
    i = skip(i)
    return i if i < n else labels


# -- examples -----------------------------------------------------------------------------


def test_decodes_a_wrapped_mask() -> None:
    data = b"[16, 58, 58, 1, 4,\n 7, 0, 59]\n"
    labels, decoder = feed_all(data)
    assert labels.tolist() == [16, 58, 58, 1, 4, 7, 0, 59]
    assert labels.dtype == np.uint32
    assert (decoder.count, decoder.max_label, decoder.offset) == (8, 59, len(data))


@pytest.mark.parametrize("data", [b"[]", b" [ ]  ", b"\n[\r\n]\n", b"\t[]\t"])
def test_empty_array_has_no_labels(data: bytes) -> None:
    labels, decoder = feed_all(data)
    assert labels.size == 0
    assert (decoder.count, decoder.max_label) == (0, -1)


@pytest.mark.parametrize(
    "data",
    [
        b"[1,2,3]",
        b"[ 1 , 2 , 3 ]",
        b"[1\t,\t2\r\n,3]",
        b"[\n1,\n2,\n3\n]",
        b"  [001, 02, 3]",
    ],
)
def test_whitespace_anywhere_between_tokens(data: bytes) -> None:
    assert decode_mask(data).tolist() == [1, 2, 3]


def test_largest_label_and_dtype_follow_max_value() -> None:
    assert decode_mask(b"[4294967295, 0]").tolist() == [U32_MAX, 0]
    small = decode_mask(b"[255, 3]", max_value=255)
    assert small.dtype == np.uint8 and small.tolist() == [255, 3]
    big = decode_mask(b"[18446744073709551615]", max_value=2**64 - 1)
    assert big.dtype == np.uint64 and big.tolist() == [2**64 - 1]


def test_numbers_split_across_chunks() -> None:
    data = b"[12345, 678,\n 9]"
    for cut in range(len(data) + 1):
        labels, _ = feed_all(data, [cut])
        assert labels.tolist() == [12345, 678, 9], cut
    labels, _ = feed_all(data, range(len(data)))
    assert labels.tolist() == [12345, 678, 9]


def test_feed_returns_labels_as_soon_as_their_comma_arrives() -> None:
    decoder = MaskDecoder()
    assert decoder.feed(b"[1, 2").tolist() == [1]
    assert decoder.feed(b"3, 4").tolist() == [23]
    assert decoder.feed(memoryview(b"]")).tolist() == [4]
    assert decoder.finish().size == 0
    assert (decoder.count, decoder.max_label, decoder.offset) == (3, 23, 10)


def test_large_mask_in_uneven_chunks() -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 65536, 400_000)
    text = ",\n ".join(", ".join(map(str, row)) for row in labels.reshape(-1, 20).tolist())
    data = f"[{text}]".encode()
    cuts = [*rng.integers(0, len(data), 40).tolist(), 1 << 20, (1 << 20) + 1]
    got, decoder = feed_all(data, cuts)
    assert np.array_equal(got, labels)
    assert decoder.max_label == labels.max()
    assert decoder.count == len(labels)


def test_long_whitespace_runs_are_not_held_in_memory() -> None:
    data = b"[1," + b" " * 5000 + b"23" + b"\n" * 5000 + b", 4]"
    labels, _ = feed_all(data, range(0, len(data), 100))
    assert labels.tolist() == [1, 23, 4]
    decoder = MaskDecoder()
    decoder.feed(b"[1," + b" " * 5000 + b"23" + b"\n" * 5000)
    assert len(decoder._carry) <= 64  # the run is squeezed, not carried
    # Offsets stay exact after squeezing.
    broken = b"[1," + b" " * 5000 + b"23" + b"\n" * 5000 + b"5]"
    assert error_offset(broken, range(0, len(broken), 100)) == len(broken) - 2


def test_long_whitespace_before_and_after_the_array() -> None:
    lead = b" \t" * 300 + b"\r\n" * 200  # past the first windows searched for '['
    labels, _ = feed_all(lead + b"[1, 2]" + lead)
    assert labels.tolist() == [1, 2]
    assert error_offset(lead + b"x[1]") == len(lead)
    assert error_offset(lead + b"[1]" + lead + b"x") == 2 * len(lead) + 3


@pytest.mark.parametrize("block", [None, 4, 7])
def test_work_buffers_are_read_only_where_written(block: int | None) -> None:
    # The buffers are allocated uninitialised past the padding: fill them with digits and
    # comma marks, which change the labels if anything past a block's end is ever read.
    data = b"[12345, 6, 78,\n 9,10 , 2]"
    with small_blocks(block) if block else nullcontext():
        decoder = MaskDecoder()
        decoder._work[mask_module._PAD :] = ord("9")
        decoder._flags[:] = True
        parts = [decoder.feed(data[i : i + 3]) for i in range(0, len(data), 3)]
    parts.append(decoder.finish())
    assert np.concatenate(parts).tolist() == [12345, 6, 78, 9, 10, 2]


def test_decoder_refuses_input_after_an_error_or_finish() -> None:
    decoder = MaskDecoder()
    with pytest.raises(DecodeError):
        decoder.feed(b"[1, x")
    with pytest.raises(DecodeError, match=r"already failed.*at byte 4"):
        decoder.feed(b"2]")
    done = MaskDecoder()
    done.feed(b"[]")
    done.finish()
    with pytest.raises(RuntimeError):
        done.feed(b" ")


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        (-1, np.uint8),
        (0, np.uint8),
        (255, np.uint8),
        (256, np.uint16),
        (65535, np.uint16),
        (65536, np.uint32),
        (U32_MAX, np.uint32),
        (2**32, np.uint64),
        (2**64 - 1, np.uint64),
    ],
)
def test_smallest_uint_dtype(value: int, dtype: type) -> None:
    assert smallest_uint_dtype(value) == np.dtype(dtype)


def test_smallest_uint_dtype_rejects_what_does_not_fit() -> None:
    with pytest.raises(ValueError):
        smallest_uint_dtype(2**64)
    with pytest.raises(ValueError):
        MaskDecoder(max_value=2**64)


# -- rejections ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "offset", "message"),
    [
        (b"[-1]", 1, "negative"),
        (b"[1, -2]", 4, "negative"),
        (b"[1, 2x]", 5, "unexpected 'x'"),
        (b'["1"]', 1, "unexpected '\"'"),
        (b"[1,\x0b2]", 3, "byte 0x0b"),
        (b"[1.5]", 2, "decimal point"),
        (b"[1, 2.0]", 5, "decimal point"),
        (b"[1e5]", 2, "exponent"),
        (b"[7, 1E5]", 5, "exponent"),
        (b"[1,,2]", 3, "two commas"),
        (b"[1, 2,\n,3]", 7, "two commas"),
        (b"[, 1]", 1, "after '['"),
        (b"[1 2]", 3, "missing comma"),
        (b"[1\n2, 3]", 3, "missing comma"),
        (b"[1, 2, ]", 5, "trailing comma"),
        (b"[1,]", 2, "trailing comma"),
        (b"[4294967296]", 1, "larger than 4294967295"),
        (b"[1, 99999999999999999999999]", 4, "more than 10 digits"),
        (b"[00000000001]", 1, "more than 10 digits"),
        (b"[1] x", 4, "after the closing"),
        (b"[1]]", 3, "after the closing"),
        (b"[1][2]", 3, "after the closing"),
        (b"[1, [2]]", 4, "'['"),
        (b"[1, 2", 5, "not closed"),
        (b"[1, 2,", 6, "not closed"),
        (b"[", 1, "not closed"),
        (b"1, 2]", 0, "expected '['"),
        (b"  x[1]", 2, "expected '['"),
        (b"", 0, "no '['"),
        (b"  \n", 3, "no '['"),
    ],
)
def test_rejects_with_the_offset_of_the_problem(data: bytes, offset: int, message: str) -> None:
    with pytest.raises(DecodeError, match=re.escape(message)) as info:
        decode_mask(data)
    assert info.value.offset == offset
    assert str(info.value).endswith(f"at byte {offset}")
    assert reference(data) == offset
    # Same answer whatever the chunking.
    assert error_offset(data, range(len(data))) == offset


def test_rejects_labels_above_max_value() -> None:
    assert error_offset(b"[1, 59, 60]", max_value=59) == 8
    assert error_offset(b"[1, 100]", max_value=59) == 4
    assert error_offset(b"[18446744073709551616]", max_value=2**64 - 1) == 1
    assert error_offset(b"[99999999999999999999]", max_value=2**64 - 1) == 1


def test_absurdly_long_digit_run_is_rejected_early() -> None:
    decoder = MaskDecoder()
    decoder.feed(b"[1, ")
    with pytest.raises(DecodeError, match="more than 10 digits") as info:
        for _ in range(100):
            decoder.feed(b"9" * 1000)
    assert info.value.offset == 4


def test_error_in_a_later_block_names_its_absolute_offset() -> None:
    body = ", ".join(["7"] * 300_000).encode()
    data = b"[" + body + b", 1.5]"
    with small_blocks(4096):
        assert error_offset(data, [1000, 500_000]) == len(data) - 3


CONTROL = [b for b in range(0x20) if bytes([b]) not in WS]


@pytest.mark.parametrize("tabs", [False, True])
@pytest.mark.parametrize("control", CONTROL)
def test_a_control_byte_between_numbers_is_refused(control: int, tabs: bool) -> None:
    """Whitespace is counted as "any byte up to ' '" and the control bytes among those are
    ruled out separately: each one, deep inside a block the fast path decodes, before and
    after tabs and CRs have been seen (which switches to counting each kind of whitespace)."""
    head = b"[" + (b"5,\t\r\n " if tabs else b"") + b", ".join(b"%d" % i for i in range(50_000))
    at = len(head) + 2
    data = head + b", " + bytes([control]) + b"7, 8, 9]"
    assert reference(data) == at
    assert error_offset(data) == at
    assert error_offset(data, [1000]) == at  # the tabs, if any, in an earlier block


# -- properties ---------------------------------------------------------------------------

labels_st = st.lists(st.integers(0, U32_MAX), max_size=60)
gap_st = st.text(alphabet=" \t\r\n", max_size=3).map(str.encode)


@st.composite
def formatted(draw: st.DrawFn, labels: Sequence[int]) -> bytes:
    """``labels`` as a mask with random whitespace between every pair of tokens."""
    parts = [draw(gap_st), b"[", draw(gap_st)]
    for i, value in enumerate(labels):
        if i:
            parts += [draw(gap_st), b",", draw(st.sampled_from([b"", b" ", b"\n "]))]
            parts.append(draw(gap_st))
        parts += [str(value).encode(), draw(gap_st)]
    parts += [b"]", draw(gap_st)]
    return b"".join(parts)


@st.composite
def cuts_for(draw: st.DrawFn, data: bytes) -> list[int]:
    if len(data) < 400 and draw(st.booleans()):
        return list(range(1, len(data)))  # one byte at a time
    return draw(st.lists(st.integers(0, len(data)), max_size=12))


@settings(max_examples=200, deadline=None)
@given(st.data(), labels_st, st.sampled_from([None, 3, 16]))
def test_any_formatting_and_chunking_round_trips(
    data: st.DataObject, labels: list[int], block: int | None
) -> None:
    text = data.draw(formatted(labels))
    cuts = data.draw(cuts_for(text))
    if block is None:
        got, decoder = feed_all(text, cuts)
    else:
        with small_blocks(block):
            got, decoder = feed_all(text, cuts)
    assert np.array_equal(got, np.array(labels, dtype=np.uint64))
    assert got.dtype == np.uint32
    assert decoder.count == len(labels)
    assert decoder.max_label == max(labels, default=-1)
    assert decoder.offset == len(text)


@settings(max_examples=200, deadline=None)
@given(st.data(), labels_st, st.sampled_from(b'x-.+e"/:'))
def test_a_stray_byte_is_reported_where_it_is(
    data: st.DataObject, labels: list[int], stray: int
) -> None:
    text = data.draw(formatted(labels))
    at = data.draw(st.integers(0, len(text)))
    broken = text[:at] + bytes([stray]) + text[at:]
    cuts = data.draw(cuts_for(broken))
    assert error_offset(broken) == at
    assert error_offset(broken, cuts) == at


tokens_st = st.lists(
    st.one_of(
        st.sampled_from([b",", b" ", b"\n", b"\t", b"\r", b"]", b"[", b"-", b".", b"e", b"x"]),
        st.integers(0, 2000).map(lambda v: str(v).encode()),
        st.integers(0, 10**12).map(lambda v: str(v).encode()),
        st.sampled_from([b", ", b",\n ", b"0"]),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(st.data(), tokens_st, st.booleans(), st.sampled_from([U32_MAX, 999]))
def test_agrees_with_the_reference_grammar(
    data: st.DataObject, tokens: list[bytes], opened: bool, max_value: int
) -> None:
    text = (b"[" if opened else b"") + b"".join(tokens)
    cuts = data.draw(cuts_for(text))
    expected = reference(text, max_value)
    for chunking in ([], cuts):
        if isinstance(expected, int):
            assert error_offset(text, chunking, max_value=max_value) == expected
        else:
            got, _ = feed_all(text, chunking, max_value=max_value)
            assert got.tolist() == expected
