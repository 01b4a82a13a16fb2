"""Ground truth: what the emulator serves, derived from nothing but names.

Every label array is a pure function of (seed, reference_id, frame_id), and every other
provider's output a pure function of the seed and the job's own request, so a harvest can be
checked byte for byte against a fresh computation, in this process or another, and a result
object can be dropped from the storage cache and regenerated identically.
"""

from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt
import orjson

from harvester.emulator import numfmt

LabelArray = npt.NDArray[np.uint16]

_MEAN_RUN = 8  # consecutive points in scan order mostly share a class, as in real scans
_COORD_DECIMALS = 3


def frame_seed(seed: int, reference_id: str, frame_id: str, purpose: str) -> int:
    return derived_seed(seed, reference_id, frame_id, purpose)


def derived_seed(seed: int, *parts: str) -> int:
    """A 128-bit seed named by ``parts``: independent of every other name, and of the order
    in which things were asked for (concurrent clients create jobs in any order)."""
    text = "\0".join((str(seed), *parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=16).digest(), "big")


def rng_for(seed: int, *parts: str) -> np.random.Generator:
    return np.random.default_rng(derived_seed(seed, *parts))


def unit_draw(seed: int, *parts: str) -> float:
    """A number in [0, 1) named by ``parts``: "does this job fail?" asked twice answers the same."""
    return derived_seed(seed, *parts) / 2.0**128


def digest(doc: object) -> str:
    """A short stable name for a JSON-able document (canonical: sorted keys)."""
    text = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(text, digest_size=12).hexdigest()


def sensor_frame(frame_id: str, sensor_id: str | None) -> str:
    """What truth is drawn under for a frame's mask: the frame itself when it has one mask
    (so single-sensor results never change), the frame and the sensor when it has several."""
    return frame_id if sensor_id is None else f"{frame_id}\0{sensor_id}"


def points_for_frame(
    seed: int, reference_id: str, frame_id: str, points_per_frame: int | tuple[int, int]
) -> int:
    lo, hi = (
        (points_per_frame, points_per_frame)
        if isinstance(points_per_frame, int)
        else points_per_frame
    )
    if lo == hi:
        return lo
    rng = np.random.default_rng(frame_seed(seed, reference_id, frame_id, "count"))
    return int(rng.integers(lo, hi, endpoint=True))


def frame_labels(
    seed: int, reference_id: str, frame_id: str, n_points: int, num_labels: int
) -> LabelArray:
    """One label_key in 0..num_labels-1 per point, in runs, with a skewed class mix."""
    if not 1 <= num_labels <= 65_536:
        raise ValueError("num_labels must be in 1..65536")
    if n_points <= 0:
        return np.zeros(0, dtype=np.uint16)
    rng = np.random.default_rng(frame_seed(seed, reference_id, frame_id, "labels"))
    # A few classes (road, vegetation...) dominate real scans; a Zipf-like mix over a
    # per-frame permutation gives that while keeping every class possible.
    weights = 1.0 / np.arange(1, num_labels + 1)
    classes = rng.permutation(num_labels)
    n_runs = n_points // _MEAN_RUN + 1
    runs = rng.geometric(1.0 / _MEAN_RUN, size=n_runs)
    while int(runs.sum()) < n_points:  # rare: geometric draws came out short
        runs = np.concatenate([runs, rng.geometric(1.0 / _MEAN_RUN, size=n_runs)])
    run_labels = classes[rng.choice(num_labels, size=runs.shape[0], p=weights / weights.sum())]
    return np.repeat(run_labels.astype(np.uint16), runs)[:n_points]


def frame_points(
    seed: int, reference_id: str, frame_id: str, n_points: int
) -> npt.NDArray[np.float64]:
    """(n, 3) coordinates in metres, already rounded to what the PCD text carries."""
    rng = np.random.default_rng(frame_seed(seed, reference_id, frame_id, "points"))
    pts = rng.uniform(-60.0, 60.0, size=(max(n_points, 0), 3))
    pts[:, 2] = rng.uniform(-3.0, 8.0, size=max(n_points, 0))
    return np.round(pts, _COORD_DECIMALS)


def format_mask(labels: npt.NDArray[np.integer], line_width: int = 80) -> bytes:
    """Playment's mask text: ``[16, 58, 58, 1, 4,\\n 7, ...]`` wrapped near ``line_width``."""
    n = int(labels.shape[0])
    if n == 0:
        return b"[]"
    nums = numfmt.digits(labels)
    token_len = nums.keep.sum(axis=1) + 2  # number + ", "
    end = 1 + np.cumsum(token_len)  # "[" comes first
    # Break after a token that crosses a multiple of line_width: lines stay near the width
    # whatever the mix of 1- and 5-digit numbers.
    wrap = (end // line_width) > ((end - token_len) // line_width)
    sep = np.empty((n, 3), dtype=np.uint8)
    sep[:, 0] = ord(",")
    sep[:, 1] = np.where(wrap, ord("\n"), ord(" "))
    sep[:, 2] = ord(" ")
    sep_keep = np.ones((n, 3), dtype=np.bool_)
    sep_keep[:, 2] = wrap
    sep_keep[-1, :] = False
    body = numfmt.render([nums, numfmt.Columns(sep, sep_keep)])
    return b"[" + body + b"]"


def pcd_header(n_points: int) -> bytes:
    return (
        "# .PCD v0.7 - Point Cloud Data file format\n"
        "VERSION .7\n"
        "FIELDS x y z label_key\n"
        "SIZE 4 4 4 4\n"
        "TYPE F F F U\n"
        "COUNT 1 1 1 1\n"
        f"WIDTH {n_points}\n"
        "HEIGHT 1\n"
        "VIEWPOINT 0 0 0 1 0 0 0\n"
        f"POINTS {n_points}\n"
        "DATA ascii\n"
    ).encode()


def format_pcd(labels: npt.NDArray[np.integer], points: npt.NDArray[np.floating]) -> bytes:
    """ASCII PCD v0.7 with one ``x y z label_key`` line per point."""
    n = int(labels.shape[0])
    if points.shape != (n, 3):
        raise ValueError(f"points must have shape ({n}, 3), not {points.shape}")
    if n == 0:
        return pcd_header(0)
    space = numfmt.constant(n, b" ")
    fields: list[numfmt.Columns] = []
    for axis in range(3):
        fields += numfmt.fixed_point(points[:, axis], _COORD_DECIMALS)
        fields.append(space)
    fields += [numfmt.digits(labels), numfmt.constant(n, b"\n")]
    return pcd_header(n) + numfmt.render(fields)


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def image_mask_bytes(seed: int, reference_id: str, index: int, size: int = 4096) -> bytes:
    """The segmentation mask file of an image (or of video frame ``index``): deterministic
    bytes behind a PNG signature. Clients store it as served; its sha256 is the truth."""
    body = rng_for(seed, reference_id, f"image-mask-{index}").integers(
        0, 256, size=size, dtype=np.uint8
    )
    return _PNG_MAGIC + body.tobytes()
