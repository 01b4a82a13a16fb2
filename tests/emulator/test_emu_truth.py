from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harvester.emulator import truth


def test_labels_are_a_pure_function_of_their_names() -> None:
    a = truth.frame_labels(7, "scan-1", "f0", 5000, 60)
    assert a.dtype == np.uint16 and a.shape == (5000,)
    assert np.array_equal(a, truth.frame_labels(7, "scan-1", "f0", 5000, 60))
    assert not np.array_equal(a, truth.frame_labels(7, "scan-1", "f1", 5000, 60))
    assert not np.array_equal(a, truth.frame_labels(8, "scan-1", "f0", 5000, 60))
    assert int(a.max()) < 60
    assert truth.frame_labels(1, "r", "f", 0, 60).shape == (0,)


def test_points_per_frame_is_deterministic_within_the_range() -> None:
    counts = {truth.points_for_frame(1, "r", f"f{i}", (100, 200)) for i in range(50)}
    assert all(100 <= c <= 200 for c in counts) and len(counts) > 10
    assert truth.points_for_frame(1, "r", "f3", (100, 200)) == truth.points_for_frame(
        1, "r", "f3", (100, 200)
    )
    assert truth.points_for_frame(1, "r", "f3", 40_000) == 40_000


def test_mask_text_looks_like_playments() -> None:
    text = truth.format_mask(np.array([16, 58, 58, 1, 4, 7] * 40, dtype=np.uint16), 40)
    assert text.startswith(b"[16, 58, 58, 1, 4, 7, 16")
    assert text.endswith(b"7]")
    lines = text.split(b"\n")
    assert len(lines) > 5
    assert all(line.startswith(b" ") and line.rstrip().endswith(b",") for line in lines[1:-1])
    assert max(len(line) for line in lines) <= 40 + 6
    assert truth.format_mask(np.zeros(0, dtype=np.uint16)) == b"[]"
    assert truth.format_mask(np.array([65535, 0])) == b"[65535, 0]"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 65535), max_size=300),
    st.integers(8, 120),
)
def test_mask_text_round_trips(values: list[int], width: int) -> None:
    text = truth.format_mask(np.array(values, dtype=np.uint16), width)
    assert json.loads(text) == values


def test_big_frames_format_into_wrapped_masks() -> None:
    labels = truth.frame_labels(1, "big", "f0", 2_000_000, 60)
    text = truth.format_mask(labels, 80)
    assert text.count(b"\n") > 2_000_000 // 30
    assert orjson.loads(text) == labels.tolist()  # wrapped, yet one JSON array of the labels


def test_pcd_is_ascii_v07_with_one_labelled_line_per_point() -> None:
    n = 1000
    labels = truth.frame_labels(3, "r", "f", n, 60)
    points = truth.frame_points(3, "r", "f", n)
    text = truth.format_pcd(labels, points).decode()
    header, _, body = text.partition("DATA ascii\n")
    fields = dict(
        line.split(" ", 1) for line in header.splitlines() if line and not line.startswith("#")
    )
    assert fields["VERSION"] == ".7"
    assert fields["FIELDS"] == "x y z label_key"
    assert fields["TYPE"] == "F F F U"
    assert fields["POINTS"] == fields["WIDTH"] == str(n)
    data = np.array([line.split() for line in body.splitlines()], dtype=np.float64)
    assert data.shape == (n, 4)
    assert np.array_equal(data[:, 3].astype(np.uint16), labels)
    assert np.allclose(data[:, :3], points, atol=5e-4)


def test_pcd_never_prints_negative_zero() -> None:
    text = truth.format_pcd(np.array([1], dtype=np.uint16), np.array([[-0.0001, -1.5, 2.0]]))
    assert text.endswith(b"\n0.000 -1.500 2.000 1\n")


def test_pcd_rejects_mismatched_points() -> None:
    with pytest.raises(ValueError):
        truth.format_pcd(np.zeros(3, dtype=np.uint16), np.zeros((2, 3)))
