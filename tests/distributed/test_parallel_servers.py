"""Parallel deployments as real processes behind the HTTP server, through the openai SDK: --tp 2, --dp 2 --ep 2
(both DP ports) and two "nodes" on loopback give one process's greedy outputs; a killed worker (or DP rank) makes
the server answer 503 at once and exit non-zero; launchers leave no process behind, not even when SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from parallel_testing import (
    MODEL_NAME,
    alive,
    cmdline,
    completions,
    descendants,
    free_port,
    launch,
    prompts,
    reference,
    stop,
    wait_healthy,
)


@pytest.fixture(scope="module")
def want(tiny_checkpoint) -> list[str]:
    return list(reference(str(tiny_checkpoint))[1])


def rank1_worker(server) -> int:
    (worker,) = [p for p in descendants(server.process.pid) if "s1serve.distributed.spawned rank-1" in cmdline(p)]
    return worker


def test_tp2_server_equals_one_process_and_stops_cleanly(tiny_checkpoint, tmp_path, want):
    server = launch(tiny_checkpoint, tmp_path / "server.log", "--tp", "2")
    try:
        wait_healthy(server)
        worker = rank1_worker(server)
        assert completions(server.urls, prompts()) == want
    finally:
        code = stop(server)
    assert code in (0, -signal.SIGTERM), server.log()  # uvicorn re-raises the signal once it has shut down
    assert "lost the other ranks" not in server.log() and not alive(worker)


def test_a_killed_worker_fails_requests_fast_and_the_server_exits(tiny_checkpoint, tmp_path):
    server = launch(tiny_checkpoint, tmp_path / "server.log", "--tp", "2")
    try:
        wait_healthy(server)
        killed_worker_takes_the_server_down(server)
    finally:
        if server.process.poll() is None:
            stop(server)


def killed_worker_takes_the_server_down(tp_server) -> None:
    url = tp_server.urls[0]
    worker = rank1_worker(tp_server)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
    first_chunk = threading.Event()
    outcome: dict = {}

    def stream() -> None:
        chunks = 0
        try:
            for _ in client.completions.create(
                model=MODEL_NAME, prompt=prompts()[0], max_tokens=1500, temperature=0, stream=True,
                extra_body={"ignore_eos": True},
            ):
                chunks += 1
                first_chunk.set()
            outcome["finished"] = chunks
        except openai.APIError as exc:
            outcome["error"], outcome["at"] = exc, time.monotonic()
        first_chunk.set()

    streaming = threading.Thread(target=stream)
    streaming.start()
    assert first_chunk.wait(60)
    os.kill(worker, signal.SIGKILL)
    killed_at = time.monotonic()

    while httpx.get(f"{url}/health", timeout=5).status_code != 503:
        assert time.monotonic() - killed_at < 5, "health still 200 five seconds after the kill"
        time.sleep(0.05)
    unhealthy_after = time.monotonic() - killed_at
    health = httpx.get(f"{url}/health", timeout=5).json()
    streaming.join(10)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as plain:
        client.completions.create(model=MODEL_NAME, prompt=[5, 6, 7], max_tokens=4)
    with pytest.raises(openai.APIStatusError) as streamed:
        client.completions.create(model=MODEL_NAME, prompt=[5, 6, 7], max_tokens=4, stream=True)
    refused_in = time.monotonic() - started
    code = tp_server.process.wait(timeout=20)
    exited_after = time.monotonic() - killed_at

    print(f"\nkilled rank 1: /health 503 after {unhealthy_after:.2f} s, in-flight stream failed after "
          f"{outcome['at'] - killed_at:.2f} s, 2 new requests refused in {refused_in:.2f} s, server exited "
          f"with {code} after {exited_after:.1f} s")
    assert "rank-1" in health["error"]["message"] and "SIGKILL" in health["error"]["message"]
    assert "finished" not in outcome and "rank-1" in str(outcome["error"]) and outcome["at"] - killed_at < 5
    assert plain.value.status_code == streamed.value.status_code == 503 and refused_in < 2
    assert code != 0 and exited_after < 20
    assert not alive(worker) and not descendants(tp_server.process.pid)


def test_dp2_ep2_servers_equal_one_process_on_both_ports(tiny_checkpoint, tmp_path, want):
    server = launch(tiny_checkpoint, tmp_path / "dp.log", "--dp", "2", "--ep", "2", ports=2)
    try:
        wait_healthy(server)
        ranks = descendants(server.process.pid)
        # Even prompts to DP rank 0, odd ones to rank 1, all at once: both ranks step with tokens, and then one
        # of them alone while the other runs empty steps.
        assert completions(server.urls, prompts()) == want
        assert completions(server.urls[1:], prompts()[:3]) == want[:3]  # rank 0 idle throughout
    finally:
        code = stop(server)
    assert code == 0, server.log()
    # Two DP rank processes, each with its engine process.
    assert len(ranks) == 4 and not any(alive(pid) for pid in ranks)


def test_two_nodes_on_loopback_equal_one_process(tiny_checkpoint, tmp_path, want):
    address = f"127.0.0.1:{free_port()}"
    common = ("--tp", "2", "--nnodes", "2", "--dist-init-addr", address)
    head = launch(tiny_checkpoint, tmp_path / "node0.log", *common, "--node-rank", "0")
    follower = launch(tiny_checkpoint, tmp_path / "node1.log", *common, "--node-rank", "1", "--headless", ports=0)
    try:
        wait_healthy(head)
        workers = descendants(follower.process.pid)
        (engine,) = descendants(head.process.pid)  # node 0 holds rank 0 only: in the engine process
        assert "s1serve.distributed.spawned engine-core-0" in cmdline(engine)
        assert completions(head.urls, prompts()) == want
        # Rank 0 vanishing (SIGKILL: no goodbye) ends the other node with a failure, and with no process left.
        stop(head, signal.SIGKILL)
        assert stop(follower, None, timeout=20) == 1, follower.log()
        assert len(workers) == 1 and not alive(workers[0])
    finally:
        for launched in (head, follower):
            if launched.process.poll() is None:
                stop(launched)


def test_a_dead_dp_rank_takes_the_deployment_down(tiny_checkpoint, tmp_path):
    server = launch(tiny_checkpoint, tmp_path / "dp.log", "--dp", "2", "--ep", "2", ports=2)
    try:
        wait_healthy(server)
        ranks = descendants(server.process.pid)
        (rank1,) = [p for p in ranks if "dp-rank-1" in cmdline(p)]
        os.kill(rank1, signal.SIGKILL)
        killed_at = time.monotonic()
        # DP rank 0's next lock-step tick fails: its engine is dead.
        while httpx.get(f"{server.urls[0]}/health", timeout=5).status_code != 503:
            assert time.monotonic() - killed_at < 5, server.log()
            time.sleep(0.05)
        code = stop(server, None, timeout=20)
    finally:
        if server.process.poll() is None:
            stop(server)
    assert code == 1, server.log()
    assert not any(alive(pid) for pid in ranks)


def test_spawned_processes_die_with_a_sigkilled_parent(tmp_path):
    script = (
        "import sys, time\n"
        "from parallel_testing import sleeper\n"
        "from s1serve.distributed.launcher import spawn\n"
        "(child,) = spawn(sleeper, [()], ['sleeper'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    child = int(parent.stdout.readline())
    time.sleep(1)  # the child has set its death signal by now
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while alive(child):
        assert time.monotonic() < deadline, "the child outlived its SIGKILLed parent"
        time.sleep(0.05)
