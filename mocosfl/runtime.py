"""Process-wide settings for training on CPU: torch threads and how glibc hands out memory.

Called once per process at the edge (the CLI, each bench child), never from library code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

# mallopt(3) parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the reusable heap; larger ones (an O(N) client-state bank) are
# still mapped on their own and given back to the OS as soon as they are freed.
MMAP_THRESHOLD_BYTES = 2**30
# Free memory at the top of the heap is kept up to this much (mallopt takes a C int, hence 2**31 - 1).
TRIM_THRESHOLD_BYTES = 2**31 - 1


def keep_freed_memory() -> bool:
    """Let glibc reuse the memory a training step frees instead of returning it to the OS each step.

    By default glibc maps every block above a dynamic threshold (128 KiB to 32 MiB) on its own and
    unmaps it when freed, so each step's activations are page-faulted and zeroed by the kernel again.
    Keeping them in the heap made steps 5-8 % faster (width 16 and 64) and cut system time 3-7x, with
    the same peak RSS (see README, "Speed, memory and threads"). Returns whether it was applied: not
    on non-glibc systems, and not when the user set ``MALLOC_MMAP_THRESHOLD_`` or
    ``MALLOC_TRIM_THRESHOLD_`` themselves.
    """
    if not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def configure(num_threads: int | None) -> None:
    """Apply ``pretrain.num_threads`` (None: torch's default, all cores) and ``keep_freed_memory``."""
    if num_threads:
        torch.set_num_threads(num_threads)
    keep_freed_memory()
    # fp32 matrix products on CUDA in TF32 (convolutions already are, cuDNN's default); no effect on CPU.
    torch.backends.cuda.matmul.fp32_precision = "tf32"
