"""Keeping the engine's host memory flat: bounded kernel caches, and freed memory handed back to the OS.

Two things made a long-running engine's RSS creep up (benchmarks/engine_memory.py, benchmarks/soak.py):

- oneDNN, behind torch's bf16 matmuls on CPU (attention's batched matmuls, linears the s1serve kernel does not
  take), builds a primitive for each new shape and keeps it in two LRU caches of 1024 entries each: ideep's
  (`LRU_CACHE_CAPACITY`) and oneDNN's own (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`). An engine meets new shapes for
  hours (token counts, sequences per step, context widths), and a primitive with its descriptor takes about
  0.3-0.6 MiB, so the caches grew by hundreds of MiB before they filled. `bound_kernel_caches` caps both at
  KERNEL_CACHE_ENTRIES, which holds the few shapes one step uses many steps over; a miss costs a rebuild of well
  under a millisecond. Both libraries read the variables once, when their first primitive is made, so this has
  to run before the process's first bf16 matmul; variables already set by the user are kept.
- glibc keeps the memory freed tensors leave in its heap for reuse. `malloc_trim(0)` returns the free part
  (about 1 ms); the engine loop calls it each time its last request ends. Where the C library has no
  malloc_trim (not glibc) this does nothing.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

KERNEL_CACHE_ENTRIES = 128
KERNEL_CACHE_VARIABLES = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")

_malloc_trim: Callable[[int], int] | None = getattr(ctypes.CDLL(None), "malloc_trim", None)


def bound_kernel_caches() -> None:
    for name in KERNEL_CACHE_VARIABLES:
        os.environ.setdefault(name, str(KERNEL_CACHE_ENTRIES))


def release_free_memory() -> None:
    if _malloc_trim is not None:
        _malloc_trim(0)
