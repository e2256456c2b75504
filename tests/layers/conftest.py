"""The CPU kernels' two paths: tests marked with the `kernel_path` fixture run once on AVX-512 and once on the AMX
tiles (skipped where the CPU has no AMX-BF16), each process otherwise using the one chosen when the kernels load."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from s1serve.layers import kernels


@pytest.fixture(params=["avx512", "amx"])
def kernel_path(request: pytest.FixtureRequest) -> Iterator[str]:
    module = kernels.bf16_kernels()
    if module is None:
        yield request.param  # the tests that need the kernels skip themselves
        return
    if request.param == "amx" and not kernels.cpu_has_amx_bf16():
        pytest.skip("CPU without AMX-BF16")
    before = module.amx()
    assert module.set_amx(request.param == "amx") == (request.param == "amx")
    try:
        yield request.param
    finally:
        module.set_amx(before)
