"""The deployment guide's three command-line dialects, each mapped onto one internal config: the flags of
`s1serve serve api_server` (LMDeploy's dialect, which s1serve speaks natively).

- `s1serve vllm-serve MODEL ...` takes `vllm serve`'s flags (VLLM table);
- `python -m s1serve.launch_server --model-path MODEL ...` takes SGLang's (SGLANG table).

Each flag of a table either becomes one api_server flag with the same value (`becomes`), or is derived together
with others (`note` says how; the dialect's `derive_*` does it), or is ignored here (`note` says why). A flag
given is logged once with what it became. A flag s1serve cannot honour is refused by name (argparse for unknown
flags, `derive_*` for values). Underscore spellings (`--gpu_memory_utilization`) are read by
s1serve.entrypoints.argparsing.

MEDIA_AND_PROCESS lists api_server flags that other dialects map onto and that no other module defines yet;
`check_media_and_process` checks those and the media flags before any rank starts, refusing values the server
would silently not honour.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from typing import Any

from s1serve.engine.config import EngineConfig
from s1serve.parallel.config import BACKENDS, ParallelConfig
from s1serve.serve.openai.arguments import DEFAULT_SHUTDOWN_TIMEOUT_S
from s1serve.serve.parsers.registry import REASONING_PARSER_NAMES, TOOL_CALL_PARSER_NAMES

INTERNAL_COMMAND = "s1serve serve api_server"
LOG_LEVELS = ("debug", "info", "warning", "error")
REDACTED = "***"


@dataclass(frozen=True)
class Flag:
    """One flag of another server's command line and what it becomes in s1serve."""

    names: tuple[str, ...]  # its spellings there (the first is the one logged)
    becomes: str | None = None  # the api_server flag that takes its value; None: derived or ignored (see note)
    note: str = ""  # how it maps (logged after the mapping), or why it is ignored
    options: dict[str, Any] = field(default_factory=dict)  # argparse.add_argument keyword arguments
    secret: bool = False  # a key: its value is never logged

    @property
    def dest(self) -> str:
        return self.names[0].lstrip("-").replace("-", "_")


def _ignored(why: str) -> str:
    return f"ignored: {why}"


