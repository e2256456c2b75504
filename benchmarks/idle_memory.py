"""What reading memory costs after it has been left alone for a while, on 4 KiB pages and on huge pages.

    .venv/bin/python benchmarks/idle_memory.py [--mib 1024] [--idle 0 0.3 1 3]

For each page size: a buffer is read whole, left alone for `idle` seconds, then one byte of every 4 KiB is read (a
read that costs little unless each page's address translation does), left alone again, then the whole buffer is
summed. Prints ns per 4 KiB touched and the whole read's GB/s per idle time, both page sizes side by side. On a VM
whose neighbours share the L3, translations (and data) not used for a while are gone from it (docs/engine.md,
"Prefill: the next weight block").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from throughput import machine  # noqa: E402

from s1serve.engine.host_memory import huge_page_empty  # noqa: E402

PAGE = 4096


def probe(buffer: torch.Tensor, idle: float) -> tuple[float, float]:
    """(ns per 4 KiB page touched, GB/s of the whole read), each after `idle` seconds without reading the buffer."""
    words = buffer.view(torch.int64)
    one_byte_a_page = buffer.view(-1, PAGE)[:, 0]
    words.sum()
    time.sleep(idle)
    start = time.perf_counter()
    one_byte_a_page.sum()
    touch = time.perf_counter() - start
    time.sleep(idle)
    start = time.perf_counter()
    words.sum()
    read = time.perf_counter() - start
    return touch / one_byte_a_page.numel() * 1e9, buffer.numel() / read / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="buffer size (more than the L3)")
    parser.add_argument("--idle", type=float, nargs="+", default=[0.0, 0.3, 1.0, 3.0])
    args = parser.parse_args()
    size = args.mib << 20
    buffers = {"4 KiB pages": torch.ones(size, dtype=torch.uint8),
               "huge pages": huge_page_empty((size,), torch.uint8).fill_(1)}
    print(f"machine: {machine()}")
    print("| idle before | " + " | ".join(f"{name}: ns per 4 KiB touched / whole read GB/s" for name in buffers) + " |")
    print("|---" * (len(buffers) + 1) + "|")
    for idle in args.idle:
        cells = []
        for buffer in buffers.values():
            ns, gbs = probe(buffer, idle)
            cells.append(f"{ns:.0f} / {gbs:.1f}")
        print(f"| {idle:g} s | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
