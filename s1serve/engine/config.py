"""EngineConfig: the engine's knobs, each with the command-line flag that sets it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 64  # tokens per KV block
    num_kv_blocks: int | None = None  # KV capacity in blocks; None: from cache_max_entry_count
    cache_max_entry_count: float = 0.8  # fraction of free device memory (after the weights) given to the KV cache
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_num_seqs: int = 256  # sequences running at once
    # While other sequences decode, one prompt chunk of a step takes at most this many tokens and this many
    # (query x key) attention pairs, so that the step stays close to a decode step; 0: no bound.
    max_prefill_tokens_while_decoding: int = 256
    max_prefill_pairs_while_decoding: int = 1 << 18
    max_model_len: int | None = None  # prompt + output cap; None: the model's max positions (and the KV capacity)
    enable_prefix_caching: bool = True
    seed: int = 0  # seeds the generators of requests that bring no seed, in arrival order
    mm_processor_cache_gb: float = 4.0  # GiB of vision features kept for reuse by later requests (0: none)
    max_num_queued_reqs: int | None = None  # requests waiting beyond a full batch; None: 4 x max_num_seqs
    max_num_queued_tokens: int | None = None  # prompt tokens waiting; None: the KV cache's capacity in tokens
    speculative_ngram_tokens: int = 0  # drafts proposed by n-gram (prompt lookup) per decode step; 0: off
    prompt_lookup_max: int = 4  # longest suffix n-gram looked up for a draft
    prompt_lookup_min: int = 2  # shortest

    def __post_init__(self) -> None:
        def at_least(name: str, low: int) -> None:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ValueError(f"{flag(name)} must be an integer >= {low}, got {value!r}")

        for name in ("block_size", "num_kv_blocks", "max_num_batched_tokens", "max_num_seqs", "max_model_len",
                     "max_num_queued_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            at_least(name, 1)
        for name in ("max_num_queued_reqs", "max_prefill_tokens_while_decoding", "max_prefill_pairs_while_decoding",
                     "speculative_ngram_tokens"):
            at_least(name, 0)
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"{flag('prompt_lookup_min')} ({self.prompt_lookup_min}) must not exceed "
                f"{flag('prompt_lookup_max')} ({self.prompt_lookup_max})"
            )
        if not isinstance(self.mm_processor_cache_gb, (int, float)) or self.mm_processor_cache_gb < 0:
            raise ValueError(f"{flag('mm_processor_cache_gb')} must be a number >= 0, got {self.mm_processor_cache_gb!r}")
        if not 0 < self.cache_max_entry_count <= 1:
            raise ValueError(f"{flag('cache_max_entry_count')} must be in (0, 1], got {self.cache_max_entry_count!r}")

    @classmethod
    def from_namespace(cls, args: argparse.Namespace, exclude: tuple[str, ...] = ()) -> "EngineConfig":
        """The config from parsed flags (see add_engine_args); excluded fields keep their defaults."""
        names = [f.name for f in fields(cls) if f.name not in exclude and hasattr(args, f.name)]
        return cls(**{name: getattr(args, name) for name in names})


def flag(name: str) -> str:
    """The command-line flag of an EngineConfig field."""
    return "--" + name.replace("_", "-")


_HELP = {
    "block_size": "tokens per KV-cache block",
    "num_kv_blocks": "KV-cache capacity in blocks (default: from --cache-max-entry-count)",
    "cache_max_entry_count": "fraction of free device memory, after loading the weights, for the KV cache",
    "max_num_batched_tokens": "most tokens (prefill chunks + decodes) in one engine step",
    "max_num_seqs": "most sequences running at once",
    "max_prefill_tokens_while_decoding": "most tokens of one prompt chunk in a step where other sequences decode "
    "(0: no bound beyond --max-num-batched-tokens); keeps their inter-token latency close to a decode step",
    "max_prefill_pairs_while_decoding": "most (query x key) attention pairs of one prompt chunk in a step where "
    "other sequences decode (0: no bound): a chunk deep into a long prompt gets fewer tokens",
    "max_model_len": "most tokens (prompt + output) of one sequence (default: the model's max positions)",
    "enable_prefix_caching": "reuse the KV blocks of identical prompt prefixes",
    "seed": "seed for the generators of requests that set no seed",
    "mm_processor_cache_gb": "GiB of image/video features kept (LRU by content) so a repeated picture is not "
    "encoded again; 0 turns the cache off",
    "max_num_queued_reqs": "requests that may wait for a slot beyond a full batch of --max-num-seqs; more are "
    "answered 429 with Retry-After (default: 4 x --max-num-seqs)",
    "max_num_queued_tokens": "prompt tokens that may wait to be computed; more are answered 429 with Retry-After "
    "(default: the KV cache's capacity in tokens)",
    "speculative_ngram_tokens": "n-gram (prompt lookup) speculative decoding: up to this many draft tokens, copied "
    "from what followed an earlier occurrence of the sequence's last tokens, verified in one forward; 0 turns it off",
    "prompt_lookup_max": "longest n-gram of the sequence's last tokens looked up for drafts",
    "prompt_lookup_min": "shortest n-gram of the sequence's last tokens looked up for drafts",
}


def add_engine_args(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """Adds one flag per EngineConfig field (`--block-size`, ..., `--no-enable-prefix-caching`), but the excluded
    ones (e.g. "seed" where a command already has a sampling --seed)."""
    group = parser.add_argument_group("engine")
    for f in fields(EngineConfig):
        if f.name in exclude:
            continue
        if f.type == "bool":
            group.add_argument(
                flag(f.name), action=argparse.BooleanOptionalAction, default=f.default, help=_HELP[f.name]
            )
        else:
            kind = float if "float" in str(f.type) else int
            group.add_argument(flag(f.name), type=kind, default=f.default, help=_HELP[f.name])