def _max_len(text: str) -> int:
    """vLLM's --max-model-len: an integer, or with a k/m suffix (1k = 1000, 1K = 1024)."""
    scale = {"k": 1000, "m": 1000**2, "K": 1024, "M": 1024**2}.get(text[-1:], 1)
    digits = text[:-1] if scale != 1 else text
    try:
        return int(float(digits) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer such as 65536 or 64K, got {text!r}") from None


NO_REMOTE_CODE = _ignored("s1serve runs its own Intern-S1-Pro code; no code from the checkpoint is run")
NO_CUDA_GRAPHS = _ignored("s1serve runs eagerly (no CUDA graphs are captured)")
MEMORY_FRACTION = (
    "the KV cache's share of the device memory left after the weights (this flag's fraction also covers the "
    "weights, so the same number gives s1serve a larger KV cache)"
)
DTYPES = ("auto", "bfloat16", "float32")

ENGINE = EngineConfig()
COMMON_VALUE_FLAGS = (
    Flag(("--reasoning-parser",), "--reasoning-parser",
         options={"default": None, "help": f"one of {', '.join(REASONING_PARSER_NAMES)}"}),
    Flag(("--tool-call-parser",), "--tool-call-parser",
         options={"default": None, "help": f"one of {', '.join(TOOL_CALL_PARSER_NAMES)}"}),
    Flag(("--trust-remote-code",), note=NO_REMOTE_CODE, options={"action": "store_true"}),
    Flag(("--device",), "--device",
         options={"default": "cpu", "help": "cpu or cuda (s1serve's default is cpu; one device per rank)"}),
)

VLLM: tuple[Flag, ...] = COMMON_VALUE_FLAGS + (
    Flag(("--host",), "--server-name", options={"default": "0.0.0.0", "help": "address to listen on"}),
    Flag(("--port",), "--server-port", options={"type": int, "default": 8000}),
    Flag(("--served-model-name",), "--model-name",
         options={"nargs": "+", "default": None, "help": "the name clients use (one; default: the folder name)"}),
    Flag(("--tensor-parallel-size", "-tp"), "--tp", options={"type": int, "default": 1}),
    Flag(("--pipeline-parallel-size", "-pp"), note="refused above 1: s1serve has no pipeline parallelism",
         options={"type": int, "default": 1}),
    Flag(("--data-parallel-size", "-dp"), "--dp", options={"type": int, "default": 1}),
    Flag(("--enable-expert-parallel",), note="--ep = tensor-parallel-size x data-parallel-size (experts over all ranks)",
         options={"action": "store_true"}),
    Flag(("--data-parallel-size-local",),
         note="--nnodes = data-parallel-size / data-parallel-size-local", options={"type": int, "default": None}),
    Flag(("--data-parallel-start-rank",),
         note="--node-rank = data-parallel-start-rank / data-parallel-size-local", options={"type": int, "default": 0}),
    Flag(("--data-parallel-address",), note="--dist-init-addr ADDRESS:RPC_PORT (where the ranks meet)",
         options={"default": None}),
    Flag(("--data-parallel-rpc-port",), note="the port of --dist-init-addr",
         options={"type": int, "default": 29550}),
    Flag(("--headless",),
         note="--headless under tensor parallelism; with --data-parallel-size every s1serve node serves its own DP "
              "ranks on --port + rank (node 0 does not reach them): put `s1serve serve proxy` in front for one "
              "endpoint",
         options={"action": "store_true"}),
    Flag(("--nnodes",), "--nnodes", options={"type": int, "default": 1}),
    Flag(("--node-rank",), "--node-rank", options={"type": int, "default": 0}),
    Flag(("--master-addr",), note="--dist-init-addr MASTER_ADDR:MASTER_PORT", options={"default": None}),
    Flag(("--master-port",), note="the port of --dist-init-addr", options={"type": int, "default": 29501}),
    Flag(("--distributed-executor-backend",), "--distributed-executor-backend",
         options={"choices": BACKENDS, "default": "mp"}),
    Flag(("--all2all-backend",),
         note=_ignored("s1serve exchanges MoE tokens with torch.distributed all-gather/reduce-scatter "
                       "(no DeepEP kernels; docs/deployment.md)"),
         options={"default": None}),
    Flag(("--gpu-memory-utilization",), "--cache-max-entry-count", note=MEMORY_FRACTION,
         options={"type": float, "default": 0.8}),
    Flag(("--num-gpu-blocks-override",), "--num-kv-blocks", options={"type": int, "default": None}),
    Flag(("--block-size",), "--block-size", options={"type": int, "default": ENGINE.block_size}),
    Flag(("--max-model-len",), "--max-model-len",
         options={"type": _max_len, "default": None, "help": "e.g. 65536 or 64K (default: the model's positions)"}),
    Flag(("--max-num-seqs",), "--max-num-seqs", options={"type": int, "default": ENGINE.max_num_seqs}),
    Flag(("--max-num-batched-tokens",), "--max-num-batched-tokens",
         options={"type": int, "default": ENGINE.max_num_batched_tokens}),
    Flag(("--enable-prefix-caching",), "--enable-prefix-caching",
         options={"action": argparse.BooleanOptionalAction, "default": True}),
    Flag(("--dtype",), "--dtype", options={"choices": DTYPES, "default": "auto"}),
    Flag(("--seed",), "--seed", options={"type": int, "default": ENGINE.seed}),
    Flag(("--enforce-eager",), note=NO_CUDA_GRAPHS, options={"action": "store_true"}),
    Flag(("--enable-auto-tool-choice",),
         note="tool_choice 'auto' is served whenever --tool-call-parser is set", options={"action": "store_true"}),
    Flag(("--api-key",), "--api-keys", secret=True,
         options={"default": None, "help": "the key clients must send (default: $VLLM_API_KEY)"}),
    Flag(("--allowed-origins",), "--allowed-origins",
         note="CORS stays off unless given (vLLM's default is every origin)", options={"default": None}),
    Flag(("--allowed-methods",), "--allowed-methods", options={"default": None}),
    Flag(("--allowed-headers",), "--allowed-headers", options={"default": None}),
    Flag(("--allow-credentials",), "--allow-credentials", options={"action": "store_true"}),
    Flag(("--uvicorn-log-level",), "--log-level", options={"choices": LOG_LEVELS, "default": "info"}),
    Flag(("--api-server-count",), "--api-server-count", options={"type": int, "default": None}),
    Flag(("--shutdown-timeout",), "--shutdown-timeout", options={"type": float, "default": DEFAULT_SHUTDOWN_TIMEOUT_S}),
    Flag(("--media-io-kwargs",), "--media-io-kwargs",
         options={"default": None, "help": 'JSON, e.g. \'{"video": {"num_frames": 768, "fps": 2}}\''}),
    Flag(("--mm-processor-cache-gb",), "--mm-processor-cache-gb", options={"type": float, "default": None}),
    Flag(("--limit-mm-per-prompt",), "--limit-mm-per-prompt",
         options={"default": None, "help": 'JSON, e.g. \'{"image": 4, "video": 1}\''}),
    Flag(("--speculative-config",),
         note="method ngram only: --speculative-ngram-tokens num_speculative_tokens, --prompt-lookup-max/min",
         options={"default": None, "help": 'JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
                  '"prompt_lookup_max": 4, "prompt_lookup_min": 2}\''}),
)

SGLANG: tuple[Flag, ...] = COMMON_VALUE_FLAGS + (
    Flag(("--host",), "--server-name", options={"default": "127.0.0.1", "help": "address to listen on"}),
    Flag(("--model-path", "--model"), note="the checkpoint folder", options={"required": True}),
    Flag(("--port",), "--server-port", options={"type": int, "default": 30000}),
    Flag(("--served-model-name",), "--model-name",
         options={"default": None, "help": "the name clients use (default: the folder name)"}),
    Flag(("--tp", "--tp-size", "--tensor-parallel-size"), note="--tp (with --enable-dp-attention: --dp, see there)",
         options={"type": int, "default": 1}),
    Flag(("--ep", "--ep-size", "--expert-parallel-size"), "--ep", options={"type": int, "default": 1}),
    Flag(("--dp", "--dp-size", "--data-parallel-size"), "--dp", options={"type": int, "default": 1}),
    Flag(("--enable-dp-attention",), note="--dp DP --tp 1: one rank per DP attention group (needs --tp = --dp)",
         options={"action": "store_true"}),
    Flag(("--dist-init-addr",), "--dist-init-addr", options={"default": None}),
    Flag(("--nnodes",), "--nnodes", options={"type": int, "default": 1}),
    Flag(("--node-rank",), "--node-rank",
         note="a node other than 0 serves no HTTP under --tp/--ep: --headless", options={"type": int, "default": 0}),
    Flag(("--mem-fraction-static",), "--cache-max-entry-count", note=MEMORY_FRACTION,
         options={"type": float, "default": 0.8}),
    Flag(("--attention-backend",),
         note=_ignored("attention runs as PyTorch ops on every device (no FlashAttention/FlashInfer kernels)"),
         options={"default": None}),
    Flag(("--mm-attention-backend",),
         note=_ignored("the vision tower's attention runs as PyTorch ops (no FlashAttention kernels)"),
         options={"default": None}),
    Flag(("--keep-mm-feature-on-device",),
         note=_ignored("switches where SGLang's multimodal feature cache lives; s1serve has no such cache"),
         options={"action": "store_true"}),
    Flag(("--moe-a2a-backend",),
         note=_ignored("s1serve exchanges MoE tokens with torch.distributed all-gather/reduce-scatter"),
         options={"default": None}),
    Flag(("--disable-cuda-graph",), note=NO_CUDA_GRAPHS, options={"action": "store_true"}),
    Flag(("--page-size",), "--block-size", options={"type": int, "default": ENGINE.block_size}),
    Flag(("--max-total-tokens",), note="--num-kv-blocks = ceil(max-total-tokens / KV block size)",
         options={"type": int, "default": None}),
    Flag(("--context-length",), "--max-model-len", options={"type": int, "default": None}),
    Flag(("--max-running-requests",), "--max-num-seqs", options={"type": int, "default": ENGINE.max_num_seqs}),
    Flag(("--chunked-prefill-size",), "--max-num-batched-tokens",
         options={"type": int, "default": ENGINE.max_num_batched_tokens}),
    Flag(("--disable-radix-cache",), note="--no-enable-prefix-caching", options={"action": "store_true"}),
    Flag(("--dtype",), "--dtype", options={"choices": DTYPES, "default": "auto"}),
    Flag(("--random-seed",), "--seed", options={"type": int, "default": ENGINE.seed}),
    Flag(("--api-key",), "--api-keys", secret=True,
         options={"default": None, "help": "the key clients must send"}),
    Flag(("--log-level",), "--log-level", options={"choices": LOG_LEVELS, "default": "info"}),
)

# api_server flags (LMDeploy dialect) that vLLM's same-named flags map onto, wired by the engine-process and
# multimodal work; status: what the server does with each today.
MEDIA_AND_PROCESS: tuple[Flag, ...] = (
    Flag(("--api-server-count",),
         note="API server processes in front of each engine process, sharing its port (default 1)",
         options={"type": int, "default": None}),
)


def _add(parser: argparse.ArgumentParser, flags: tuple[Flag, ...], title: str) -> None:
    group = parser.add_argument_group(title)
    for f in flags:
        options = dict(f.options)
        if "help" not in options:
            target = f"-> {f.becomes}" if f.becomes else ""
            options["help"] = "; ".join(part for part in (target, f.note) if part) or None
        group.add_argument(*f.names, dest=f.dest, **options)


def add_media_and_process_arguments(parser: argparse.ArgumentParser) -> None:
    _add(parser, MEDIA_AND_PROCESS, "API server processes and media")


def add_vllm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint folder")
    _add(parser, VLLM, f"vLLM flags (each mapped onto {INTERNAL_COMMAND})")


def add_sglang_arguments(parser: argparse.ArgumentParser) -> None:
    _add(parser, SGLANG, f"SGLang flags (each mapped onto {INTERNAL_COMMAND})")


@dataclass
class Translation:
    """The api_server command line a dialect's flags become, and one log line per flag given."""

    argv: list[str]
    notes: list[str] = field(default_factory=list)
    secret_at: set[int] = field(default_factory=set)  # positions in argv of values never logged

    def add(self, flag: str, value: Any = True, secret: bool = False) -> None:
        if isinstance(value, bool):  # a switch: --flag, or --no-flag for a BooleanOptionalAction turned off
            self.argv.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            self.argv += [flag, str(value)]
            if secret:
                self.secret_at.add(len(self.argv) - 1)

    def shown(self) -> list[str]:
        """argv as logged: secret values replaced by ***."""
        return [REDACTED if i in self.secret_at else arg for i, arg in enumerate(self.argv)]


def _given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Dests of the options spelled in argv (after dash_spelling)."""
    spelled = {arg.partition("=")[0] for arg in argv if arg.startswith("-")}
    return {a.dest for a in parser._actions if spelled & set(a.option_strings)}


def _internal_default(internal: argparse.ArgumentParser, option: str) -> Any:
    (action,) = [a for a in internal._actions if option in a.option_strings]
    return action.default


def _translate(ns: argparse.Namespace, flags: tuple[Flag, ...], parser: argparse.ArgumentParser, argv: list[str],
               internal: argparse.ArgumentParser, model: str) -> Translation:
    """The 1:1 flags (`becomes`: those whose value is not already the api_server default) and the notes of every
    flag given; derived ones are left to the dialect."""
    given = _given(parser, argv)
    out = Translation([model])
    for f in flags:
        value = getattr(ns, f.dest)
        if f.becomes and value != _internal_default(internal, f.becomes):
            out.add(f.becomes, value, f.secret)
        if f.dest in given:
            out.notes.append(_note(f, REDACTED if f.secret else value))
    return out


def _note(f: Flag, value: Any) -> str:
    """`--tensor-parallel-size 2 -> --tp 2`, `--trust-remote-code: ignored: ...`."""

    def spelled(name: str) -> str:
        if isinstance(value, bool):
            return name if value else "--no-" + name[2:]
        return f"{name} {value}"

    line = spelled(f.names[0]) + (f" -> {spelled(f.becomes)}" if f.becomes else "")
    return line + (f": {f.note}" if f.note else "")


def derive_vllm(ns: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser,
                internal: argparse.ArgumentParser) -> Translation:
    """`s1serve vllm-serve` flags -> the api_server command line."""
    fail = parser.error  # the dialect's usage and the message, exit status 2
    if ns.served_model_name and len(ns.served_model_name) > 1:
        fail(f"--served-model-name {' '.join(ns.served_model_name)}: s1serve serves one name per model")
    if ns.served_model_name:
        ns.served_model_name = ns.served_model_name[0]
    if ns.pipeline_parallel_size != 1:
        fail(f"--pipeline-parallel-size {ns.pipeline_parallel_size}: s1serve has no pipeline parallelism (only 1)")
    out = _translate(ns, VLLM, parser, argv, internal, ns.model)
    if ns.speculative_config:
        try:
            for name, value in _vllm_ngram(_json_object("--speculative-config", ns.speculative_config)):
                out.add(name, value)
        except ValueError as exc:
            fail(str(exc))
    tp, dp = ns.tensor_parallel_size, ns.data_parallel_size
    if ns.enable_expert_parallel:
        out.add("--ep", tp * dp)
    if dp > 1:
        local = ns.data_parallel_size_local or dp
        if local < 1 or dp % local:
            fail(f"--data-parallel-size-local {local} must divide --data-parallel-size {dp}")
        if ns.data_parallel_start_rank % local:
            fail(f"--data-parallel-start-rank {ns.data_parallel_start_rank} must be a multiple of "
                 f"--data-parallel-size-local {local} (s1serve puts the same number of DP ranks on every node)")
        if dp // local > 1:
            out.add("--nnodes", dp // local)
            out.add("--node-rank", ns.data_parallel_start_rank // local)
        if ns.data_parallel_address:
            out.add("--dist-init-addr", f"{ns.data_parallel_address}:{ns.data_parallel_rpc_port}")
    else:
        for name in ("data_parallel_size_local", "data_parallel_address"):
            if getattr(ns, name) is not None:
                fail(f"--{name.replace('_', '-')} needs --data-parallel-size > 1")
        if ns.master_addr:
            out.add("--dist-init-addr", f"{ns.master_addr}:{ns.master_port}")
        if ns.headless:
            out.add("--headless")
    return out


def _vllm_ngram(config: dict) -> list[tuple[str, int]]:
    """vLLM's n-gram speculative config as s1serve flags; a lookup bound given alone is both bounds, none: 5 and 5
    (vLLM's defaults)."""
    if config.get("method") != "ngram":
        raise ValueError(f"--speculative-config: method {config.get('method')!r}: s1serve speculates with "
                         "\"ngram\" only (prompt lookup; no draft model)")
    unknown = set(config) - {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}
    if unknown:
        raise ValueError(f"--speculative-config: {', '.join(sorted(unknown))} not supported with method ngram")
    k = config.get("num_speculative_tokens")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"--speculative-config: num_speculative_tokens must be an integer >= 1, got {k!r}")
    high, low = config.get("prompt_lookup_max"), config.get("prompt_lookup_min")
    high, low = high or low or 5, low or high or 5
    return [("--speculative-ngram-tokens", k), ("--prompt-lookup-max", high), ("--prompt-lookup-min", low)]


def derive_sglang(ns: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser,
                  internal: argparse.ArgumentParser) -> Translation:
    """`python -m s1serve.launch_server` flags -> the api_server command line."""
    out = _translate(ns, SGLANG, parser, argv, internal, ns.model_path)
    if ns.enable_dp_attention:
        if ns.dp < 2 or ns.tp != ns.dp:
            parser.error(f"--enable-dp-attention with --tp {ns.tp} --dp {ns.dp}: s1serve runs one rank per DP "
                         "attention group; give --tp and --dp the same size (> 1)")
    else:
        out.add("--tp", ns.tp if ns.tp != 1 else None)
    if ns.disable_radix_cache:
        out.add("--enable-prefix-caching", False)
    if ns.node_rank > 0 and ns.dp == 1:
        out.add("--headless")
    if ns.max_total_tokens is not None:
        block = ns.page_size
        out.add("--num-kv-blocks", math.ceil(ns.max_total_tokens / block))
    return out


def translate(dialect: str, ns: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser,
              internal: argparse.ArgumentParser) -> Translation:
    """`ns` (parsed by `parser` from `argv`) as a command line of `internal`, the api_server parser."""
    return {"vllm": derive_vllm, "sglang": derive_sglang}[dialect](ns, argv, parser, internal)


def _json_object(flag: str, text: str) -> dict:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{flag}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{flag}: expected a JSON object, got {text!r}")
    return data


def check_media_and_process(args: argparse.Namespace, parallel: ParallelConfig) -> list[str]:
    """Refuses MEDIA_AND_PROCESS values the server would not honour; the log lines for the ones it takes."""
    notes = []
    count = args.api_server_count
    if count is not None:
        if count < 1:
            raise ValueError(f"--api-server-count must be at least 1 (got {count})")
        per = " per DP rank" if parallel.dp > 1 else ""
        notes.append(f"--api-server-count {count}: {count} API server process(es){per} in front of the engine process")
    if args.media_io_kwargs is not None:
        from s1serve.multimodal.processor import parse_media_io_kwargs  # imports torch: only when given

        parse_media_io_kwargs(args.media_io_kwargs)
    if args.limit_mm_per_prompt is not None:
        limits = _json_object("--limit-mm-per-prompt", args.limit_mm_per_prompt)
        for kind, n in limits.items():
            if kind not in ("image", "video") or isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"--limit-mm-per-prompt: expected {{\"image\"|\"video\": count >= 0}}, got {limits}")
    return notes
