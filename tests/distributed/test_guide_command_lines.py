"""The deployment guide's command lines, one deployment per dialect, started as real processes and answering the
guide's client code (the openai SDK) and one process's greedy outputs. Only the model path, ports and node
addresses are changed, and sizes scaled to this machine: 2 ranks on gloo, two "nodes" as two launches on
loopback; the test adds the served name, float32 and a small KV cache (as the other parallel tests do)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from parallel_testing import (
    MODEL_NAME, Launched, completions, free_port, guide_client, launch, prompts, reference, stop, wait_healthy,
)

MEDIA = '{"video": {"num_frames": 768, "fps": 2}}'
PROMPTS = prompts()[:4]


@pytest.fixture(scope="module")
def want(tiny_checkpoint) -> list[str]:
    return list(reference(str(tiny_checkpoint))[1][:4])


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S1SERVE_DP_MASTER", "LMDEPLOY_DP_MASTER"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def start(argv: list[str], log_path, ports: list[int], env: dict[str, str] | None = None) -> Launched:
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, env=env or environment())
    return Launched(proc, log_path, ports)


def registered(proxy: Launched) -> dict:
    try:
        return httpx.get(f"{proxy.urls[0]}/nodes/status", timeout=5).json()
    except httpx.HTTPError:
        return {}


def stop_all(*launched: Launched) -> list[int]:
    return [stop(one) if one.process.poll() is None else one.process.returncode for one in launched]


def test_vllm_dp_ep_on_two_nodes(tiny_checkpoint, tmp_path, want):
    port, rpc = free_port(2), free_port()
    line = [
        "-m", "s1serve", "vllm-serve", str(tiny_checkpoint),
        "--all2all-backend", "deepep_low_latency", "--tensor-parallel-size", "1", "--enable-expert-parallel",
        "--data-parallel-size", "2", "--data-parallel-size-local", "1",
    ]
    tail = [
        "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(rpc),
        "--gpu_memory_utilization", "0.8", "--mm_processor_cache_gb=0", "--media-io-kwargs", MEDIA,
        "--max-model-len", "65536", "--trust-remote-code",
    ]
    parsers = ["--reasoning-parser", "deepseek_r1", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    test_only = ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL_NAME, "--dtype", "float32",
                 "--block-size", "16", "--num-gpu-blocks-override", "128"]
    node0 = start([*line, *tail, "--api-server-count=1", *parsers, *test_only], tmp_path / "node0.log", [port])
    node1 = start([*line, "--data-parallel-start-rank", "1", *tail, "--headless", *parsers, *test_only],
                  tmp_path / "node1.log", [port + 1])
    try:
        wait_healthy(node0, timeout=300)
        wait_healthy(node1, timeout=300)
        guide_client(node0.urls[0])
        assert completions(node0.urls + node1.urls, PROMPTS) == want
        assert "vllm-serve: runs as s1serve serve api_server" in node0.log()
        assert "--all2all-backend deepep_low_latency: ignored" in node0.log()
    finally:
        codes = stop_all(node0, node1)
    assert codes == [0, 0], node0.log() + node1.log()


def test_sglang_tp_ep_on_two_nodes(tiny_checkpoint, tmp_path, want):
    port, dist = free_port(), free_port()
    line = [
        "-m", "s1serve.launch_server", "--model-path", str(tiny_checkpoint), "--tp", "2", "--ep", "2",
        "--mem-fraction-static", "0.85", "--trust-remote-code", "--dist-init-addr", f"127.0.0.1:{dist}",
        "--nnodes", "2", "--attention-backend", "fa3", "--mm-attention-backend", "fa3", "--keep-mm-feature-on-device",
    ]
    tail = ["--reasoning-parser", "qwen3", "--tool-call-parser", "qwen",
            "--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL_NAME, "--dtype", "float32",
            "--page-size", "16", "--max-total-tokens", "2048"]
    node0 = start([*line, "--node-rank", "0", *tail], tmp_path / "node0.log", [port])
    node1 = start([*line, "--node-rank", "1", *tail], tmp_path / "node1.log", [])
    try:
        wait_healthy(node0, timeout=300)
        guide_client(node0.urls[0])
        assert completions(node0.urls, PROMPTS) == want
        assert "--attention-backend fa3: ignored" in node0.log() and "--headless" in node1.log()
    finally:
        codes = stop_all(node0, node1)
    assert codes[0] in (0, -15), node0.log()


def test_lmdeploy_dp_ep_behind_the_proxy_on_two_nodes(tiny_checkpoint, tmp_path, want):
    proxy_port, port, master = free_port(), free_port(2), free_port()
    proxy = start(["-m", "s1serve", "serve", "proxy", "--server-name", "127.0.0.1", "--server-port", str(proxy_port),
                   "--routing-strategy", "min_expected_latency", "--serving-strategy", "Hybrid"],
                  tmp_path / "proxy.log", [proxy_port])
    env = environment(LMDEPLOY_DP_MASTER_ADDR="127.0.0.1", LMDEPLOY_DP_MASTER_PORT=str(master))
    flags = ["--backend", "pytorch", "--tp", "1", "--dp", "2", "--ep", "2", "--proxy-url",
             f"http://127.0.0.1:{proxy_port}", "--nnodes", "2"]
    parsers = ["--reasoning-parser", "intern-s1", "--tool-call-parser", "qwen3"]
    nodes = [launch(tiny_checkpoint, tmp_path / f"node{r}.log", *flags, "--node-rank", str(r), *parsers, port=port,
                    env=env) for r in (0, 1)]
    nodes[1].ports = [port + 1]
    try:
        for node in nodes:
            wait_healthy(node, timeout=300)
        deadline = time.monotonic() + 60
        while len(registered(proxy)) < 2:  # each DP rank registers itself once its /health answers 200
            assert time.monotonic() < deadline and proxy.process.poll() is None, proxy.log()
            time.sleep(0.3)
        guide_client(proxy.urls[0])
        assert completions(proxy.urls, PROMPTS) == want
        assert completions([nodes[0].urls[0], nodes[1].urls[0]], PROMPTS) == want
    finally:
        codes = stop_all(*nodes, proxy)
    assert codes[:2] == [0, 0], nodes[0].log() + nodes[1].log()
