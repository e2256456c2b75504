"""What `s1serve serve api_server` checks before it imports torch or starts a rank: the parallel shape, the
checkpoint folder and its config.json, the engine flags against the model, the parser names, the media and
process flags, and the ports. A mistake found here exits with status 2 in about a second, whatever --dp is."""

from __future__ import annotations

import argparse
import socket

from s1serve.config import load_model_config
from s1serve.engine.config import EngineConfig, flag
from s1serve.entrypoints.dialects import check_media_and_process
from s1serve.parallel.config import ParallelConfig
from s1serve.serve.parsers.registry import get_reasoning_parser, get_tool_call_parser


def api_ports(args: argparse.Namespace, parallel: ParallelConfig) -> list[int]:
    """The HTTP ports this node's api_servers will listen on (none on a --headless node)."""
    if parallel.headless:
        return []
    if parallel.dp > 1:
        return [args.server_port + r for r in parallel.local_ranks]
    return [args.server_port]


def check_port(host: str, port: int, what: str) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"{what} {port} is not a port (1..65535)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ValueError(f"{what} {port} on {host} cannot be used: {exc.strerror}") from None


def check_before_launch(args: argparse.Namespace) -> tuple[ParallelConfig, list[str]]:
    """Raises a ValueError naming the first mistake; else the config and the log lines of the flags taken."""
    parallel = ParallelConfig.from_namespace(args)
    model = load_model_config(args.model)
    engine = EngineConfig.from_namespace(args)
    positions = model.text.max_position_embeddings
    if engine.max_model_len is not None and engine.max_model_len > positions:
        raise ValueError(f"{flag('max_model_len')} ({engine.max_model_len}) exceeds the model's max positions "
                         f"({positions})")
    if args.reasoning_parser:
        get_reasoning_parser(args.reasoning_parser)
    if args.tool_call_parser:
        get_tool_call_parser(args.tool_call_parser)
    notes = check_media_and_process(args, parallel)
    if parallel.address:
        port = parallel.address.rsplit(":", 1)[1]
        if not 0 < int(port) < 65536:
            raise ValueError(f"--dist-init-addr {parallel.address}: {port} is not a port (1..65535)")
    where = "--server-port + DP rank" if parallel.dp > 1 else "--server-port"
    for port in api_ports(args, parallel):
        check_port(args.server_name, port, where)
    return parallel, notes
