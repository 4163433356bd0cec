"""Freed memory stays in the process for the next step (glibc's malloc, Linux).

glibc gives a freed block larger than its mmap threshold (adaptive, at most 32 MiB) straight back to the kernel, so
the next step's tensor of the same size faults every page in again, zero-filled. Steps with temporaries above 32 MiB
(temporal batches of 4096-d C3D rows, TSL's segment features) paid that on every iteration: measured with `bench` on
full-size synthetic UCF (2 threads, two alternating rounds), TSL's representation step 370-400 -> 89-135 ms and
Attention Fusion's 47-49 -> 28-34 ms; AVCA, ClipClap, TCAF and AV-DIFF were within the machine's noise.

:func:`keep_freed_memory` raises glibc's mmap and trim thresholds to 1 GiB, so freed blocks are reused. The price:
resident memory stays at its peak instead of shrinking between steps (TSL: 1.33 -> 1.6 GB peak RSS). Numbers do not
change (where a tensor lives is not what it holds). ``AVLOWSHOT_KEEP_FREED_MEMORY=0`` leaves the allocator alone, as
do glibc's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` variables when set.
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV = "AVLOWSHOT_KEEP_FREED_MEMORY"
GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
THRESHOLD = 1 << 30

_state: str | None = None


def keep_freed_memory() -> str:
    """Set the thresholds once per process; returns what the allocator does (``"kept"`` or why it is left alone),
    for the records."""
    global _state
    if _state is None:
        _state = _set_thresholds()
    return _state


def _set_thresholds() -> str:
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"system default ({ENV}=0)"
    if any(key in os.environ for key in GLIBC_ENV):
        return "system default (glibc's MALLOC_*_THRESHOLD_ set)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "system default (not glibc)"
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return "system default (no mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # older glibc refuses an mmap threshold above 32 MiB: then nothing is gained and both stay as they are
    if not mallopt(M_MMAP_THRESHOLD, THRESHOLD):
        return "system default (glibc refused a 1 GiB mmap threshold)"
    mallopt(M_TRIM_THRESHOLD, THRESHOLD)
    return "kept"
