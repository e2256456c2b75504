"""ParallelConfig: how many ranks, what each one does, and where they meet; with the command-line flags.

Shapes (the guide's two are `--tp 16` and `--dp 16 --ep 16`):
- dp == 1: one engine; the world is max(tp, ep) ranks. tp and ep are each 1 or the whole world. With tp == 1 and
  ep > 1 attention is replicated and only the experts are partitioned.
- dp > 1: one engine per rank (DP attention), tp == 1; ep is 1 (independent replicas) or dp (experts partitioned
  over all ranks, tokens exchanged in every MoE layer).
Ranks are numbered node by node: node k holds ranks [k * per_node, (k + 1) * per_node). Under --tp/--ep node 0
hosts rank 0 (the engine and the server) and the other nodes are --headless; under --dp every node serves its
own DP ranks. The Ray backend (--tp/--ep only) places all workers from node 0's one process.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

BACKENDS = ("mp", "ray")
# Where the ranks meet when --dist-init-addr is not given; LMDeploy's names (the guide's) are read too.
ADDR_ENVS = (("S1SERVE_DP_MASTER_ADDR", "S1SERVE_DP_MASTER_PORT"), ("LMDEPLOY_DP_MASTER_ADDR", "LMDEPLOY_DP_MASTER_PORT"))


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    ep: int = 1
    dp: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # HOST:PORT of rank 0's rendezvous; None: loopback on a free port
    headless: bool = False  # this node runs workers only (no API server)
    distributed_executor_backend: str = "mp"

    def __post_init__(self) -> None:
        for name in ("tp", "ep", "dp", "nnodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{name} must be an integer >= 1, got {value!r}")
        if self.dp > 1:
            if self.tp != 1:
                raise ValueError(f"--dp {self.dp} with --tp {self.tp} is not supported yet: use --tp 1 with --dp")
            if self.ep not in (1, self.dp):
                raise ValueError(f"with --dp {self.dp}, --ep must be 1 or {self.dp}, got {self.ep}")
        else:
            for name in ("tp", "ep"):
                if getattr(self, name) not in (1, self.world_size):
                    raise ValueError(
                        f"--{name} {getattr(self, name)} must be 1 or the world size {self.world_size} "
                        f"(= max(--tp, --ep) without --dp)"
                    )
        if self.world_size % self.nnodes:
            raise ValueError(f"{self.world_size} ranks cannot be spread evenly over --nnodes {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in 0..{self.nnodes - 1}, got {self.node_rank}")
        if self.nnodes > 1 and not self.address:
            raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT (or S1SERVE_DP_MASTER_ADDR/_PORT)")
        if self.address and (":" not in self.address or not self.address.rsplit(":", 1)[1].isdigit()):
            raise ValueError(f"--dist-init-addr must be HOST:PORT, got {self.address!r}")
        if self.distributed_executor_backend not in BACKENDS:
            raise ValueError(
                f"--distributed-executor-backend must be one of {', '.join(BACKENDS)}, "
                f"got {self.distributed_executor_backend!r}"
            )
        if self.headless and self.node_rank == 0:
            raise ValueError("--headless is for nodes other than --node-rank 0, which hosts the API server")
        if self.headless and self.dp > 1:
            raise ValueError("--headless is for --tp/--ep; under --dp every node serves its own DP ranks")
        if self.dp == 1 and self.node_rank > 0 and not self.headless:
            raise ValueError(
                f"--node-rank {self.node_rank} runs workers of rank 0's engine: add --headless "
                "(node 0 hosts the server)"
            )
        if self.distributed_executor_backend == "ray" and (self.dp > 1 or self.nnodes > 1):
            raise ValueError(
                "--distributed-executor-backend ray places every worker from one process: "
                "use it with --tp/--ep and --nnodes 1 (not with --dp)"
            )

    @property
    def world_size(self) -> int:
        return self.dp if self.dp > 1 else max(self.tp, self.ep)

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    @property
    def local_ranks(self) -> range:
        """Global ranks of the processes this node runs."""
        return range(self.node_rank * self.ranks_per_node, (self.node_rank + 1) * self.ranks_per_node)

    @property
    def address(self) -> str | None:
        """--dist-init-addr, else S1SERVE_DP_MASTER_ADDR:S1SERVE_DP_MASTER_PORT when both are set, else the same
        from LMDEPLOY_DP_MASTER_ADDR/_PORT."""
        if self.dist_init_addr:
            return self.dist_init_addr
        for names in ADDR_ENVS:
            host, port = (os.environ.get(name) for name in names)
            if host and port:
                return f"{host}:{port}"
        return None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "ParallelConfig":
        return cls(
            tp=args.tp,
            ep=args.ep,
            dp=args.dp,
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            dist_init_addr=args.dist_init_addr,
            headless=args.headless,
            distributed_executor_backend=args.distributed_executor_backend,
        )


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallelism")
    group.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (attention heads, vocabulary)")
    group.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (experts partitioned)")
    group.add_argument("--dp", type=int, default=1, help="data-parallel ranks, each with its own engine and server")
    group.add_argument("--nnodes", type=int, default=1, help="nodes taking part")
    group.add_argument("--node-rank", type=int, default=0, help="this node's index (0 hosts the API server)")
    group.add_argument(
        "--dist-init-addr", default=None,
        help="HOST:PORT where the ranks meet (default: S1SERVE_DP_MASTER_ADDR/_PORT or LMDEPLOY_DP_MASTER_ADDR/_PORT, "
             "else a free loopback port)",
    )
    group.add_argument("--headless", action="store_true", help="run this node's workers only, no API server")
    group.add_argument(
        "--distributed-executor-backend", choices=BACKENDS, default="mp",
        help="start workers as local processes (mp) or as actors on a running Ray cluster (ray)",
    )
