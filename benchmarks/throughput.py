"""Offline throughput: s1serve's engine against HF transformers on identical weights, side by side in one run.

    .venv/bin/python benchmarks/throughput.py [--model DIR] [--hf-python /tmp/refvenv/bin/python]
                                              [--concurrency 1 8 64] [--input-len 128] [--output-len 128]

The checkpoint is `make-tiny --preset bench --arch qwen3_moe` (written to --model on first use): the bench
preset's decoder with plain RoPE and plain top-k routing, which transformers runs as its native Qwen3-MoE.
For each concurrency C, C requests of --input-len random prompt ids generate exactly --output-len ids each
(greedy, eos ignored), all submitted at once; output tokens/s = C * output-len / wall time (prefill included),
the best of --repeats rounds. Rounds alternate s1serve and transformers (a shared machine stalls multi-threaded
runs at random; alternating keeps a slow spell from falling on one side only, and the best run is the one that
was not disturbed).
transformers runs in a subprocess of its own Python (--hf-python): plain `generate` on the whole batch (equal
prompt lengths: no padding), and `generate_batch` (its continuous-batching API) where the version has one.

Batch-1 decode is also measured against the memory-bandwidth roofline: bytes of weights one decode step reads
(everything but the embedding table and the unrouted experts; one embedding row, top-k experts per layer) over
the read bandwidth measured just before each decode run (the fastest of 5 sums over a 1 GiB tensor): this VM's
bandwidth moves between ~45 and ~80 GB/s with its neighbours, so each run is compared with its own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from machine import describe_machine  # noqa: E402

from s1serve import LLM, SamplingParams  # noqa: E402
from s1serve.checkpoint.tiny import write_tiny_checkpoint  # noqa: E402
from s1serve.engine.host_memory import huge_page_empty  # noqa: E402
from s1serve.layers.moe import SparseMoE  # noqa: E402

DEFAULT_MODEL = Path(os.environ.get("S1SERVE_CACHE", Path.home() / ".cache" / "s1serve")) / "bench-qwen3_moe-seed0"

# Runs inside transformers' Python. Reads {"model", "prompts": {C: [[ids]]}, "output_len", "threads", "repeats"}
# on stdin and prints {"generate": {C: seconds}, "generate_batch": {C: seconds} | error, "decode_step_s": s,
# "ids": first output}; each time is the best of the repeats.
HF_SCRIPT = r"""
import json, sys, time, logging, statistics
import torch
logging.disable(logging.WARNING)
from transformers import AutoModelForCausalLM, GenerationConfig
job = json.load(sys.stdin)
torch.set_num_threads(job["threads"])
out_len = job["output_len"]
model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.bfloat16).eval()
def run(prompts, new):
    ids = torch.tensor(prompts)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                             min_new_tokens=new, pad_token_id=0)
    return time.perf_counter() - t, out[:, ids.shape[1]:].tolist()
result = {"generate": {}, "generate_batch": {}}
run(job["prompts"]["1"], 4)  # warm-up
for c, prompts in job["prompts"].items():
    seconds, ids = min(run(prompts, out_len) for _ in range(job["repeats"]))
    result["generate"][c] = seconds
    if c == "1":
        result["ids"] = ids[0]
        short = min(run(prompts, 1)[0] for _ in range(job["repeats"]))
        result["decode_step_s"] = (seconds - short) / (out_len - 1)
try:
    model.set_attn_implementation("sdpa_paged")
    config = GenerationConfig(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, eos_token_id=-1,
                              pad_token_id=0)
    model.generate_batch(inputs=job["prompts"]["1"], generation_config=config, progress_bar=False)  # warm-up
    for c, prompts in job["prompts"].items():
        times = []
        for _ in range(job["repeats"]):
            t = time.perf_counter()
            outs = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
            times.append(time.perf_counter() - t)
            if len(outs) != len(prompts) or any(len(o.generated_tokens) != out_len for o in outs.values()):
                raise RuntimeError(f"generate_batch returned {len(outs)} of {len(prompts)} requests (it sizes its "
                                   "paged cache from GPU memory; on CPU its generation thread fails)")
        result["generate_batch"][c] = min(times)
