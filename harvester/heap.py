"""Keep glibc from handing the decoder's scratch memory back to the kernel after every block.

Decoding a 1 MiB block of mask text makes numpy temporaries of a few MiB in all (commas'
positions, gathered digits, the labels). Under glibc's default, adaptive thresholds, whether
they are reused depends on what the process freed before: when no buffer of many MiB has
been freed yet (chunks arriving from the network, say), each block's temporaries are given
back to the kernel when freed and faulted in again, page by page, for the next block:
hundreds of page faults per MiB of mask, a third of the decoder's CPU time in the kernel
(measured with ``perf``; ``tests/unit/test_heap.py``). Fixed thresholds keep up to ``TRIM``
bytes of freed memory per arena for reuse and still map (and unmap at once) any block of
``MMAP`` bytes or more, so memory stays bounded and a huge array is still given back.

Anything but glibc (musl, macOS) keeps its own allocator's behaviour: this is a speed-up,
not a requirement.
"""

from __future__ import annotations

import ctypes
import functools
import platform

#: blocks this large or larger get their own mapping, unmapped as soon as they are freed
MMAP = 8 << 20
#: freed memory kept at the top of an arena's heap for reuse, at most
TRIM = 16 << 20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def keep_scratch_memory() -> bool:
    """Set glibc's thresholds (once per process); whether they are in force."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # this process's own libc
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt answers 1 on success
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM) == 1)
