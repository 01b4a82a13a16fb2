"""Vectorised, streaming decoders for per-point label files (sans-I/O, numpy only).

``MaskDecoder`` reads Playment's integer-array masks, ``PcdLabelDecoder`` the label field of an
ASCII PCD. Both take chunks as they are downloaded (``feed``) and check the end (``finish``);
malformed input raises ``DecodeError`` naming the absolute byte offset of the problem.
"""

from harvester.decode._digits import smallest_uint_dtype
from harvester.decode.mask import MaskDecoder, decode_mask
from harvester.decode.pcd import PcdHeader, PcdLabelDecoder, decode_pcd_labels

__all__ = [
    "MaskDecoder",
    "PcdHeader",
    "PcdLabelDecoder",
    "decode_mask",
    "decode_pcd_labels",
    "smallest_uint_dtype",
]
