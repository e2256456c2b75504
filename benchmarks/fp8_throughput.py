"""Offline throughput of an FP8 checkpoint against the same weights in BF16, side by side in one run.

    .venv/bin/python benchmarks/fp8_throughput.py [--vocab-size N] [--concurrency 1 8 64] [--repeats 3]

The BF16 side is `make-tiny --preset bench --arch qwen3_moe` (what benchmarks/throughput.py runs), the FP8 side
that checkpoint after `s1serve quantize`. The BF16 side then loads the FP8 checkpoint's dequantised weights, so
both sides compute with identical values (and give identical greedy ids, which the script checks). Everything
runs in bfloat16 activations: the FP8 side through the W8A16 kernel, the BF16 side through the bf16 kernel.

For each concurrency C, C requests of --input-len random prompt ids generate exactly --output-len ids (greedy,
eos ignored), submitted at once; output tokens/s = C * output-len / wall time (prefill included), the best of
--repeats rounds; rounds alternate FP8 and BF16. Batch-1 decode: the median step time of --repeats runs per
side, alternating, each paired with the read bandwidth measured just before it (benchmarks/throughput.py).

--vocab-size: the bench preset's lm_head (155008 x 1024, BF16 in both checkpoints: the published model does not
quantise it) is 62% of the bytes a batch-1 decode step reads, which caps what FP8 can gain there at ~1.2x. In the
published model the lm_head is ~3% of a token's bytes; a smaller vocabulary (prompts are ids, no tokenizer is
loaded) shows the decoder-dominated case.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from throughput import decode_bytes_per_token, machine, run_s1serve, s1serve_decode_step  # noqa: E402

from s1serve import LLM  # noqa: E402
from s1serve.checkpoint import fp8  # noqa: E402
from s1serve.checkpoint.tiny import write_tiny_checkpoint  # noqa: E402

CACHE = Path(os.environ.get("S1SERVE_CACHE", Path.home() / ".cache" / "s1serve"))


def bench_checkpoints(vocab_size: int | None) -> tuple[Path, Path]:
    """(FP8 checkpoint, BF16 checkpoint of its dequantised weights), written on first use."""
    tag = f"bench-qwen3_moe-seed0{f'-vocab{vocab_size}' if vocab_size else ''}"
    source, fp8_dir, twin = CACHE / tag, CACHE / f"{tag}-fp8", CACHE / f"{tag}-fp8-dequantized"
    if not (source / "config.json").is_file():
        write_tiny_checkpoint(source, "bench", seed=0, arch="qwen3_moe")
        if vocab_size:
            _shrink_vocabulary(source, vocab_size)
    if not (fp8_dir / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "s1serve", "quantize", str(source), str(fp8_dir)], check=True)
    if not (twin / "config.json").is_file():
        _write_dequantized(fp8_dir, twin)
    return fp8_dir, twin


def _shrink_vocabulary(folder: Path, vocab_size: int) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = vocab_size
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            tensors = {n: f.get_tensor(n) for n in f.keys()}
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in tensors:
                tensors[name] = tensors[name][:vocab_size].clone()
        save_file(tensors, str(path), metadata={"format": "pt"})
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    index_path.write_text(json.dumps(index, indent=2))


def _write_dequantized(fp8_dir: Path, out: Path) -> None:
    shutil.copytree(fp8_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    weight_map = {}
    for path in sorted(fp8_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names = [n for n in f.keys() if not n.endswith(fp8.SCALE_SUFFIX)]
            tensors = {}
            for name in names:
                tensor = f.get_tensor(name)
                if tensor.dtype == fp8.FP8_DTYPE:
                    scale = f.get_tensor(fp8.scale_name(name))
                    tensor = fp8.dequantize(tensor, scale[None], torch.bfloat16)
                tensors[name] = tensor
        save_file(tensors, str(out / path.name), metadata={"format": "pt"})
        weight_map.update({n: path.name for n in names})
    index = {"metadata": {"total_size": sum(t.stat().st_size for t in out.glob("*.safetensors"))},
             "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=None, help="shrink the vocabulary (default: 155008)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best counts")
    args = parser.parse_args()

    fp8_dir, bf16_dir = bench_checkpoints(args.vocab_size)
    vocab = args.vocab_size or 155008
    rng = random.Random(0)
    prompts = {c: [[rng.randrange(100, vocab) for _ in range(args.input_len)] for _ in range(c)]
               for c in args.concurrency}
    print(f"machine: {machine()}", flush=True)
    sides = {name: LLM(path, dtype="bfloat16", skip_tokenizer_init=True)
             for name, path in (("FP8", fp8_dir), ("BF16", bf16_dir))}
    for llm in sides.values():
        run_s1serve(llm, prompts[min(prompts)][:1], 4, 1)  # warm-up

    seconds: dict[str, dict[int, list[float]]] = {name: {c: [] for c in prompts} for name in sides}
    first_ids: dict[str, list[int]] = {}
    for round_ in range(args.repeats):
        for c, batch in prompts.items():
            for name, llm in sides.items():
                elapsed, ids = run_s1serve(llm, batch, args.output_len, 1)
                seconds[name][c].append(elapsed)
                first_ids.setdefault(name, ids[0])
                print(f"round {round_ + 1}: {name:4} C={c:<3} {c * args.output_len / elapsed:8.1f} tok/s", flush=True)
    decode: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, llm in sides.items():
            decode[name] += s1serve_decode_step(llm, prompts[min(prompts)][0], args.output_len, 1)
    weight_bytes = {name: decode_bytes_per_token(llm.engine.runner.model) for name, llm in sides.items()}

    print()
    print(f"Offline throughput, {args.input_len} in / {args.output_len} out, greedy, bench preset (qwen3_moe), "
          f"vocabulary {vocab}, bf16 activations; best of {args.repeats} alternating rounds")
    print("| concurrent requests | BF16 tok/s | FP8 tok/s | FP8 / BF16 |")
    print("|---|---|---|---|")
    for c in args.concurrency:
        bf16, fp8_rate = (c * args.output_len / min(seconds[n][c]) for n in ("BF16", "FP8"))
        print(f"| {c} | {bf16:.1f} | {fp8_rate:.1f} | {fp8_rate / bf16:.2f}x |")
    print()
    for name in ("BF16", "FP8"):
        print(f"Batch-1 decode, {name} ({weight_bytes[name] / 1e6:.0f} MB of weights per token), per run: " + "; ".join(
            f"{step * 1e3:.2f} ms/step ({1 / step:.1f} tok/s) at {bw / 1e9:.1f} GB/s = "
            f"{weight_bytes[name] / step / bw:.0%} of its roofline" for step, bw in decode[name]))
    medians = {name: statistics.median(step for step, _ in decode[name]) for name in sides}
    print(f"Batch-1 decode medians: BF16 {medians['BF16'] * 1e3:.2f} ms/step, FP8 {medians['FP8'] * 1e3:.2f} ms/step: "
          f"FP8 {medians['BF16'] / medians['FP8']:.2f}x BF16's tokens/s "
          f"(bytes per token {weight_bytes['BF16'] / weight_bytes['FP8']:.2f}x fewer)")
    print(f"Greedy ids of the first prompt identical: {first_ids['FP8'] == first_ids['BF16']}")
    print(f"Machine: {machine()}")


if __name__ == "__main__":
    main()
