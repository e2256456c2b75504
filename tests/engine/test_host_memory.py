"""The engine's host memory: its kernel caches stay bounded (a process that meets hundreds of matmul shapes holds a
few MiB for them), freed large blocks are reused without being faulted in again, then handed back when idle, and
large weights sit on memory advised for huge pages.

Each bf16 matmul shape makes oneDNN build a primitive that torch's two LRU caches keep (0.3-0.6 MiB a shape on an
AVX512/AMX CPU); unbounded they hold 1024 each. Measured in fresh processes, since both caches read their capacity
once, at the process's first primitive.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

from engine_testing import make_llm

import torch

from s1serve.engine.host_memory import (
    HUGE_PAGE_BYTES,
    HUGE_PAGES_SWITCH,
    KERNEL_CACHE_ENTRIES,
    KERNEL_CACHE_VARIABLES,
    huge_page_empty,
    lazy_zeros,
    place_on_huge_pages,
)

SHAPES = """
import ctypes, sys
if sys.argv[1] == "bounded":
    from s1serve.engine.host_memory import bound_kernel_caches
    bound_kernel_caches()
import torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
q = torch.randn(4, 600, 32, dtype=torch.bfloat16)
k = torch.randn(4, 32, 600, dtype=torch.bfloat16)
in_use = {}
for width in range(1, 601):  # attention's score matmul at 600 context widths
    torch.matmul(q[:, :width], k[:, :, :width])
    if width in (200, 600):
        in_use[width] = libc.mallinfo2().uordblks
print((in_use[600] - in_use[200]) / 2**20)
"""


def heap_growth_mib(mode: str) -> float:
    """Live heap growth of a fresh process over its 201st..600th matmul shapes."""
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_CACHE_VARIABLES}
    out = subprocess.run([sys.executable, "-c", SHAPES, mode], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def test_bounded_kernel_caches_stop_growing_with_new_shapes():
    unbounded, bounded = heap_growth_mib("unbounded"), heap_growth_mib("bounded")
    assert bounded < 16, f"the live heap grew {bounded:.1f} MiB over 400 new shapes with bounded caches"
    assert unbounded > bounded + 16, f"unbounded {unbounded:.1f} MiB vs bounded {bounded:.1f}: the caches were not seen"


def test_the_model_runner_bounds_the_caches_of_its_process(tiny_checkpoint, monkeypatch):
    for name in KERNEL_CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    make_llm(tiny_checkpoint, num_kv_blocks=16)
    assert {name: os.environ[name] for name in KERNEL_CACHE_VARIABLES} == dict.fromkeys(
        KERNEL_CACHE_VARIABLES, str(KERNEL_CACHE_ENTRIES))


def test_a_users_own_setting_is_kept(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "4096")
    make_llm(tiny_checkpoint, num_kv_blocks=16)
    assert os.environ["LRU_CACHE_CAPACITY"] == "4096"


FAULTS = """
import resource, sys
import torch
from s1serve.engine import host_memory

if sys.argv[1] == "reuse":
    host_memory.reuse_freed_memory()

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

# torch asks for 64-byte aligned blocks, which glibc's heap fits into freed ones only after a few have merged:
# the first ten or so blocks of a size are faulted in in either mode
for _ in range(16):
    torch.ones(48 << 20, dtype=torch.uint8)
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):  # as a step's activations: allocated, written, freed
    torch.ones(48 << 20, dtype=torch.uint8)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 5
