"""--distributed-executor-backend ray: rank 1 of a --tp 2 server is a Ray actor on a local Ray head that the test
starts (and stops); outputs equal one process's, and the actor's death makes the server unhealthy. Without a
cluster the flag fails with one line."""

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
from parallel_testing import completions, launch, prompts, reference, stop, wait_healthy

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


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` in a short temp dir (Ray's socket paths must stay short); SIGTERM stops it and
    every process it started."""
    if not RAY.exists():
        pytest.fail(f"{RAY} is missing: install the test extra (pip install -e '.[test]')")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    log_path = Path(temp) / "head.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", "--num-cpus", "2", "--disable-usage-stats", "--port", "0",
             "--include-dashboard=false", "--object-store-memory", str(100 << 20), "--temp-dir", temp],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not (found := re.search(r"ray start --address='([^']+)'", log_path.read_text())):
            assert head.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        yield found.group(1)
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=40)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
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
