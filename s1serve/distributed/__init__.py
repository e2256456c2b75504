"""Parallelism across processes and nodes: TP and EP under one engine, DP ranks each with their own.

- groups.py: joining the torch.distributed world (gloo on CPU, NCCL on CUDA, a gloo control group).
- worker.py: what every rank runs to start (load its shard, agree on the KV cache) and a follower's step loop.
- executor.py: create_runner: a ModelRunner, a DistributedRunner (rank 0 of TP/EP, broadcasting each step) or a
  LockstepRunner (a DP rank whose MoE layers exchange tokens with the others).
- launcher.py: this node's rank processes, their supervision, --headless nodes and the DP servers.
- ray_executor.py: followers as Ray actors (--distributed-executor-backend ray).
- spawned.py: the entry point of processes the launcher starts.
"""
