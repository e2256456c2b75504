"""The engine's kernel caches stay bounded: a process that meets hundreds of matmul shapes holds a few MiB for them.

Each bf16 matmul shape makes oneDNN build a primitive that torch's two LRU caches keep (0.3-0.6 MiB a shape on an
AVX512/AMX CPU); unbounded they hold 1024 each. Measured in fresh processes, since both caches read their capacity
once, at the process's first primitive.
"""

from __future__ import annotations

import os
import subprocess
import sys

from engine_testing import make_llm

from s1serve.engine.host_memory import KERNEL_CACHE_ENTRIES, KERNEL_CACHE_VARIABLES

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
