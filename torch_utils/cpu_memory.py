"""Keep memory that PyTorch frees on the CPU inside the process, so the next training step reuses it.

A training step allocates and frees the same large tensors every time (activations, gradients, optimizer
temporaries). With glibc's defaults, blocks above the adaptive mmap threshold are returned to the kernel when
freed and the top of the heap is trimmed, so every step page-faults its working set back in: about 150,000
minor page faults (~600 MB zeroed by the kernel) per ECT step of DDPM++ at CIFAR-10 width and batch 4, 4-6% of
the step's time on one CPU thread (bench/bench_vs_official.py). Raising the trim threshold and pinning the mmap
threshold at its maximum keeps those blocks in the heap: 0-3 faults per step after the first.
The cost: the process keeps its peak CPU memory (as PyTorch's CUDA caching allocator does on a GPU).
"""

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1                   # mallopt parameters, glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20         # glibc refuses larger values on 64-bit systems (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**31 - 1              # the largest int: never trim


def _glibc():
    if not sys.platform.startswith('linux'):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    except OSError:
        return None
    return libc if hasattr(libc, 'mallopt') and hasattr(libc, 'gnu_get_libc_version') else None


def retain_freed_memory():
    """Apply the glibc settings above; True when applied (Linux with glibc), False elsewhere (nothing changes)."""
    libc = _glibc()
    if libc is None:
        return False
    trimmed = libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD))
    mapped = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD_MAX))
    return bool(trimmed and mapped)
