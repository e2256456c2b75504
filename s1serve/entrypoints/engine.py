"""An Engine for a checkpoint: the runner its ParallelConfig asks for, handed to the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from s1serve.config import load_generation_defaults
from s1serve.distributed.executor import create_runner
from s1serve.engine.config import EngineConfig
from s1serve.engine.engine import Engine
from s1serve.parallel.config import ParallelConfig


def build_engine(
    model: str | Path,
    dtype: str = "auto",
    device: str = "cpu",
    config: EngineConfig | None = None,
    tokenizer: Any | None = None,
    parallel: ParallelConfig = ParallelConfig(),
    rank: int = 0,
) -> Engine:
    """Loads the checkpoint; under `parallel` this is global rank `rank` (0, or a DP rank) and starts or joins the
    other ranks (see s1serve.distributed.executor)."""
    config = config or EngineConfig()
    model_dir = Path(model)
    runner = create_runner(model_dir, dtype, device, config, parallel, rank)
    try:
        return Engine(runner, config, load_generation_defaults(model_dir), tokenizer)
    except BaseException:
        runner.shutdown()
        raise