except Exception as exc:
    result["generate_batch"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(result))
"""


def read_bandwidth(repeats: int = 10) -> float:
    """Bytes/s of a sum over 1 GiB, the fastest of `repeats` on 4 KiB pages and on huge pages (the roofline's
    denominator: the highest read rate seen, so that neither a run disturbed by other jobs nor the weights' own
    huge pages, host_memory.place_on_huge_pages, can inflate the share of the roofline)."""
    plain = torch.ones(256 << 20, dtype=torch.float32)
    huge = huge_page_empty((256 << 20,), torch.float32).fill_(1.0)
    plain.sum(), huge.sum()
    times = []
    for x in (plain, huge) * repeats:
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return plain.nbytes / min(times)


def decode_bytes_per_token(model: torch.nn.Module, experts_read: float | None = None) -> int:
    """Weight bytes one decode step reads: all but the embedding table and the experts not routed to. A batch-1 step
    reads top_k experts a layer; a step of several sequences reads `experts_read` (the mean distinct count)."""
    total = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            size = param.numel() * param.element_size()
            if module is model.embed_tokens:
                size = param.shape[1] * param.element_size()  # one row
            elif isinstance(module, SparseMoE):  # the experts' stacks (and FP8 scales); the router is a submodule
                size = round(size * (experts_read or module.top_k) / module.num_experts)
            total += size
    return total


def machine() -> str:
    return f"{describe_machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def run_s1serve(llm: LLM, prompts: list[list[int]], output_len: int, repeats: int) -> tuple[float, list[list[int]]]:
    """Best wall time of `repeats` runs, with the ids generated. The prefix cache is emptied before each run."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    times = []
    for _ in range(repeats):
        llm.engine.blocks.reset_prefix_cache()
        start = time.perf_counter()
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        times.append(time.perf_counter() - start)
        assert all(len(o.token_ids) == output_len for o in outs)
    return min(times), [o.token_ids for o in outs]


def s1serve_decode_step(llm: LLM, prompt: list[int], output_len: int, repeats: int) -> list[tuple[float, float]]:
    """Per run: (median wall time of the engine's batch-1 decode steps, the prefill excluded; the read bandwidth
    measured just before). Pairing each run with its own bandwidth keeps the share of the roofline meaningful on a
    VM whose bandwidth moves with its neighbours."""
    engine = llm.engine
    runs = []
    for run in range(repeats):
        bandwidth = read_bandwidth(5)
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        engine.add_request(f"decode-{run}", prompt, params)
        times = []
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        runs.append((statistics.median(times[1:]), bandwidth))
    return runs


