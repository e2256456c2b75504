"""The `s1serve` command. User errors print one line (`error: ...`) and exit with status 2."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from s1serve.engine.config import EngineConfig, add_engine_args
from s1serve.errors import S1ServeError
from s1serve.parallel.config import ParallelConfig, add_parallel_args
from s1serve.serve.openai.arguments import add_api_server_arguments
from s1serve.serve.proxy.config import add_proxy_parser

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


def cmd_serve_demo(args: argparse.Namespace) -> int:
    """`make serve`: the OpenAI-compatible server with the guide's parsers on the embedded demo checkpoint."""
    model = demo_checkpoint()
    print(f"demo checkpoint: {model}", flush=True)
    return main(["serve", "api_server", str(model), "--model-name", "intern-s1-pro-demo", "--dtype", "float32",
                 "--reasoning-parser", "intern-s1", "--tool-call-parser", "qwen3", *args.server_args])


def cmd_api_server(args: argparse.Namespace) -> int:
    ParallelConfig.from_namespace(args)  # a bad shape fails here, before torch is imported

    from s1serve.entrypoints.api_server import run_api_server

    return run_api_server(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s1serve", description="Serve Intern-S1-Pro.")
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
    api = serve.add_parser("api_server", help="the OpenAI-compatible API server")
    add_api_server_arguments(api)
    api.set_defaults(func=cmd_api_server)
    add_proxy_parser(serve)

    demo = sub.add_parser(
        "serve-demo", help="api_server on the embedded demo checkpoint (what `make serve` runs); takes api_server flags"
    )
    demo.set_defaults(func=cmd_serve_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "serve-demo":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.server_args = extra
    try:
        return args.func(args)
    except (S1ServeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
