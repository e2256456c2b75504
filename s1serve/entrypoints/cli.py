"""The `s1serve` command, and `python -m s1serve.launch_server` (SGLang's flags). A bad flag prints the usage of
the command that got it; other user errors print one line (`error: ...`); both exit with status 2.

The three dialects of the deployment guide run the same server: `s1serve serve api_server` (LMDeploy's flags),
`s1serve vllm-serve` (vLLM's) and `python -m s1serve.launch_server` (SGLang's), the last two translated onto the
first by s1serve.entrypoints.dialects.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from s1serve.engine.config import EngineConfig, add_engine_args
from s1serve.entrypoints.argparsing import Parser, dash_spelling
from s1serve.entrypoints.dialects import (
    INTERNAL_COMMAND, add_media_and_process_arguments, add_sglang_arguments, add_vllm_arguments, translate,
)
from s1serve.entrypoints.preflight import check_before_launch
from s1serve.errors import S1ServeError
from s1serve.parallel.config import ParallelConfig, add_parallel_args
from s1serve.serve.openai.arguments import add_api_server_arguments
from s1serve.serve.proxy.config import add_proxy_parser

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # as s1serve.entrypoints.api_server's
SGLANG_PROG = "python -m s1serve.launch_server"
log = logging.getLogger("s1serve.cli")

DEMO_PRESET = "tiny"
DEMO_SEED = 0


def cache_dir() -> Path:
    return Path(os.environ.get("S1SERVE_CACHE", Path.home() / ".cache" / "s1serve"))


def demo_checkpoint() -> Path:
    """The embedded default: a tiny checkpoint written on first use (atomically) into the cache folder."""
    from s1serve.checkpoint.tiny import write_tiny_checkpoint

    target = cache_dir() / f"demo-{DEMO_PRESET}-seed{DEMO_SEED}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    write_tiny_checkpoint(staging, DEMO_PRESET, DEMO_SEED)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from s1serve.checkpoint.tiny import write_tiny_checkpoint

    out = write_tiny_checkpoint(args.out, args.preset, args.seed, args.arch, fp8=args.fp8)
    kind = "FP8 " if args.fp8 else ""
    print(f"wrote {args.preset} {kind}checkpoint ({args.arch}, seed {args.seed}) to {out}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from s1serve.checkpoint.quantize import parse_size, quantize_checkpoint

    out = quantize_checkpoint(args.src, args.dst, parse_size(args.max_shard_size))
    print(f"wrote the FP8 checkpoint of {args.src} to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from s1serve.entrypoints.llm import LLM
    from s1serve.sampling_params import SamplingParams

    parallel = ParallelConfig.from_namespace(args)
    engine = EngineConfig.from_namespace(args, exclude=("seed",))
    llm = LLM(model=args.model, dtype=args.dtype, device=args.device, **asdict(parallel), **asdict(engine))
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        for out in llm.generate(args.prompt, params):
            print(out.text)
    finally:
        llm.shutdown()
    return 0


def serve_demo(server_args: list[str]) -> int:
    """`make serve`: the OpenAI-compatible server with the guide's parsers on the embedded demo checkpoint."""
    model = demo_checkpoint()
    print(f"demo checkpoint: {model}", flush=True)
    return main(["serve", "api_server", str(model), "--model-name", "intern-s1-pro-demo", "--dtype", "float32",
                 "--reasoning-parser", "intern-s1", "--tool-call-parser", "qwen3", *server_args])


def cmd_api_server(args: argparse.Namespace, notes: tuple[str, ...] = ()) -> int:
    """Checks everything it can (s1serve.entrypoints.preflight) before torch is imported or a rank starts."""
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    for line in notes:
        log.info("%s", line)
    _, checked = check_before_launch(args)
    for line in checked:
        log.info("%s", line)

    from s1serve.entrypoints.api_server import run_api_server

    return run_api_server(args)


def add_api_server_parser_arguments(parser: argparse.ArgumentParser) -> None:
    add_api_server_arguments(parser)
    add_media_and_process_arguments(parser)


