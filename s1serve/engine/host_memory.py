"""Handing freed host memory back to the OS when the engine runs out of work.

glibc keeps the memory that freed tensors leave in its heap for reuse, and each new batch shape can raise that
high-water mark: a long-running engine's RSS crept up with the shapes it had met although nothing was held
(benchmarks/engine_memory.py: the same workload again grows nothing; benchmarks/soak.py). `malloc_trim(0)` returns
the free part (about 1 ms); the engine loop calls it each time its last request ends. Where the C library has no
malloc_trim (not glibc) this does nothing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

_malloc_trim: Callable[[int], int] | None = getattr(ctypes.CDLL(None), "malloc_trim", None)


def release_free_memory() -> None:
    if _malloc_trim is not None:
        _malloc_trim(0)