block = torch.ones(256 << 20, dtype=torch.uint8)
del block
held = rss_mib()
host_memory.release_free_memory()
print(faults, held - rss_mib())
"""


def faults_and_release(mode: str) -> tuple[float, float]:
    """(page faults per reallocated 48 MiB block, MiB that release_free_memory hands back after a 256 MiB block)"""
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    faults, released = out.stdout.split()
    return float(faults), float(released)


def test_freed_blocks_are_reused_without_faulting_in_and_handed_back_when_idle():
    default_faults, _ = faults_and_release("default")
    faults, released = faults_and_release("reuse")
    pages = (48 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert default_faults > pages / 2, f"glibc's default faulted {default_faults:.0f} pages per block: not mapped anew?"
    assert faults < pages / 100, f"{faults:.0f} page faults per reused 48 MiB block ({pages} pages)"
    assert released > 200, f"release_free_memory handed back {released:.0f} of a freed 256 MiB block"


def advised_for_huge_pages(address: int) -> bool:
    """Whether the mapping that holds `address` carries MADV_HUGEPAGE ("hg" among its VmFlags in /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head, *rest = line.split()
            if rest and "-" in head and not head.endswith(":"):  # a mapping's first line: start-end perms ...
                start, end = (int(bound, 16) for bound in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return "hg" in rest
    raise AssertionError(f"no mapping holds {address:#x}")


def test_huge_page_memory_starts_on_a_huge_page_is_advised_and_holds_what_is_written():
    t = huge_page_empty((3, 1 << 20), torch.bfloat16)
    t.copy_(torch.arange(3 << 20, dtype=torch.float32).view(3, 1 << 20) % 251)
    assert t.data_ptr() % HUGE_PAGE_BYTES == 0
    assert advised_for_huge_pages(t.data_ptr()) and advised_for_huge_pages(t.data_ptr() + t.nbytes - 1)
    assert torch.equal(t.float(), torch.arange(3 << 20, dtype=torch.float32).view(3, 1 << 20) % 251)
    unadvised = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE)  # the same kind of mapping, without the advice
    assert not advised_for_huge_pages(torch.frombuffer(unadvised, dtype=torch.uint8).data_ptr())  # the check can fail


def test_placing_on_huge_pages_gives_large_parameters_their_own_and_the_small_ones_one_together():
    model = torch.nn.Sequential(torch.nn.Embedding(4096, 256), torch.nn.Linear(256, 8), torch.nn.LayerNorm(8))
    small = [model[1].weight, model[1].bias, model[2].weight, model[2].bias]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert not any(advised_for_huge_pages(p.data_ptr()) for p in small)  # 8 KiB and less: malloc'd
    place_on_huge_pages(model)
    assert advised_for_huge_pages(model[0].weight.data_ptr()) and model[0].weight.data_ptr() % HUGE_PAGE_BYTES == 0
    assert all(advised_for_huge_pages(p.data_ptr()) for p in small)
    # Side by side in the model's order, each on a cache line of its own, within one huge page.
    starts = [p.data_ptr() for p in small]
    assert starts[0] % HUGE_PAGE_BYTES == 0 and all(start % 64 == 0 for start in starts)
    assert starts == sorted(starts) and starts[-1] - starts[0] < HUGE_PAGE_BYTES
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    model[1].bias.data.add_(1)  # each is its own slice: writing one leaves its neighbours as they were
    assert torch.equal(model[2].weight, before["2.weight"]) and torch.equal(model[1].weight, before["1.weight"])


def test_the_model_runner_puts_every_weight_on_huge_pages(tiny_checkpoint):
    model = make_llm(tiny_checkpoint, num_kv_blocks=16).engine.runner.model
    large = {name: p for name, p in model.named_parameters() if p.nbytes >= HUGE_PAGE_BYTES}
    assert large, "the tiny checkpoint has no parameter of a huge page or more"
    assert all(advised_for_huge_pages(p.data_ptr()) for p in model.parameters()), sorted(large)


def test_huge_pages_can_be_turned_off(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv(HUGE_PAGES_SWITCH, "0")
    model = make_llm(tiny_checkpoint, num_kv_blocks=16).engine.runner.model
    assert not any(advised_for_huge_pages(p.data_ptr()) for p in model.parameters())


def test_lazy_zeros_are_zero_on_huge_pages_when_large_and_calloc_memory_otherwise(monkeypatch):
    large = lazy_zeros((4, 1 << 20), torch.bfloat16)  # 8 MiB
    assert advised_for_huge_pages(large.data_ptr()) and large.data_ptr() % HUGE_PAGE_BYTES == 0
    assert not large.any()
    large[3, -1] = 1  # writable, and only that element changed
    assert large.sum() == 1
    small = lazy_zeros((16, 64), torch.bfloat16)
    assert not small.any() and not advised_for_huge_pages(small.data_ptr())
    monkeypatch.setenv(HUGE_PAGES_SWITCH, "0")
    off = lazy_zeros((4, 1 << 20), torch.bfloat16)
    assert not off.any() and not advised_for_huge_pages(off.data_ptr())


def test_the_kv_cache_is_on_huge_pages(tiny_checkpoint):
    runner = make_llm(tiny_checkpoint, num_kv_blocks=4096).engine.runner
    keys, values = runner.caches[0]
    assert keys.nbytes >= HUGE_PAGE_BYTES, "the cache of this test is too small to span a huge page"
    assert advised_for_huge_pages(keys.data_ptr()) and advised_for_huge_pages(values.data_ptr())
