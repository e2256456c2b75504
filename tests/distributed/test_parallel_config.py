"""ParallelConfig's shapes and rules, and the one-line errors (exit status 2) the CLI gives for bad ones."""

from __future__ import annotations

import subprocess
import sys

import pytest

from s1serve.cli import main
from s1serve.parallel.config import ParallelConfig


@pytest.mark.parametrize(
    "kwargs, world, per_node, node1_ranks",
    [
        (dict(tp=16, nnodes=2, dist_init_addr="10.0.0.1:29500"), 16, 8, range(8, 16)),  # the guide's TP16
        (dict(dp=16, ep=16, nnodes=2, dist_init_addr="10.0.0.1:29500"), 16, 8, range(8, 16)),  # DP16 + EP16
        (dict(tp=2, ep=2), 2, 2, None),
        (dict(ep=4), 4, 4, None),
        (dict(dp=2), 2, 2, None),  # independent replicas
        (dict(), 1, 1, None),
    ],
)
def test_allowed_shapes(kwargs, world, per_node, node1_ranks):
    config = ParallelConfig(**kwargs)
    assert (config.world_size, config.ranks_per_node) == (world, per_node)
    assert config.local_ranks == range(per_node)
    assert config.is_distributed == (world > 1)
    if node1_ranks is not None:
        headless = ParallelConfig(**kwargs, node_rank=1, headless=kwargs.get("dp", 1) == 1)
        assert headless.local_ranks == node1_ranks


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tp=0), "--tp must be an integer >= 1"),
        (dict(tp=2, ep=4), "--tp 2 must be 1 or the world size 4"),
        (dict(dp=2, tp=2), "--dp 2 with --tp 2 is not supported"),
        (dict(dp=4, ep=2), "--ep must be 1 or 4"),
        (dict(tp=4, nnodes=3, dist_init_addr="h:1"), "cannot be spread evenly over --nnodes 3"),
        (dict(tp=4, nnodes=2, node_rank=2, dist_init_addr="h:1"), "--node-rank must be in 0..1"),
        (dict(tp=4, nnodes=2), "--nnodes > 1 needs --dist-init-addr"),
        (dict(tp=2, dist_init_addr="nohost"), "must be HOST:PORT"),
        (dict(tp=2, headless=True), "--headless is for nodes other than --node-rank 0"),
        (dict(dp=2, nnodes=2, node_rank=1, headless=True, dist_init_addr="h:1"), "under --dp every node serves"),
        (dict(tp=2, nnodes=2, node_rank=1, dist_init_addr="h:1"), "add --headless"),
        (dict(tp=2, distributed_executor_backend="ray", nnodes=2, dist_init_addr="h:1"), "--nnodes 1"),
        (dict(dp=2, distributed_executor_backend="ray"), "not with --dp"),
        (dict(tp=2, distributed_executor_backend="slurm"), "must be one of mp, ray"),
    ],
)
def test_refused_shapes_say_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ParallelConfig(**kwargs)


def test_the_rendezvous_address_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("S1SERVE_DP_MASTER_ADDR", "10.1.2.3")
    monkeypatch.setenv("S1SERVE_DP_MASTER_PORT", "29501")
    config = ParallelConfig(dp=16, ep=16, nnodes=2)
    assert config.address == "10.1.2.3:29501"
    assert ParallelConfig(tp=2, dist_init_addr="h:7").address == "h:7"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "api_server", "MODEL", "--tp", "2", "--ep", "4"], "--tp 2 must be 1 or the world size 4"),
        (["serve", "api_server", "MODEL", "--dp", "2", "--ep", "3"], "--ep must be 1 or 2"),
        (["serve", "api_server", "MODEL", "--tp", "2", "--headless"], "--headless is for nodes other than"),
        (["generate", "MODEL", "--prompt", "hi", "--dp", "2"], "serve data parallelism with"),
        (["generate", "MODEL", "--prompt", "hi", "--tp", "3", "--ep", "2"], "--ep 2 must be 1 or the world size 3"),
    ],
)
def test_cli_prints_one_line_and_exits_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_cli_error_in_a_real_process_has_no_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "s1serve", "serve", "api_server", "MODEL", "--dp", "3", "--tp", "3"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: --dp 3 with --tp 3")
    assert "Traceback" not in done.stderr
