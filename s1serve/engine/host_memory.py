"""The engine's host memory: bounded kernel caches, freed memory reused while it works and handed back when idle.

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

And one thing made prefill slow: glibc serves a block of more than its mmap threshold (128 KiB, rising to at most
32 MiB) with a fresh mapping and unmaps it on free, so every step's large activations (a 2048-token MoE layer
gathers 32 MiB of rows and writes 25 MiB of gate/up outputs) were page-faulted in anew, 4 KiB at a time: a
2048-token prefill step took ~800 ms, ~640 ms with the blocks kept. `reuse_freed_memory` turns glibc's mmap off
(large blocks come from the heap like small ones, and its backup mapping still serves one the heap cannot) and
stops it trimming the heap's top on each free, as vLLM's CPU build gets by preloading tcmalloc. Only the engine
process of a server turns it on (entrypoints/api_server.py, once its model is loaded), whose ticker hands the
freed memory back after a while without requests; a process that builds and drops many engines (the offline `LLM`
in a test suite) would otherwise keep every freed block (a test run's process reached 19 GiB).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

KERNEL_CACHE_ENTRIES = 128
KERNEL_CACHE_VARIABLES = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")

_libc = ctypes.CDLL(None)
_malloc_trim: Callable[[int], int] | None = getattr(_libc, "malloc_trim", None)
_mallopt: Callable[[int, int], int] | None = getattr(_libc, "mallopt", None)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameters (malloc.h)


def bound_kernel_caches() -> None:
    for name in KERNEL_CACHE_VARIABLES:
        os.environ.setdefault(name, str(KERNEL_CACHE_ENTRIES))


def reuse_freed_memory() -> None:
    if _mallopt is not None:
        _mallopt(M_MMAP_MAX, 0)
        _mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def release_free_memory() -> None:
    if _malloc_trim is not None:
        _malloc_trim(0)
