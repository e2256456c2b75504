"""Peak resident memory per rank: under ep=2 each rank holds, and reads, half of the experts, so the peak that
loading reaches on each rank is lower than one process's (tp=1) by half of what the experts cost tp=1.

The checkpoint has 256 experts of intermediate size 512 in each of its 2 layers (96 MiB of bf16 experts, 38 MiB of
embeddings and the rest), loaded in bf16 so that memory is what the checkpoint holds. Each configuration loads in
a fresh process; a report holds the resident memory before loading and the kernel's high-water mark (VmHWM) after.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from s1serve.checkpoint.tiny import PRESETS, write_tiny_checkpoint

EXPERTS_PRESET = dict(
    text=dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        intermediate_size=128, moe_intermediate_size=512, num_experts=256, num_experts_per_tok=8, router_n_groups=8,
    ),
    vision=PRESETS["tiny"]["vision"],
    shard_bytes=48 << 20,
)
MIB = 1 << 20

# tp=1 in a process like each rank of ep=2: rank 0 is the engine's process (its imports came first: the engine's
# pull in torch's symbolic-shape machinery, ~35 MiB, which a fresh process only loads while building the model),
# rank 1 a fresh worker process.
LOAD_TP1 = """
import json, sys
like_engine = sys.argv[2] == "engine"
if like_engine:
    import s1serve.engine.engine
import torch
from s1serve.distributed.worker import LoadReport, current_rss, expert_bytes, peak_rss
from s1serve.models.registry import load_model

before = current_rss()
model = load_model(sys.argv[1], torch.bfloat16, "cpu")
params = sum(p.nbytes for p in model.parameters())
print(json.dumps(LoadReport(0, params, expert_bytes(model), before, peak_rss()).__dict__))
"""
LOAD_EP2 = """
import json, sys
from s1serve.engine.config import EngineConfig
from s1serve.entrypoints.engine import build_engine
from s1serve.parallel.config import ParallelConfig

engine = build_engine(sys.argv[1], "bfloat16", "cpu", EngineConfig(num_kv_blocks=4),
                     parallel=ParallelConfig(ep=2))
engine.shutdown()
print(json.dumps([r.__dict__ for r in engine.runner.reports]))
"""


@pytest.fixture(scope="module")
def experts_checkpoint(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(PRESETS, "experts", EXPERTS_PRESET)
        return write_tiny_checkpoint(tmp_path_factory.mktemp("experts_ckpt"), "experts", seed=0)


def run(script: str, *args: str):
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def growth(report: dict) -> int:
    return report["peak_rss_after"] - report["rss_before"]


def test_ep2_ranks_hold_half_the_experts_and_their_load_peaks_drop_by_half_the_expert_footprint(experts_checkpoint):
    ranks = run(LOAD_EP2, str(experts_checkpoint))
    baselines = [run(LOAD_TP1, str(experts_checkpoint), kind) for kind in ("engine", "fresh")]
    experts = baselines[0]["expert_bytes"]
    print(f"\n{'':>14} {'experts MiB':>12} {'weights MiB':>12} {'RSS before':>11} {'peak after':>11} {'load peak':>10}")
    rows = [("tp=1 engine", baselines[0]), ("tp=1 fresh", baselines[1])]
    rows += [(f"ep=2 rank {r['rank']}", r) for r in ranks]
    for name, r in rows:
        print(f"{name:>14} {r['expert_bytes'] / MIB:12.1f} {r['param_bytes'] / MIB:12.1f} "
              f"{r['rss_before'] / MIB:11.1f} {r['peak_rss_after'] / MIB:11.1f} {growth(r) / MIB:10.1f}")
    assert experts > 90 * MIB
    for r, baseline in zip(ranks, baselines):
        assert r["expert_bytes"] * 2 == experts
        assert r["param_bytes"] == baseline["param_bytes"] - experts // 2
        # Loading costs about two bytes of peak RSS per byte of weights (the parameter and the checkpoint's mapped
        # page), so tp=1's experts take about 2 * experts at the peak; a rank of ep=2 should take half of that.
        saved = growth(baseline) - growth(r)
        print(f"ep=2 rank {r['rank']}: load peak {saved / MIB:.1f} MiB below tp=1's, whose experts took about "
              f"{2 * experts / MIB:.0f} MiB: the rank's expert part is {1 - saved / (2 * experts):.2f} of tp=1's")
        assert 0.4 < 1 - saved / (2 * experts) < 0.6
