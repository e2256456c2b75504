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

And weights stream faster from huge pages: a decode step reads every weight it uses once, at memory speed, and on
4 KiB pages that stream takes a TLB miss each 4 KiB (a two-level page walk in a VM). Linux gives transparent huge
pages (2 MiB) only to memory advised for them when its setting is `madvise`, the common default, so
`place_on_huge_pages` moves the model's weights onto such memory, the small ones together (docs/engine.md has
what it measured; S1SERVE_HUGE_PAGES=0 leaves them where they are). The KV cache takes `lazy_zeros`: zero memory mapped on first
write, on huge pages too, so that a step writing never-used blocks takes a few 2 MiB faults, not hundreds of 4 KiB
ones (docs/engine.md, "Prefill: the next weight block").
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

KERNEL_CACHE_ENTRIES = 128
KERNEL_CACHE_VARIABLES = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")

_libc = ctypes.CDLL(None)
_malloc_trim: Callable[[int], int] | None = getattr(_libc, "malloc_trim", None)
_mallopt: Callable[[int, int], int] | None = getattr(_libc, "mallopt", None)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameters (malloc.h)
HUGE_PAGE_BYTES = 2 << 20
_MADV_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
HUGE_PAGES_SWITCH = "S1SERVE_HUGE_PAGES"
SMALL_PARAMETER_ALIGN = 64


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


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor on fresh memory advised for transparent huge pages (starting on a 2 MiB boundary,
    so that every whole 2 MiB of it can be one page), before anything touches it; plain torch.empty where the
    platform has no such advice."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if _MADV_HUGEPAGE is None:
        return torch.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE)  # shared memory would not take them
    region.madvise(_MADV_HUGEPAGE)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # the tensor keeps the mapping alive
    start = -raw.data_ptr() % HUGE_PAGE_BYTES
    return raw[start : start + nbytes].view(dtype).view(shape)


def huge_pages_wanted() -> bool:
    """Whether large host tensors go on huge pages: the platform can advise them and S1SERVE_HUGE_PAGES is not 0."""
    return _MADV_HUGEPAGE is not None and os.environ.get(HUGE_PAGES_SWITCH, "1") != "0"


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero CPU tensor whose pages the OS maps on first write: on memory advised for huge pages when it spans one
    at least (as the weights do; not where S1SERVE_HUGE_PAGES=0 or the platform has no such advice), else calloc'd."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if nbytes >= HUGE_PAGE_BYTES and huge_pages_wanted():
        return huge_page_empty(shape, dtype)  # a fresh private anonymous mapping reads as zeros
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def place_on_huge_pages(model: nn.Module) -> None:
    """Moves each contiguous CPU parameter of at least one huge page onto huge-page memory of its own (one at a time:
    the peak is the model plus its largest parameter), and the smaller ones side by side onto one more, in the
    model's order: a step reads them too (k/v projections, routers, norms). Nothing where S1SERVE_HUGE_PAGES=0 or the
    platform has no such advice (a copy would gain nothing)."""
    if not huge_pages_wanted():
        return
    small: list[nn.Parameter] = []
    for param in model.parameters():
        if param.device.type != "cpu" or not param.is_contiguous():
            continue
        if param.nbytes < HUGE_PAGE_BYTES:
            small.append(param)
            continue
        moved = huge_page_empty(tuple(param.shape), param.dtype)
        moved.copy_(param.data)
        param.data = moved
    starts = [0]
    for param in small:  # each starts on a cache line of its own
        starts.append(starts[-1] + -(-param.nbytes // SMALL_PARAMETER_ALIGN) * SMALL_PARAMETER_ALIGN)
    arena = huge_page_empty((starts[-1],), torch.uint8)
    for param, start in zip(small, starts):
        moved = arena[start : start + param.nbytes].view(param.dtype).view(param.shape)
        moved.copy_(param.data)
        param.data = moved