def api_server_args(
    dialect: str, label: str, args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[argparse.Namespace, list[str]]:
    """Another server's flags (`args`, parsed by `parser` from `args.argv`) as the api_server flags they map onto,
    with one log line per flag given and the equivalent api_server command line."""
    internal = Parser(prog=INTERNAL_COMMAND)
    add_api_server_parser_arguments(internal)
    translation = translate(dialect, args, args.argv, parser, internal)
    notes = [f"{label}: {note}" for note in translation.notes]
    notes.append(f"{label}: runs as {INTERNAL_COMMAND} {shlex.join(translation.shown())}")
    return internal.parse_args(translation.argv), notes


def run_dialect(dialect: str, label: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    server_args, notes = api_server_args(dialect, label, args, parser)
    return cmd_api_server(server_args, tuple(notes))


def cmd_vllm_serve(args: argparse.Namespace) -> int:
    return run_dialect("vllm", "vllm-serve", args, args.parser)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="s1serve", description="Serve Intern-S1-Pro.")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny", help="write a random checkpoint in the published layout")
    tiny.add_argument("--out", required=True, help="folder to write")
    tiny.add_argument("--preset", choices=("tiny", "bench", "edge"), default="tiny")
    tiny.add_argument("--arch", choices=("interns1_pro", "qwen3_moe"), default="interns1_pro")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--fp8", action="store_true", help="write the published FP8 layout (as `quantize` would)")
    tiny.set_defaults(func=cmd_make_tiny)

    quant = sub.add_parser("quantize", help="convert a BF16 checkpoint to the published FP8 (block 128, ue8m0) layout")
    quant.add_argument("src", help="BF16 checkpoint folder")
    quant.add_argument("dst", help="folder to write (must not exist, or be empty)")
    quant.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 512MiB or bytes (default 5GB)")
    quant.set_defaults(func=cmd_quantize)

    gen = sub.add_parser("generate", help="offline generation from a prompt")
    gen.add_argument("model", help="checkpoint folder")
    gen.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for a batch)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=None, help="default: the checkpoint's generation_config")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    gen.add_argument("--device", default="cpu")
    add_engine_args(gen, exclude=("seed",))
    add_parallel_args(gen)
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="serve api_server | proxy").add_subparsers(dest="server", required=True)
    api = serve.add_parser("api_server", help="the OpenAI-compatible API server (LMDeploy's flags)")
    add_api_server_parser_arguments(api)
    api.set_defaults(func=cmd_api_server)
    add_proxy_parser(serve)

    vllm = sub.add_parser(
        "vllm-serve", help="the API server started with `vllm serve`'s flags",
        description=f"`vllm serve MODEL ...` as s1serve: each flag is mapped onto `{INTERNAL_COMMAND}` (logged at "
                    "start) or refused by name.",
    )
    add_vllm_arguments(vllm)
    vllm.set_defaults(func=cmd_vllm_serve, parser=vllm)

    sub.add_parser(
        "serve-demo", help="api_server on the embedded demo checkpoint (what `make serve` runs); takes api_server flags"
    )
    return parser


def _reporting_errors(run: Callable[[], int]) -> int:
    try:
        return run()
    except (S1ServeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = dash_spelling(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve-demo"] and not {"-h", "--help"} & set(argv[1:]):
        return _reporting_errors(lambda: serve_demo(argv[1:]))
    args = build_parser().parse_args(argv)
    args.argv = argv
    return _reporting_errors(lambda: args.func(args))


def launch_server_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=SGLANG_PROG,
        description=f"`python -m sglang.launch_server ...` as s1serve: each flag is mapped onto `{INTERNAL_COMMAND}` "
                    "(logged at start) or refused by name.",
    )
    add_sglang_arguments(parser)
    return parser


def main_launch_server(argv: list[str] | None = None) -> int:
    """`python -m s1serve.launch_server ...`: SGLang's flags, mapped onto `s1serve serve api_server`."""
    parser = launch_server_parser()
    argv = dash_spelling(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return _reporting_errors(lambda: run_dialect("sglang", "launch_server", args, parser))
