"""model_type -> model class, and building a model with its weights from a checkpoint folder.

With a ParallelContext, a rank builds only its shard (on the meta device first, so nothing larger is ever
allocated) and reads only its slices of the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from s1serve.checkpoint.loader import VISION_PREFIX, CheckpointReader, load_into
from s1serve.config import ModelConfig, load_model_config
from s1serve.errors import ConfigError
from s1serve.models.interns1_pro import InternS1ProForCausalLM
from s1serve.parallel.context import ParallelContext

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "interns1_pro": InternS1ProForCausalLM,
    "interns1_pro_text": InternS1ProForCausalLM,
    "qwen3_moe": InternS1ProForCausalLM,
}
log = logging.getLogger("s1serve.models")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported (expected one of {', '.join(DTYPES)})")
    return DTYPES[dtype]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(
    config: ModelConfig,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    parallel: ParallelContext = ParallelContext.single(),
) -> nn.Module:
    """An uninitialised model (this rank's shard): built on the meta device, then given (empty) storage on
    `device` unless that is meta."""
    with _default_dtype(resolve_dtype(dtype)), torch.device("meta"):
        model = MODEL_CLASSES[config.model_type](config, parallel)
        if config.quantization is not None:
            model.checkpoint_targets()  # refuses, before any allocation, a shard that cuts through an FP8 block
    if torch.device(device).type != "meta":
        model = model.to_empty(device=device)
    return model.eval()


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    parallel: ParallelContext = ParallelContext.single(),
) -> nn.Module:
    """The model (this rank's shard) with its weights. A config with a vision_config whose checkpoint holds no
    vision tensors (a text-only export) loads text-only: `model.has_vision` is then False."""
    config = load_model_config(model_dir)
    reader = CheckpointReader(model_dir)
    if config.vision is not None and not any(name.startswith(VISION_PREFIX) for name in reader.names()):
        log.warning("%s: config.json has a vision_config but the checkpoint holds no %s* tensors: loading the text "
                    "decoder only (no vision tower; image and video inputs will be refused)", model_dir, VISION_PREFIX)
        config = dataclasses.replace(config, vision=None)
    model = build_model(config, dtype, device, parallel)
    load_into(
        model.checkpoint_targets(), reader, model.checkpoint_names_elsewhere(), model.checkpoint_prefixes_ignored()
    )
    return model
