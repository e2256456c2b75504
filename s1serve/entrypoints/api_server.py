"""`s1serve serve api_server MODEL`: which processes serve, and what each one runs.

- No parallel flags: this process loads the model, runs the engine loop in a thread (AsyncEngine) and serves HTTP.
- --tp/--ep: this process is rank 0: the same, with a runner that drives the other ranks (local follower processes
  or Ray actors; other nodes run `--headless`). The engine dying makes the server exit non-zero.
- --headless: this node runs only its follower ranks of rank 0's engine (no server).
- --dp: this process only launches and supervises one api_server process per local DP rank, on --server-port +
  DP rank, each with its own engine.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from s1serve.distributed.launcher import FAILURE_GRACE_S, run_dp_ranks, run_headless
from s1serve.distributed.worker import RankSpec, die_with_parent
from s1serve.engine.async_engine import AsyncEngine
from s1serve.engine.config import EngineConfig
from s1serve.entrypoints.engine import build_engine
from s1serve.errors import S1ServeError
from s1serve.parallel.config import ParallelConfig
from s1serve.serve.openai.api_server import serve_http
from s1serve.tokenizer import load_tokenizer

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger("s1serve.api_server")


def run_api_server(args: argparse.Namespace) -> int:
    """Serves until interrupted (see the module's docstring for the shapes); the exit status."""
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    parallel = ParallelConfig.from_namespace(args)
    if parallel.headless:
        config = EngineConfig.from_namespace(args)
        return run_headless(RankSpec(Path(args.model), args.dtype, args.device, config, parallel, parallel.address))
    if parallel.dp > 1:
        ports = [args.server_port + r for r in parallel.local_ranks]
        log.info("node %d: DP ranks %s on ports %s", parallel.node_rank, list(parallel.local_ranks), ports)
        return run_dp_ranks(_serve_dp_rank, args, parallel)
    return serve_rank(args, parallel)


def serve_rank(args: argparse.Namespace, parallel: ParallelConfig, rank: int = 0) -> int:
    """One api_server: the engine's rank 0, or DP rank `rank` on --server-port + rank. Loads the model, starts the
    engine thread, serves until interrupted or until a distributed engine dies (then returns 1)."""
    port = args.server_port + (rank if parallel.dp > 1 else 0)
    tokenizer = load_tokenizer(args.model)
    config = EngineConfig.from_namespace(args)
    engine = AsyncEngine(build_engine(args.model, args.dtype, args.device, config, tokenizer, parallel, rank))
    return serve_http(engine, tokenizer, args, port, FAILURE_GRACE_S if parallel.is_distributed else None)


def _serve_dp_rank(args: argparse.Namespace, parallel: ParallelConfig, rank: int, parent_pid: int) -> None:
    """A DP rank's process (started by run_dp_ranks)."""
    die_with_parent(parent_pid)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, force=True)
    try:
        code = serve_rank(args, parallel, rank)
    except (S1ServeError, ValueError, FileNotFoundError) as exc:
        print(f"error: DP rank {rank}: {exc}", file=sys.stderr)
        code = 2
    raise SystemExit(code)
