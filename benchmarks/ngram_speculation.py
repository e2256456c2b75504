"""N-gram speculative decoding against plain decoding: batch-1 greedy tokens/s, the ratio and the acceptance rate.

    .venv/bin/python benchmarks/ngram_speculation.py [--model DIR] [--k 4] [--output-len 128] [--rounds 3]

On the bench checkpoint (`make-tiny --preset bench --arch qwen3_moe`, written to --model on first use), offline
`LLM`, greedy, one request at a time, eos ignored. Workloads:
- `tool-json`: a tool-call prompt whose answer would echo its JSON arguments;
- `code-edit`: a function to edit, which an answer would mostly repeat;
- `looping`: a repeated pattern; a random-weight model does not echo prompts, but its greedy output tends to fall
  into a loop, which the drafts then follow: the case where acceptance is high;
- `random`: random token ids (nothing to look up: the cost of proposing and of failed drafts).
Random weights only echo by chance, so the first two measure mostly the overhead; `looping` shows the gain.
Each round runs plain, then speculative, on the same prompts (alternating keeps a slow spell of the shared
machine from falling on one side only); tokens/s is the best round's. Outputs are checked to be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from machine import describe_machine  # noqa: E402

from s1serve import LLM, SamplingParams  # noqa: E402
from s1serve.checkpoint.tiny import write_tiny_checkpoint  # noqa: E402

DEFAULT_MODEL = Path(os.environ.get("S1SERVE_CACHE", Path.home() / ".cache" / "s1serve")) / "bench-qwen3_moe-seed0"

TOOL_JSON = json.dumps({
    "name": "create_event",
    "arguments": {"title": "Quarterly planning", "start": "2025-03-04T09:00:00Z", "end": "2025-03-04T11:30:00Z",
                  "attendees": ["ana@example.com", "bo@example.com", "chen@example.com"],
                  "location": {"building": "North", "room": "4.12"}, "reminders": [10, 60]},
}, indent=2)
TOOL_PROMPT = f"Call the tool again with the same arguments, changing only the room to 4.14:\n{TOOL_JSON}\nAnswer:\n"
CODE = '''def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each run of `window` consecutive values."""
    if window < 1:
        raise ValueError("window must be >= 1")
    out = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''
CODE_PROMPT = f"Rename `values` to `samples` in this function and print the whole function:\n{CODE}\n"


def workloads(llm: LLM, input_len: int) -> dict[str, list[int]]:
    encode = llm.tokenizer.encode
    rng = random.Random(0)
    return {
        "tool-json": list(encode(TOOL_PROMPT)),
        "code-edit": list(encode(CODE_PROMPT)),
        "looping": ([1000, 2000, 3000, 4000] * input_len)[:input_len],
        "random": [rng.randrange(1000, 150000) for _ in range(input_len)],
    }


def timed(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0]
    return time.perf_counter() - start, list(out.token_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--k", type=int, default=4, help="--speculative-ngram-tokens")
    parser.add_argument("--lookup-max", type=int, default=4)
    parser.add_argument("--lookup-min", type=int, default=2)
    parser.add_argument("--input-len", type=int, default=128, help="tokens of the looping and random prompts")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        write_tiny_checkpoint(args.model, preset="bench", seed=0, arch="qwen3_moe")
    print(describe_machine())
    common = dict(dtype="auto", device="cpu", max_num_seqs=1, enable_prefix_caching=False)
    plain = LLM(model=str(args.model), **common)
    spec = LLM(model=str(args.model), speculative_ngram_tokens=args.k, prompt_lookup_max=args.lookup_max,
               prompt_lookup_min=args.lookup_min, **common)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    prompts = workloads(plain, args.input_len)
    timed(plain, prompts["random"][:16], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
    timed(spec, prompts["looping"][:16], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    print(f"greedy, batch 1, {args.output_len} output tokens, k={args.k}, n-gram {args.lookup_min}..{args.lookup_max}, "
          f"best of {args.rounds} rounds")
    print(f"{'workload':<10} {'prompt':>6} {'plain tok/s':>11} {'spec tok/s':>10} {'ratio':>6} {'accepted':>14}")
    for name, prompt in prompts.items():
        best_plain = best_spec = float("inf")
        before = spec.engine.stats()
        for _ in range(args.rounds):
            seconds, reference = timed(plain, prompt, params)
            best_plain = min(best_plain, seconds)
            seconds, ids = timed(spec, prompt, params)
            best_spec = min(best_spec, seconds)
            assert ids == reference, f"{name}: speculative greedy output differs from plain"
        after = spec.engine.stats()
        drafted = after.spec_draft_tokens - before.spec_draft_tokens
        accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
        rate = f"{accepted}/{drafted} {accepted / drafted:.0%}" if drafted else "0/0"
        print(f"{name:<10} {len(prompt):>6} {args.output_len / best_plain:>11.1f} {args.output_len / best_spec:>10.1f} "
              f"{best_plain / best_spec:>5.2f}x {rate:>14}", flush=True)


if __name__ == "__main__":
    main()