def run_hf(python: str, model: Path, prompts: dict[int, list[list[int]]], output_len: int, repeats: int) -> dict | str:
    job = {
        "model": str(model),
        "prompts": {str(c): p for c, p in prompts.items()},
        "output_len": output_len,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
    }
    try:
        proc = subprocess.run([python, "-c", HF_SCRIPT], input=json.dumps(job), capture_output=True, text=True)
    except OSError as exc:
        return f"could not run {python}: {exc}"
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit status {proc.returncode}"
        return f"transformers failed: {last}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="qwen3_moe checkpoint (written if missing)")
    parser.add_argument("--hf-python", default="/tmp/refvenv/bin/python", help="a Python with transformers")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement; the best counts")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if not (args.model / "config.json").is_file():
        print(f"writing the bench checkpoint (qwen3_moe) to {args.model} ...", flush=True)
        write_tiny_checkpoint(args.model, "bench", seed=0, arch="qwen3_moe")
    rng = random.Random(0)
    prompts = {
        c: [[rng.randrange(1000, 150000) for _ in range(args.input_len)] for _ in range(c)] for c in args.concurrency
    }
    print(f"machine: {machine()}", flush=True)

    llm = LLM(args.model, dtype="bfloat16", skip_tokenizer_init=True)
    run_s1serve(llm, prompts[min(prompts)][:1], 4, 1)  # warm-up
    # Rounds alternate the two sides, so that a slow spell of the machine does not fall on one side only.
    seconds_ours: dict[int, list[float]] = {c: [] for c in prompts}
    seconds_hf: dict[str, dict[int, list[float]]] = {}
    hf_notes: dict[str, str] = {}
    hf_first: dict | None = None
    our_first: list[int] = []
    for round_ in range(args.repeats):
        for c, batch in prompts.items():
            seconds, ids = run_s1serve(llm, batch, args.output_len, 1)
            seconds_ours[c].append(seconds)
            our_first = our_first or ids[0]
            print(f"round {round_ + 1}: s1serve C={c:<3} {c * args.output_len / seconds:8.1f} output tok/s", flush=True)
        if args.skip_hf:
            hf_notes["all"] = "skipped (--skip-hf)"
            continue
        hf = run_hf(args.hf_python, args.model, prompts, args.output_len, 1)
        if isinstance(hf, str):
            hf_notes["all"] = hf
            continue
        hf_first = hf_first or hf
        for api in ("generate", "generate_batch"):
            if isinstance(hf[api], dict):
                for c, sec in hf[api].items():
                    seconds_hf.setdefault(api, {}).setdefault(int(c), []).append(sec)
                print(f"round {round_ + 1}: HF {api} " + ", ".join(
                    f"C={c}: {int(c) * args.output_len / sec:.1f}" for c, sec in hf[api].items()), flush=True)
            else:
                hf_notes[api] = hf[api]
    ours = {c: c * args.output_len / min(times) for c, times in seconds_ours.items()}
    hf_columns = {api: {c: c * args.output_len / min(t) for c, t in per_c.items()} for api, per_c in seconds_hf.items()}
    for api, note in hf_notes.items():
        print(f"transformers {api}: {note}")
    decode_runs = s1serve_decode_step(llm, prompts[min(prompts)][0], args.output_len, args.repeats)
    weight_bytes = decode_bytes_per_token(llm.engine.runner.model)
    del llm
    hf = hf_first

    print()
    print(f"Offline throughput, {args.input_len} in / {args.output_len} out, greedy, bench preset (qwen3_moe, bf16)")
    header = ["concurrent requests", "s1serve tok/s"] + [f"HF `{api}` tok/s" for api in hf_columns]
    header.append("s1serve / best HF")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for c in args.concurrency:
        cells = [str(c), f"{ours[c]:.1f}"] + [f"{hf_columns[api].get(c, float('nan')):.1f}" for api in hf_columns]
        best = max((hf_columns[api].get(c, 0.0) for api in hf_columns), default=0.0)
        cells.append(f"{ours[c] / best:.2f}x" if best else "n/a")
        print("| " + " | ".join(cells) + " |")
    print()
    shares = [weight_bytes / step / bandwidth for step, bandwidth in decode_runs]
    print(f"Batch-1 decode ({weight_bytes / 1e6:.0f} MB of weights per token), per run: " + "; ".join(
        f"{1 / step:.1f} tok/s ({step * 1e3:.1f} ms/step) at {bandwidth / 1e9:.1f} GB/s = {share:.0%} of its roofline"
        for (step, bandwidth), share in zip(decode_runs, shares)))
    print(f"Batch-1 decode: median {statistics.median(shares):.0%} of the roofline"
          + (f"; HF generate {1 / hf['decode_step_s']:.1f} tok/s" if isinstance(hf, dict) else ""))
    if isinstance(hf, dict):
        same = next((i for i, (a, b) in enumerate(zip(our_first, hf["ids"])) if a != b), len(our_first))
        print(f"Greedy ids of the first C=1 prompt: s1serve and HF agree on the first {same} of {args.output_len}")
    print(f"Machine: {machine()}")


if __name__ == "__main__":
    main()
