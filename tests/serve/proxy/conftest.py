"""Process fixtures for the proxy tests: three stub api_servers shared by the session (reset before each test)."""

from __future__ import annotations

from typing import Iterator

import httpx
import pytest

from proxy_procs import Processes, Server


@pytest.fixture
def procs() -> Iterator[Processes]:
    """Processes started by one test, killed when it ends whatever happened."""
    processes = Processes()
    try:
        yield processes
    finally:
        processes.close()


@pytest.fixture(scope="session")
def shared_upstreams() -> Iterator[list[Server]]:
    processes = Processes()
    try:
        servers = [processes.upstream(f"n{i}") for i in range(3)]
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        processes.close()


@pytest.fixture
def upstreams(shared_upstreams: list[Server]) -> list[Server]:
    """The three shared stubs, reset to fast, healthy, holding nothing, with zeroed counters."""
    for server in shared_upstreams:
        httpx.post(server.url + "/admin/reset", timeout=5).raise_for_status()
    return shared_upstreams
