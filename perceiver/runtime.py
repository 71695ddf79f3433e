"""Process-wide settings that make training fast, made by the program itself at start-up.

glibc's malloc serves blocks of 32 MiB and more with mmap and returns them to the OS on free, so the large
activations of the Keras-size model were page-faulted and zeroed afresh every step: 27-53% more step time
for the implementations benchmarked in docs/benchmarks.md. `keep_freed_memory` makes malloc keep them:
no mmap'ed blocks and no trimming of the heap, so freed memory is reused by the next step. The process's
memory then stays at its peak (it does anyway during training). A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # bytes of free heap top kept before trimming; mallopt takes an int


def keep_freed_memory() -> bool:
    """Ask glibc malloc to keep freed large blocks for reuse; True when it took both settings."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("no glibc mallopt here (%s); malloc settings left as they are", name)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
