"""The machine a benchmark ran on, in one line (CPU model, cores, memory, load average): printed with every table."""

from __future__ import annotations

import os
import platform
import subprocess


def describe_machine() -> str:
    name = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{name}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, load average {os.getloadavg()[0]:.1f}"
