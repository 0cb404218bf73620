"""Keep freed heap memory for reuse in processes that make big tensors every step (glibc).

A data consumer makes the same few big tensors every step: each view of a dual batch is
``B x 3 x 112 x 112`` float32, 9.6 MB for 64 images. glibc's malloc serves such sizes with
``mmap`` or from the top of the heap, and by default hands freed memory back to the kernel once
the free space at the top of the heap passes a threshold that it moves itself (twice the
largest freed ``mmap`` chunk). Whether a step's freed views reach the top of the heap and cross
it depends on what else the process holds, so some runs get fresh pages every step: the kernel
zeroes and maps each 4 KiB page on first touch. Measured in the Ray Data stream's consumer (LFW
at 112 px, 17664 images a run, one read task, 15 runs each way): with glibc's own thresholds
14k-327k page faults a run and 0.51-1.41 CPU-s to normalise into the fresh tensors (which one
a run got changed from run to run in one process); with this module's 0-9k faults and
0.39-0.52 CPU-s.

:func:`reuse_freed_memory` fixes both thresholds (``mallopt``): blocks up to 32 MiB (glibc's
largest ``mmap`` threshold) come from the heap, and up to 1 GiB of free space at its top is kept
for the next step instead of being returned. A process holds at most its own peak, which it
reaches every step anyway. The reader and the Ray Data stream call it where they start making
batches; it is a no-op where the C library is not glibc, and where the user has set glibc's own
malloc settings (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TOP_PAD_``,
``MALLOC_MMAP_MAX_``, or ``glibc.malloc.*`` in ``GLIBC_TUNABLES``): those win.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

#: glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: blocks up to this size come from the heap (glibc's largest: HEAP_MAX_SIZE / 2 on 64-bit)
MMAP_THRESHOLD = 32 << 20
#: free space kept at the top of the heap
TRIM_THRESHOLD = 1 << 30

#: environment variables through which a user sets glibc's malloc (then we leave it alone)
USER_MALLOC_ENV = (
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)


def user_malloc_settings(env: Mapping[str, str] | None = None) -> str | None:
    """The user's own glibc malloc setting, if any (the variable's name), else None."""
    env = os.environ if env is None else env
    for name in USER_MALLOC_ENV:
        if name in env:
            return name
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return None


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


@functools.cache
def reuse_freed_memory() -> bool:
    """Fix glibc's malloc thresholds in this process (once) so that the big blocks freed after
    a step are reused by the next one. True when the settings are in force (set by this call or
    an earlier one), False where they do not apply (not glibc, or the user's own settings)."""
    user = user_malloc_settings()
    if user:
        log.debug("malloc: %s is set, leaving glibc's malloc settings alone", user)
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if not ok:
        log.warning("malloc: glibc refused mallopt; freed memory may go back to the kernel")
    return ok
