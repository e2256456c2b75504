"""Fused expert tensors presented as the per-expert tensors the model loads.

LMDeploy and vLLM accept Intern-S1-Pro experts stored fused per layer, as the Qwen3-VL-MoE family writes them:
`...mlp.experts.gate_up_proj` (gate rows/columns, then up) and `...mlp.experts.down_proj`. Rather than teach the
model a second layout, the reader serves the per-expert names `...mlp.experts.{j}.{gate,up,down}_proj.weight`
(nn.Linear orientation: [I, H], [I, H], [H, I]) as slices of the fused tensors. Two orientations are in the wild:
- nn.Linear, as transformers 5 writes it (its modules hold it): gate_up [E, 2I, H], down [E, H, I];
- x @ W, as transformers 4 wrote it (the published Qwen3-VL-MoE checkpoints): gate_up [E, H, 2I], down [E, I, H].
They are told apart by the pair of shapes, never by gate_up alone (with H == 2I its two readings have the same
shape); the pair is never ambiguous: both readings fitting would need I == 0.
FP8 (`<fused>_scale_inv`, one float32 scale per 128x128 block of the stored orientation's last two dims, ceil
division) yields per-expert `weight_scale_inv` too, its blocks transposed when the weight is. Splitting gate from
up inside one scale block is impossible, so FP8 gate_up needs I % 128 == 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from s1serve.errors import CheckpointError

GATE_UP = "experts.gate_up_proj"
DOWN = "experts.down_proj"
SCALE = "_scale_inv"
BLOCK = 128
FUSED_SUFFIXES = tuple("." + name + s for name in (GATE_UP, DOWN) for s in ("", SCALE))


def is_fused(name: str) -> bool:
    """A fused expert tensor (or its FP8 scales): the reader presents these as per-expert tensors."""
    return name.endswith(FUSED_SUFFIXES)


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


@dataclass(frozen=True)
class ExpertSlice:
    """One per-expert tensor: `source[expert][rows, cols]`, transposed when `transposed`."""

    source: str
    expert: int
    rows: range
    cols: range
    transposed: bool

    @property
    def shape(self) -> tuple[int, int]:
        shape = (len(self.rows), len(self.cols))
        return shape[::-1] if self.transposed else shape

    def read(self, fused: Any, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """This tensor, or its part [start, stop) along dim, reading only that part of `fused` (a safetensors
        slice of `source`)."""
        rows, cols = self.rows, self.cols
        if dim is not None:
            if (dim == 1) != self.transposed:
                cols = cols[start:stop]
            else:
                rows = rows[start:stop]
        tensor = fused[self.expert : self.expert + 1, rows.start : rows.stop, cols.start : cols.stop][0]
        return tensor.t().contiguous() if self.transposed else tensor


def virtual_experts(shapes: dict[str, tuple[int, ...]]) -> dict[str, ExpertSlice]:
    """Per-expert name -> its slice, for the fused tensors `shapes` holds (name -> shape; `is_fused` names)."""
    for name in shapes:
        if name.endswith(SCALE) and name[: -len(SCALE)] not in shapes:
            raise CheckpointError(f"tensor '{name}' has no '{name[: -len(SCALE)]}' beside it")
    bases = {n[: -len(fused)] for n in shapes for fused in (GATE_UP, DOWN) if n.endswith("." + fused)}
    out: dict[str, ExpertSlice] = {}
    for base in sorted(bases):
        gate_up, down = base + GATE_UP, base + DOWN
        if gate_up not in shapes or down not in shapes:
            have, lack = (gate_up, down) if gate_up in shapes else (down, gate_up)
            raise CheckpointError(f"tensor '{have}' has no '{lack}' beside it")
        out.update(_layer(base, shapes))
    return out


def _layer(base: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, ExpertSlice]:
    gate_up, down = base + GATE_UP, base + DOWN
    gu, dn = shapes[gate_up], shapes[down]
    if len(gu) == 3 and len(dn) == 3 and gu[0] == dn[0] and gu[1] == 2 * dn[2] and gu[2] == dn[1]:
        transposed, (experts, hidden, inter) = False, dn
    elif len(gu) == 3 and len(dn) == 3 and gu[0] == dn[0] and gu[2] == 2 * dn[1] and gu[1] == dn[2]:
        transposed, (experts, inter, hidden) = True, dn
    else:
        raise CheckpointError(
            f"tensors '{gate_up}' {list(gu)} and '{down}' {list(dn)}: expected [E, 2*I, H] with [E, H, I] "
            "(nn.Linear orientation) or [E, H, 2*I] with [E, I, H]"
        )
    # (rows, cols) of each projection inside one expert's [out, in] matrix; stored swapped when transposed.
    parts = {
        "gate": (range(inter), range(hidden)),
        "up": (range(inter, 2 * inter), range(hidden)),
        "down": (range(hidden), range(inter)),
    }
    out: dict[str, ExpertSlice] = {}
    for fused, projs in ((gate_up, ("gate", "up")), (down, ("down",))):
        for proj in projs:
            rows, cols = parts[proj]
            for j in range(experts):
                out[f"{base}experts.{j}.{proj}_proj.weight"] = _slice(fused, j, rows, cols, transposed)
        scale = fused + SCALE
        if scale not in shapes:
            continue
        stored = shapes[fused]
        expected = (experts, _blocks(stored[1]), _blocks(stored[2]))
        if shapes[scale] != expected:
            raise CheckpointError(
                f"tensor '{scale}' has shape {list(shapes[scale])}, expected {list(expected)} "
                f"(128x128 blocks of {list(stored)})"
            )
        if fused == gate_up and inter % BLOCK:
            raise CheckpointError(
                f"tensor '{scale}': FP8 fused gate_up needs the expert width I % {BLOCK} == 0 to split gate from up "
                f"into whole scale blocks; I = {inter}"
            )
        for proj in projs:
            rows, cols = (range(r.start // BLOCK, _blocks(r.stop)) for r in parts[proj])
            for j in range(experts):
                out[f"{base}experts.{j}.{proj}_proj.weight_scale_inv"] = _slice(scale, j, rows, cols, transposed)
    return out


def _slice(source: str, expert: int, rows: range, cols: range, transposed: bool) -> ExpertSlice:
    """(rows, cols) given in nn.Linear orientation; swapped into the stored one."""
    return ExpertSlice(source, expert, *((cols, rows) if transposed else (rows, cols)), transposed)
