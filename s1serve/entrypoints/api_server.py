"""`s1serve serve api_server MODEL`: which processes serve, and what each one runs.

- No parallel flags: an engine process loads the model and runs the engine loop (engine/core.py); this process is
  the API server in front of it (tokenising, chat rendering, parsing, SSE), talking to it over ZeroMQ
  (EngineProcessClient). The engine process dying makes the server answer 503 at once and exit non-zero.
- --api-server-count N: N API server processes share --server-port (SO_REUSEPORT) in front of one engine process;
  this process supervises them. One of them ending leaves the engine serving the others.
- --tp/--ep: the engine process is rank 0, with a runner that drives the other ranks (local follower processes or
  Ray actors; other nodes run `--headless`). A rank dying ends the engine process, and so the server.
- --headless: this node runs only its follower ranks of rank 0's engine (no server).
- --dp: this process only launches and supervises one api_server process per local DP rank, on --server-port +
  DP rank, each with its own engine process.

SIGTERM (or SIGINT) drains (serve/drain.py): the API servers answer 503 to new requests and let those in flight
finish for up to --shutdown-timeout seconds, and only then is the engine process stopped; exit status 0. A
launcher of several API servers or DP ranks forwards SIGTERM and waits for them; a second signal ends everything at
once.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from s1serve.distributed.launcher import FAILURE_GRACE_S, Child, run_dp_ranks, run_headless, spawn
from s1serve.distributed.worker import RankSpec, die_with_parent
from s1serve.engine.client import EngineDeadError
from s1serve.engine.config import EngineConfig
from s1serve.engine.core import EngineAddresses, EngineCore
from s1serve.engine.core_client import EngineProcessClient, stop_process
from s1serve.engine.host_memory import reuse_freed_memory
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
    args.api_server_count = args.api_server_count or 1  # unset: one API server
    if args.api_server_count < 1:
        raise S1ServeError(f"--api-server-count must be at least 1 (got {args.api_server_count})")
    if parallel.headless:
        config = EngineConfig.from_namespace(args)
        return run_headless(RankSpec(Path(args.model), args.dtype, args.device, config, parallel, parallel.address))
    if parallel.dp > 1:
        # As vLLM counts it: the API servers of this node, shared out over its DP ranks (at least one each).
        args.api_server_count = max(1, args.api_server_count // len(parallel.local_ranks))
        ports = [args.server_port + r for r in parallel.local_ranks]
        log.info("node %d: DP ranks %s on ports %s", parallel.node_rank, list(parallel.local_ranks), ports)
        return run_dp_ranks(_serve_dp_rank, args, parallel, drain_s=args.shutdown_timeout)
    return serve_rank(args, parallel)


def serve_rank(args: argparse.Namespace, parallel: ParallelConfig, rank: int = 0) -> int:
    """One api_server: the engine's rank 0, or DP rank `rank` on --server-port + rank. Starts the engine process
    (which loads the model) and the API server(s) in front of it; serves until interrupted (0) or until the engine
    dies (1). With --api-server-count 1 this process is the API server, else it supervises them."""
    port = args.server_port + (rank if parallel.dp > 1 else 0)
    with tempfile.TemporaryDirectory(prefix="s1serve-ipc-") as folder:
        addresses = EngineAddresses(Path(folder))
        (core,) = spawn(run_engine_core, [(args, parallel, rank, addresses)], [f"engine-core-{rank}"])
        try:
            if args.api_server_count == 1:
                try:
                    return serve_api(args, port, addresses, core.pid, owns_engine=True)
                except EngineDeadError:  # it failed to start (and printed why)
                    return core.popen.wait() or 1
            return _run_api_servers(args, port, addresses, core)
        finally:
            stop_process(core.pid)
            core.popen.wait()


def serve_api(args: argparse.Namespace, port: int, addresses: EngineAddresses, engine_pid: int,
              owns_engine: bool = False, sock: socket.socket | None = None) -> int:
    """An API server process: tokenises, renders and streams; the engine is in process `engine_pid`."""
    tokenizer = load_tokenizer(args.model)
    engine = EngineProcessClient(addresses, engine_pid, owns_engine=owns_engine)
    return serve_http(engine, tokenizer, args, port, FAILURE_GRACE_S, sock)


def run_engine_core(args: argparse.Namespace, parallel: ParallelConfig, rank: int, addresses: EngineAddresses,
                    parent_pid: int) -> None:
    """The engine process: the model (rank `rank`, driving its TP/EP followers) and the engine loop."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the parent stops us
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, force=True)
    try:
        tokenizer = load_tokenizer(args.model)
        config = EngineConfig.from_namespace(args)
        engine = build_engine(args.model, args.dtype, args.device, config, tokenizer, parallel, rank)
    except (S1ServeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    reuse_freed_memory()  # from the first step on: this process serves one model for its whole life
    EngineCore(engine, addresses).run()


def _run_api_servers(args: argparse.Namespace, port: int, addresses: EngineAddresses, core: Child) -> int:
    """--api-server-count N: N API server processes sharing `port` (SO_REUSEPORT). One that ends is logged and the
    others serve on; the engine's end ends them all (1). SIGTERM / SIGINT stop everything (0)."""
    count = args.api_server_count
    servers = spawn(_api_server_process, [(args, port, addresses, core.pid)] * count,
                    [f"api-server-{i}" for i in range(count)])
    stopping = threading.Event()
    forced = threading.Event()  # a second signal: the API servers were killed

    def stop(signum: int, _: FrameType | None) -> None:
        if stopping.is_set():
            log.warning("%s again: killing the API servers", signal.Signals(signum).name)
            forced.set()
            for server in servers:
                server.popen.kill()
            return
        log.info("%s: draining the API servers, then stopping the engine", signal.Signals(signum).name)
        stopping.set()
        for server in servers:
            server.popen.terminate()  # each drains (serve/drain.py)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    reported: set[int] = set()
    while not stopping.wait(0.2):
        for server in servers:
            if server.exitcode is not None and server.pid not in reported:
                reported.add(server.pid)
                log.warning("%s; %d API servers remain", server.describe_exit(), count - len(reported))
        if core.exitcode is not None or len(reported) == count:
            break
    codes = [server.popen.wait() for server in servers]
    if forced.is_set():
        return 1
    return 0 if stopping.is_set() else 1 if core.exitcode is not None else max(codes) or 1


def _api_server_process(args: argparse.Namespace, port: int, addresses: EngineAddresses, engine_pid: int,
                        parent_pid: int) -> None:
    """One of --api-server-count API server processes (started by _run_api_servers)."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the launcher forwards SIGTERM
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, force=True)
    try:
        code = serve_api(args, port, addresses, engine_pid, sock=shared_listener(args.server_name, port))
    except EngineDeadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    raise SystemExit(code)


def shared_listener(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port) that other processes may bind too (the kernel spreads connections)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _serve_dp_rank(args: argparse.Namespace, parallel: ParallelConfig, rank: int, parent_pid: int) -> None:
    """A DP rank's process (started by run_dp_ranks)."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the launcher forwards SIGTERM
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, force=True)
    try:
        code = serve_rank(args, parallel, rank)
    except (S1ServeError, ValueError, FileNotFoundError) as exc:
        print(f"error: DP rank {rank}: {exc}", file=sys.stderr)
        code = 2
    raise SystemExit(code)
