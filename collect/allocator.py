"""glibc's malloc told to keep the memory a collection frees, instead of handing it back to the system.

A collection holds each layer's hooks (gate, in, act(gate), post: 25 MB each at 4,096 tokens of
SmolLM2-135M in float32) until its statistics are taken, then frees them together. With glibc's
defaults, the free space then at the top of the heap is above its trim threshold (twice the largest
chunk freed so far), so it goes back to the system, and the next layer's hooks fault every page in
again: 12,000 to 200,000 fresh pages per batch of 8 layers on a 2-core EPYC, 2.7 us each (a fresh
25 MB filled in 18 ms against 0.7 ms reused), up to as much as the statistics themselves. A forward pass
alone frees its tensors one at a time and faults none. :func:`keep_freed_memory` raises the
thresholds, so freed memory is reused.

A process-wide setting (there is no undoing it): :func:`collect.run.collect` applies it, as do the
benches, so that they time what a collection does.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: mallopt's parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: The largest mmap threshold glibc takes on a 64-bit system (DEFAULT_MMAP_THRESHOLD_MAX, 32 MiB):
#: smaller allocations come from the heap and are reused; larger ones are mapped and unmapped each
#: time, as glibc's own adaptive threshold (which stops there too) would do.
MMAP_THRESHOLD = 32 << 20

#: Free memory the heap keeps at its top (1 GiB): far above what one layer frees at once.
TRIM_THRESHOLD = 1 << 30


def is_glibc() -> bool:
    """Whether this process runs on glibc (Linux with the GNU C library)."""
    try:
        return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no such name here: not glibc
        return False


def keep_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed memory (see the module); True where it did. False, and
    nothing changed, on another C library or system, or where glibc refused a value."""
    if not is_glibc():
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the process's own C library
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; a refused value (a 32-bit system's 512 KiB limit) leaves it as it was.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
