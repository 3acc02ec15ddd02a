"""Keep freed memory in the process, so each CPU training step reuses the last step's pages.

glibc's malloc hands large freed blocks back to the kernel (`munmap`, and trimming the top of the
heap); the next step's activations then fault fresh, kernel-zeroed pages in again. On the 2-core
EPYC an AR step of the core transformer (fp32, one thread) took 5,000-9,500 page faults at 4x128
and ~18,000 at 6x384, and 5-6% of its time that way (docs/results/train_step). Raising the mmap
threshold to its maximum and never trimming the heap leaves none after the first steps. The cost
is that the process keeps its peak heap, which a training loop reaches again every step anyway.

Only glibc has `mallopt`; elsewhere, and where the user set either threshold in the environment
(glibc reads `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` at start), nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit: blocks above it are still mapped
NEVER_TRIM = 2**31 - 1  # mallopt takes an int
ENV_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for repeated steps; True when it did (idempotent)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in ENV_VARS):
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
