"""DP attention + EP: one MoE layer's token exchange by all-gather + reduce-scatter against all_to_all, side by side.

    .venv/bin/python benchmarks/ep_dispatch.py [--tokens 1 8 64 256 1024] [--repeats 20] [--dtype bfloat16]

Two gloo processes on loopback (ep = dp = 2), one thread each, run one SparseMoE layer with the bench preset's
dims (hidden 1024, 64 experts, top 8 in 8 groups, expert FFN 384) and random weights, each rank bringing the
same number of tokens. Times are per layer call, the median of --repeats, the slower rank's:
- all-gather: what s1serve runs (layers/moe.py). Every rank's rows, padded to the largest token count (which
  the model exchanges once per forward for all its layers, so not timed here), are all-gathered with their
  routing packed in; each rank computes its experts for all rows, and a reduce-scatter returns the sums.
- all_to_all: each (token, expert) pair goes only to the rank owning the expert: the per-destination pair counts
  are exchanged (all_to_all_single), then the pairs' rows (with their expert ids), the expert outputs come back
  by a second all_to_all_single and are combined with the routing weights locally.
Both compute the same (token, expert) pairs; the outputs are checked equal before timing.

Measured on the development machine (2 CPU cores shared with other jobs, load average 4-5; torch 2.13 CPU, gloo,
bfloat16), ms per layer call, one run:

    tokens/rank   all-gather   all_to_all   all_to_all / all-gather
              1         4.46         4.32                      0.97
              8        11.75        11.58                      0.98
             64        15.94        19.67                      1.23
            256        50.29        53.21                      1.06
           1024       155.41       201.06                      1.29

Over four runs (two of them also timing a count exchange in every all-gather call) the ratio was 0.85-1.04 at
1 and 8 tokens (a tie within this machine's noise: the time is the experts' matmuls and collective latency, the
same for both) and 1.06-1.37 from 64 tokens up, in favour of all-gather. With top-8 routing in 8 groups over 2
ranks every token has exactly 4 pairs on each rank, so all_to_all sends 4 copies of a row to the other rank (and
4 results back) where all-gather sends one (and one back), and it needs a per-layer count exchange besides.
All-gather + reduce-scatter is the implementation. At ep = 16 the balance shifts (all-gather moves 15 rows per
token, all_to_all about 8 * 15/16): measure again there, on NCCL.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from s1serve.checkpoint.tiny import PRESETS  # noqa: E402
from s1serve.config import TextConfig  # noqa: E402
from s1serve.layers.kernels import grouped_linear  # noqa: E402
from s1serve.layers.moe import SparseMoE, exchange_token_counts, select_experts  # noqa: E402
from s1serve.parallel.context import ParallelContext  # noqa: E402

WORLD = 2


def bench_config() -> TextConfig:
    dims = PRESETS["bench"]["text"]
    return TextConfig(
        vocab_size=1, hidden_size=dims["hidden_size"], num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, head_dim=1, intermediate_size=1, moe_intermediate_size=dims["moe_intermediate_size"],
        num_experts=dims["num_experts"], num_experts_per_tok=dims["num_experts_per_tok"],
        router_n_groups=dims["router_n_groups"], norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=(),
        rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=1, fope=None, hidden_act="silu",
        attention_bias=False, dtype="bfloat16",
    )


def all_gather_layer(moe: SparseMoE, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    return moe(x, counts)


def all_to_all_layer(moe: SparseMoE, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The alternative: pairs sent only to their expert's rank, outputs sent back and combined here (`counts`
    is unused: the per-destination pair counts are exchanged in every layer instead)."""
    group, size = moe.ctx.ep_group, moe.ctx.ep_size
    ids, weights = select_experts(moe.gate(x), moe.top_k, moe.num_groups, moe.renormalize)
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)  # by expert, hence by destination rank
    send_counts = torch.bincount(flat // len(moe.experts), minlength=size)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_sizes, recv_sizes = send_counts.tolist(), recv_counts.tolist()
    width = x.shape[1]
    send = torch.cat([x[order // moe.top_k], flat[order, None].to(x.dtype)], dim=1)  # expert ids < 256: exact
    recv = x.new_empty(sum(recv_sizes), width + 1)
    dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=group)
    local_ids = recv[:, width].long() - moe.experts.start
    by_expert = torch.argsort(local_ids, stable=True)
    ends = torch.cumsum(torch.bincount(local_ids, minlength=len(moe.experts)), 0)
    hidden = grouped_linear(recv[by_expert, :width], moe.w13, ends)
    hidden = F.silu(hidden[:, : moe.intermediate]) * hidden[:, moe.intermediate :]
    out = torch.empty_like(recv[:, :width])
    out[by_expert] = grouped_linear(hidden, moe.w2, ends)
    back = x.new_empty(order.shape[0], width)
    dist.all_to_all_single(back, out, send_sizes, recv_sizes, group=group)
    back = back * weights.flatten()[order].to(x.dtype)[:, None]
    return torch.zeros_like(x).index_add_(0, order // moe.top_k, back)


def timed(fns: list, *args, repeats: int) -> list[float]:
    """Median seconds of each fn(*args) over repeats (the fns interleaved, so that they share the machine's
    moods), the slower rank's."""
    for fn in fns:
        fn(*args)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            dist.barrier()
            start = time.perf_counter()
            fn(*args)
            fn_times.append(time.perf_counter() - start)
    medians = torch.tensor([statistics.median(t) for t in times], dtype=torch.float64)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    return medians.tolist()


def worker(rank: int, port: int, tokens: list[int], repeats: int, dtype: torch.dtype) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    ctx = ParallelContext(ep_rank=rank, ep_size=WORLD, ep_group=dist.group.WORLD, tokens_replicated=False)
    torch.manual_seed(0)  # the same router and experts on both ranks; each keeps its own experts' slice
    cfg = bench_config()
    with torch.device("meta"):
        moe = SparseMoE(cfg, ctx)
    moe = moe.to_empty(device="cpu").to(dtype)
    full_w13 = torch.randn(cfg.num_experts, *moe.w13.shape[1:]) / cfg.hidden_size**0.5
    full_w2 = torch.randn(cfg.num_experts, *moe.w2.shape[1:]) / cfg.moe_intermediate_size**0.5
    with torch.no_grad():
        moe.gate.weight.copy_(torch.randn(cfg.num_experts, cfg.hidden_size) * 3 / cfg.hidden_size**0.5)
        moe.w13.copy_(full_w13[moe.experts.start : moe.experts.stop])
        moe.w2.copy_(full_w2[moe.experts.start : moe.experts.stop])
    if rank == 0:
        print(f"{'tokens/rank':>11}  {'all-gather':>10}  {'all_to_all':>10}  {'all_to_all / all-gather':>23}")
    for n in tokens:
        x = torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(rank)).to(dtype)
        counts = exchange_token_counts(n, ctx, x.device)  # once per forward in the model, shared by its layers
        with torch.inference_mode():
            torch.testing.assert_close(
                all_to_all_layer(moe, x, counts), all_gather_layer(moe, x, counts), rtol=2e-2, atol=2e-2
            )
            gathered, to_all = timed([all_gather_layer, all_to_all_layer], moe, x, counts, repeats=repeats)
        if rank == 0:
            print(f"{n:>11}  {gathered * 1e3:>10.2f}  {to_all * 1e3:>10.2f}  {to_all / gathered:>23.2f}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        worker, args=(port, args.tokens, args.repeats, getattr(torch, args.dtype)), nprocs=WORLD, start_method="spawn"
    )


if __name__ == "__main__":
    main()
