"""Flags of `s1serve serve api_server` (kept apart from the server so that parsing them imports no torch)."""

from __future__ import annotations

import argparse

from s1serve.engine.config import add_engine_args
from s1serve.parallel.config import add_parallel_args
from s1serve.serve.parsers.registry import REASONING_PARSER_NAMES, TOOL_CALL_PARSER_NAMES


def add_api_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint folder")
    parser.add_argument("--server-name", default="0.0.0.0")
    parser.add_argument("--server-port", type=int, default=23333)
    parser.add_argument("--backend", default="pytorch", choices=("pytorch",))
    parser.add_argument("--model-name", default=None, help="name clients use (default: the folder name)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one device per rank under --tp/--ep/--dp)")
    parser.add_argument("--reasoning-parser", default=None, help=f"one of {', '.join(REASONING_PARSER_NAMES)}")
    parser.add_argument("--tool-call-parser", default=None, help=f"one of {', '.join(TOOL_CALL_PARSER_NAMES)}")
    parser.add_argument("--api-keys", nargs="*", default=[], help="accepted bearer keys (default: no auth)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--proxy-url", default=None, help="join this proxy as a node (and leave it on shutdown)")
    add_engine_args(parser)
    add_parallel_args(parser)
