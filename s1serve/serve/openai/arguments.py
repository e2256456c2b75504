"""Flags of `s1serve serve api_server` (kept apart from the server so that parsing them imports no torch)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from s1serve.engine.config import add_engine_args
from s1serve.parallel.config import add_parallel_args
from s1serve.serve.cors import add_cors_arguments
from s1serve.serve.parsers.registry import REASONING_PARSER_NAMES, TOOL_CALL_PARSER_NAMES

DEFAULT_MAX_BODY_BYTES = 8 << 20


def add_body_limit_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-request-body-bytes", type=_positive_int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest request body accepted; larger ones are answered 413 before they are read whole")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
DEFAULT_ENGINE_STEP_TIMEOUT_S = 120.0


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
    parser.add_argument("--api-keys", "--api-key", nargs="*", default=[],
                        help="accepted keys, required on every route but /health (default: $S1SERVE_API_KEY or "
                             "$VLLM_API_KEY if set, else no auth)")
    parser.add_argument("--metrics-public", action="store_true", help="serve /metrics without a key")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--proxy-url", default=None, help="join this proxy as a node (and leave it on shutdown)")
    parser.add_argument("--request-timeout", type=_positive_float, default=None,
                        help="seconds a request may take in the engine (queued and generating); past it the request "
                        "is aborted and answered 504 (default: no limit)")
    add_body_limit_argument(parser)
    add_lifecycle_arguments(parser)
    parser.add_argument("--proxy-admin-key", default=None,
                        help="the proxy's --admin-key, sent when joining it (default: $S1SERVE_PROXY_ADMIN_KEY)")
    add_cors_arguments(parser)
    add_engine_args(parser)
    add_parallel_args(parser)
    add_media_arguments(parser)


def add_lifecycle_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("shutdown and health")
    group.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                       help="seconds SIGTERM lets in-flight requests finish (new ones get 503) before they are ended; "
                            "a second SIGTERM exits at once")
    group.add_argument("--engine-step-timeout", type=float, default=DEFAULT_ENGINE_STEP_TIMEOUT_S,
                       help="/health answers 503 while an engine step has run longer than this (seconds)")


def add_media_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("images and video")
    group.add_argument("--allowed-local-media-path", default=None,
                       help="folder whose files file:// URLs may name (default: file:// refused)")
    group.add_argument("--allowed-media-domains", nargs="*", default=[],
                       help="only these hosts are fetched, and their addresses are trusted (private ones too)")
    group.add_argument("--allow-private-media-addresses", action="store_true",
                       help="fetch from loopback/private/link-local addresses too (refused by default: SSRF)")
    group.add_argument("--limit-mm-per-prompt", default=None,
                       help='most items per prompt, JSON: \'{"image": 4, "video": 1}\' (default: no limit)')
    group.add_argument("--media-io-kwargs", default=None,
                       help='video sampling, JSON: \'{"video": {"num_frames": 768, "fps": 2}}\'')


def media_pipeline(model_dir: Path, tokenizer: Any, args: argparse.Namespace) -> Any:
    """The server's MediaPipeline, or None for a checkpoint without a vision tower (config without vision_config)."""
    from s1serve.config import load_model_config
    from s1serve.multimodal.chat import MediaArgs, MediaPipeline

    if load_model_config(model_dir).vision is None:
        return None
    media = MediaArgs(
        allowed_local_media_path=args.allowed_local_media_path,
        allowed_media_domains=tuple(args.allowed_media_domains),
        allow_private_media_addresses=args.allow_private_media_addresses,
        limit_mm_per_prompt=args.limit_mm_per_prompt,
        media_io_kwargs=args.media_io_kwargs,
    )
    return MediaPipeline.build(model_dir, tokenizer, media)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value
