"""The engine's steps with this tree's CPU kernels against those of another git revision, in one process.

    .venv/bin/python benchmarks/kernel_ab.py --against REV [--prefill 8 16] [--decode 1 32] [--rounds 6]

The other revision's `s1serve/layers/kernels/*.cpp` are built into a scratch folder (about a minute) and loaded beside
this tree's; each round times both, the order flipped every round, by swapping every compiled function the engine
calls (so the Python around them is this tree's). A prefill point is one engine step of N fresh 128-token prompts,
after 20 decode steps of a background request (so the experts are as recently read as in serving); a decode point is
the mean of 30 steps at N running sequences. Prints every round and the median ratio (theirs / ours: above 1, this
tree is faster). Kernel changes that keep results bitwise (prefetching, loop order) are what it is for.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import DEFAULT_MODEL, machine  # noqa: E402

from s1serve import LLM, SamplingParams  # noqa: E402
from s1serve.engine.host_memory import reuse_freed_memory  # noqa: E402
from s1serve.layers import kernels  # noqa: E402

KERNEL_DIR = "s1serve/layers/kernels"


def build_revision(rev: str, scratch: Path) -> ModuleType:
    """The kernels as `rev` has them, compiled as the package compiles its own."""
    from torch.utils.cpp_extension import load

    sources = []
    for source in kernels.SOURCES:
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{KERNEL_DIR}/{source.name}"],
                               capture_output=True, text=True)
        if shown.returncode:  # the Python around the kernels is this tree's: it calls what this tree compiles
            sys.exit(f"{rev} has no {KERNEL_DIR}/{source.name}: compare against a revision with this tree's kernel "
                     "files (git show said: " + shown.stderr.strip() + ")")
        text = shown.stdout
        (scratch / source.name).write_text(text)
        sources.append(str(scratch / source.name))
    module = load(name="s1serve_kernels_" + "".join(c for c in rev if c.isalnum()), sources=sources,
                  build_directory=str(scratch), extra_cflags=kernels.EXTRA_CFLAGS, extra_ldflags=["-fopenmp"])
    module.set_amx(kernels.bf16_kernels().amx())
    return module


def use(target: ModuleType, functions: dict[str, object]) -> None:
    for name, fn in functions.items():
        setattr(target, name, fn)


def prefill_ms(engine, count: int, rng: random.Random, tag: str) -> float:
    for _ in range(20):
        engine.step()
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for i in range(count):
        engine.add_request(f"{tag}-{i}", [rng.randrange(1000, 150000) for _ in range(128)], params)
    start = time.perf_counter()
    engine.step()
    return (time.perf_counter() - start) * 1e3


def decode_ms(engine, steps: int = 30) -> float:
    for _ in range(2):
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="git revision whose kernels to compare with")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--prefill", type=int, nargs="*", default=[8], help="prompts per measured prefill step")
    parser.add_argument("--decode", type=int, nargs="*", default=[1], help="running sequences per decode point")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    reuse_freed_memory()  # as the server does
    ours_module = kernels.bf16_kernels()
    if ours_module is None:
        sys.exit("the CPU kernels do not apply on this machine")
    with tempfile.TemporaryDirectory(prefix="kernel_ab_") as scratch:
        theirs_module = build_revision(args.against, Path(scratch))
        names = [n for n in dir(ours_module) if not n.startswith("_") and n not in ("set_amx", "amx")
                 and hasattr(theirs_module, n)]
        sides = {"ours": {n: getattr(ours_module, n) for n in names},
                 args.against: {n: getattr(theirs_module, n) for n in names}}
        llm = LLM(args.model, dtype="bfloat16", skip_tokenizer_init=True)
        engine = llm.engine
        print(f"machine: {machine()}\nthis tree against {args.against}: {args.rounds} rounds, order flipped each round")
        engine.add_request("background", [5 + j for j in range(64)],
                           SamplingParams(temperature=0, max_tokens=10**6, ignore_eos=True))
        rng = random.Random(0)
        points = [("prefill", n) for n in args.prefill] + [("decode", n) for n in args.decode]
        for kind, n in points:
            if kind == "decode":  # n running sequences: the background one and n - 1 more
                for i in range(n - 1):
                    engine.add_request(f"decode{n}-{i}", [1000 + 7 * i + j for j in range(128)],
                                       SamplingParams(temperature=0, max_tokens=10**6, ignore_eos=True))
                for _ in range(3):
                    engine.step()
            times: dict[str, list[float]] = {side: [] for side in sides}
            for round_ in range(args.rounds):
                order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
                for side in order:
                    use(ours_module, sides[side])
                    ms = prefill_ms(engine, n, rng, f"{side}{round_}") if kind == "prefill" else decode_ms(engine)
                    times[side].append(ms)
            use(ours_module, sides["ours"])
            if kind == "decode":
                for seq_id in [f"decode{n}-{i}" for i in range(n - 1)]:
                    engine.abort(seq_id)
            ratio = statistics.median(t / o for t, o in zip(times[args.against], times["ours"]))
            print(f"\n{kind} {n}: ms per step, rounds in order")
            for side, values in times.items():
                print(f"  {side:<12}" + " ".join(f"{v:7.1f}" for v in values)
                      + f"   median {statistics.median(values):.1f}")
            print(f"  {args.against} / ours, median of the rounds' ratios: {ratio:.3f}x")


if __name__ == "__main__":
    main()
