"""--distributed-executor-backend ray: rank 1 of a --tp 2 server is a Ray actor on a Ray cluster of two "nodes" on
loopback that the test starts (and stops): a head and a second node with one CPU each, so that rank 0's bundle fills
the head and rank 1 lands on the other node, as on the guide's two machines. Outputs equal one process's, the
guide's vLLM TP line (`vllm-serve`, scaled to 2 ranks) answers its client code, and the actor's death makes the
server unhealthy. Without a cluster the flag fails with one line."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from parallel_testing import (
    MODEL_NAME, Launched, completions, free_port, guide_client, launch, prompts, reference, stop, wait_healthy,
)

RAY = Path(sys.executable).with_name("ray")


def test_without_a_ray_cluster_the_error_says_so(tiny_checkpoint):
    """(Runs before the module's Ray head starts.)"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "s1serve", "generate", str(tiny_checkpoint), "--prompt", "hi", "--tp", "2",
         "--distributed-executor-backend", "ray"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith("error: --distributed-executor-backend ray needs a running Ray cluster")


def _start_ray(args: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen([str(RAY), "start", "--block", "--num-cpus", "1", "--object-store-memory",
                                 str(100 << 20), *args], stdout=log, stderr=subprocess.STDOUT)


def _stop_ray(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=40)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_for(pattern: str, log_path: Path, process: subprocess.Popen) -> re.Match:
    deadline = time.monotonic() + 60
    while not (found := re.search(pattern, log_path.read_text())):
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.2)
    return found


@pytest.fixture(scope="module")
def ray_head():
    """A two-node Ray cluster on this machine: `ray start --head` in a short temp dir (Ray's socket paths must
    stay short) and `ray start --address` for node 1, one CPU each; SIGTERM stops each and what it started."""
    if not RAY.exists():
        pytest.fail(f"{RAY} is missing: install the test extra (pip install -e '.[test]')")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    head_log, node_log = Path(temp) / "head.log", Path(temp) / "node1.log"
    head = _start_ray(["--head", "--disable-usage-stats", "--port", "0", "--include-dashboard=false", "--temp-dir",
                       temp], head_log)
    node = None
    try:
        address = _wait_for(r"ray start --address='([^']+)'", head_log, head).group(1)
        node = _start_ray([f"--address={address}"], node_log)
        _wait_for(r"Ray runtime started", node_log, node)
        yield address
    finally:
        for process in (node, head):
            if process is not None:
                _stop_ray(process)
        shutil.rmtree(temp, ignore_errors=True)


def test_tp2_with_a_ray_actor_equals_one_process(tiny_checkpoint, tmp_path, ray_head):
    want = list(reference(str(tiny_checkpoint))[1])
    server = launch(tiny_checkpoint, tmp_path / "server.log", "--tp", "2", "--distributed-executor-backend", "ray",
                    env={"RAY_ADDRESS": ray_head})
    try:
        wait_healthy(server)
        assert completions(server.urls, prompts()) == want
        # The actor's death (its follow() result arrives as an error) makes the engine dead.
        (actor_pid,) = set(re.findall(r"\(RankActor pid=(\d+)\)", server.log()))
        os.kill(int(actor_pid), signal.SIGKILL)
        deadline = time.monotonic() + 15
        while httpx.get(f"{server.urls[0]}/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        assert server.process.wait(timeout=30) == 1
    finally:
        if server.process.poll() is None:
            stop(server)


def test_the_guides_vllm_tp_line_with_ray_on_two_nodes(tiny_checkpoint, tmp_path, ray_head):
    """The guide's `vllm serve` TP line with only the model path and sizes changed (2 ranks), on the two nodes."""
    port = free_port()
    line = [
        "-m", "s1serve", "vllm-serve", str(tiny_checkpoint), "--tensor-parallel-size", "2", "--enable-expert-parallel",
        "--distributed-executor-backend", "ray", "--max-model-len", "65536", "--trust-remote-code",
        "--reasoning-parser", "deepseek_r1", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
    ]
    test_only = ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL_NAME, "--dtype", "float32",
                 "--block-size", "16", "--num-gpu-blocks-override", "128"]
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, *line, *test_only], stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "RAY_ADDRESS": ray_head})
    server = Launched(process, log_path, [port])
    try:
        wait_healthy(server, timeout=300)
        guide_client(server.urls[0])
        assert completions(server.urls, prompts()[:4]) == list(reference(str(tiny_checkpoint))[1][:4])
        assert re.search(r"\(RankActor pid=\d+", server.log()), server.log()
    finally:
        code = stop(server) if server.process.poll() is None else server.process.returncode
    assert code == 0, server.log()
