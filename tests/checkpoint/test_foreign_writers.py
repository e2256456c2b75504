"""Checkpoints as the libraries that publish models write them, not as s1serve does.

Every other test loads checkpoints s1serve's make-tiny wrote, which is how a single `model.safetensors` without an
index went unnoticed as unloadable. Here the golden tiny checkpoint's tensors are written back out by
huggingface_hub's `save_torch_state_dict` (what transformers' `save_pretrained` calls): as one file, as small shards
with the writer's own names, and with experts fused as transformers' Qwen3-VL-MoE module holds and saves them. Each
must reproduce the authors' golden greedy ids (tests/fixtures/model/). The FP8 fused layout is checked on a small
hand-written file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file, save_file

from s1serve.checkpoint.loader import CheckpointReader, load_into
from s1serve.config import load_model_config
from s1serve.errors import CheckpointError
from s1serve.models.registry import build_model
from s1serve.parallel.context import ParallelContext

GOLDEN = json.loads((Path(__file__).resolve().parents[1] / "fixtures/model/golden_tiny_seed0.json").read_text())
PREFIX = "model.language_model."


@pytest.fixture(scope="module")
def golden_tensors(tiny_checkpoint: Path, tiny_checkpoint_spec: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the tiny checkpoint the goldens were made on (tests/models/test_golden.py checks its
    digests)."""
    assert tiny_checkpoint_spec == {k: GOLDEN[k] for k in ("preset", "seed", "arch")}
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index.values())):
        tensors.update(load_file(str(tiny_checkpoint / shard)))
    return tensors


def _write(tiny_checkpoint: Path, out: Path, tensors: dict[str, torch.Tensor], **save_kwargs) -> Path:
    """tiny_checkpoint's side files (config, tokenizer, templates) and `tensors` as huggingface_hub saves them."""
    shutil.copytree(tiny_checkpoint, out, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"),
                    dirs_exist_ok=True)
    save_torch_state_dict(tensors, out, **save_kwargs)
    return out


def _assert_golden_greedy_ids(checkpoint: Path) -> None:
    from s1serve import LLM, SamplingParams

    llm = LLM(model=str(checkpoint), dtype="float32", device="cpu")
    prompts = GOLDEN["prompts"]
    outs = llm.generate(
        prompt_token_ids=[p["prompt_ids"] for p in prompts],
        sampling_params=SamplingParams(temperature=0, max_tokens=GOLDEN["new_tokens"]),
        use_tqdm=False,
    )
    for p, out in zip(prompts, outs, strict=True):
        assert list(out.token_ids) == p["greedy_ids"], f"{p['name']}: greedy ids differ from the authors'"


def test_single_file_without_index_reproduces_golden(tiny_checkpoint, golden_tensors, tmp_path_factory):
    out = _write(tiny_checkpoint, tmp_path_factory.mktemp("single"), golden_tensors)
    assert sorted(p.name for p in out.glob("*.safetensors*")) == ["model.safetensors"]
    _assert_golden_greedy_ids(out)


def test_small_shards_with_their_own_names_reproduce_golden(tiny_checkpoint, golden_tensors, tmp_path_factory):
    out = _write(
        tiny_checkpoint, tmp_path_factory.mktemp("sharded"), golden_tensors,
        filename_pattern="interns1-pro{suffix}.safetensors", max_shard_size="100KB",
    )
    assert (out / "interns1-pro.safetensors.index.json").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("interns1-pro-*-of-*.safetensors"))) >= 4
    _assert_golden_greedy_ids(out)


def test_single_file_of_its_own_name_is_found(tmp_path):
    save_torch_state_dict({"a": torch.ones(2)}, tmp_path, filename_pattern="weights{suffix}.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]
    assert list(CheckpointReader(tmp_path).names()) == ["a"]


def _experts_of(tensors: dict[str, torch.Tensor], layer: int, num_experts: int) -> list[dict[str, torch.Tensor]]:
    return [
        {proj: tensors[f"{PREFIX}layers.{layer}.mlp.experts.{j}.{proj}_proj.weight"] for proj in ("gate", "up", "down")}
        for j in range(num_experts)
    ]


@pytest.fixture(scope="module")
def transformers_fused(tiny_checkpoint, golden_tensors, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The golden experts, fused by transformers: stacked into a Qwen3-VL-MoE text model's `experts` modules in
    the orientation those modules hold (checked by running them), then `save_pretrained` by transformers. Only the
    experts are taken from it (FoPE and grouped routing are Intern-S1-Pro's own). Name -> tensor as saved, under
    the published prefix."""
    from transformers import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextModel

    text = json.loads((tiny_checkpoint / "config.json").read_text())["text_config"]
    dims = ("hidden_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "hidden_act")
    config = Qwen3VLMoeTextConfig(**{k: text[k] for k in dims}, vocab_size=8, decoder_sparse_step=1, mlp_only_layers=[])
    model = Qwen3VLMoeTextModel(config).float()
    hidden, inter, num_experts = text["hidden_size"], text["moe_intermediate_size"], text["num_experts"]
    x = torch.randn(5, hidden, generator=torch.Generator().manual_seed(0))
    for i, layer in enumerate(model.layers):
        experts = layer.mlp.experts
        ours = _experts_of(golden_tensors, i, num_experts)
        # The module's own shapes say its orientation: down_proj [E, H, I] is nn.Linear's, [E, I, H] x @ W's.
        linear = tuple(experts.down_proj.shape) == (num_experts, hidden, inter)
        assert linear or tuple(experts.down_proj.shape) == (num_experts, inter, hidden)
        with torch.no_grad():
            for j, w in enumerate(ours):
                gate_up, down = torch.cat([w["gate"], w["up"]]).float(), w["down"].float()
                experts.gate_up_proj[j] = gate_up if linear else gate_up.t()
                experts.down_proj[j] = down if linear else down.t()
            for j in (0, num_experts - 1):  # the module computes our expert j: down(silu(gate x) * up x)
                w = {k: v.float() for k, v in ours[j].items()}
                want = (torch.nn.functional.silu(x @ w["gate"].t()) * (x @ w["up"].t())) @ w["down"].t()
                got = experts(x, torch.full((5, 1), j), torch.ones(5, 1))
                torch.testing.assert_close(got, want)
    folder = tmp_path_factory.mktemp("transformers_saved")
    model.to(torch.bfloat16).save_pretrained(folder)
    saved = load_file(str(folder / "model.safetensors"))
    fused = {PREFIX + n: t for n, t in saved.items() if ".mlp.experts." in n}
    assert len(fused) == 2 * config.num_hidden_layers
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:  # transformers writes the orientation its module holds
            assert fused[PREFIX + name].shape == param.shape and fused[PREFIX + name].dtype == torch.bfloat16
    return fused


@pytest.fixture(scope="module")
def fused_checkpoint(tiny_checkpoint, golden_tensors, transformers_fused, tmp_path_factory) -> Path:
    tensors = {n: t for n, t in golden_tensors.items() if ".mlp.experts." not in n} | transformers_fused
    return _write(tiny_checkpoint, tmp_path_factory.mktemp("fused"), tensors, max_shard_size="1MB")


def test_fused_experts_from_transformers_reproduce_golden(golden_tensors, fused_checkpoint):
    reader = CheckpointReader(fused_checkpoint)
    assert not any(n.endswith(("gate_up_proj", "experts.down_proj")) for n in reader.names())
    per_expert = {n for n in golden_tensors if ".mlp.experts." in n}
    assert per_expert <= set(reader.names())
    for name in sorted(per_expert)[:: len(per_expert) // 7]:
        assert torch.equal(reader.get(name), golden_tensors[name]), name
    _assert_golden_greedy_ids(fused_checkpoint)


@pytest.mark.parametrize(
    "parallel", [ParallelContext(tp_rank=1, tp_size=2), ParallelContext(ep_rank=1, ep_size=2)], ids=["tp", "ep"]
)
def test_ranks_load_their_parts_of_fused_experts(tiny_checkpoint, fused_checkpoint, parallel):
    """A rank reads from fused experts exactly the parts it would read from per-expert tensors."""

    def load(folder: Path) -> tuple[torch.nn.Module, int]:
        model = build_model(load_model_config(folder), "float32", "cpu", parallel)
        reader = CheckpointReader(folder)
        load_into(model.checkpoint_targets(), reader, model.checkpoint_names_elsewhere())
        return model, reader.bytes_read

    (per_expert, read), (fused, fused_read) = load(tiny_checkpoint), load(fused_checkpoint)
    for (name, want), (_, got) in zip(per_expert.named_parameters(), fused.named_parameters(), strict=True):
        assert torch.equal(got, want), name
    assert fused_read == read


# A small hand-written fused file: 3 experts, H = 320 (3 scale blocks, the last one partial), I = 128.
E, H, I = 3, 320, 128
BASE = f"{PREFIX}layers.0.mlp."


def _per_expert(fp8: bool) -> dict[str, torch.Tensor]:
    """Per-expert tensors in nn.Linear orientation (with their 128x128 block scales when fp8)."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for j in range(E):
        for proj, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            name = f"{BASE}experts.{j}.{proj}_proj.weight"
            w = torch.randn(shape, generator=gen)
            out[name] = w.to(torch.float8_e4m3fn) if fp8 else w
            if fp8:
                out[name + "_scale_inv"] = torch.rand(-(-shape[0] // 128), -(-shape[1] // 128), generator=gen)
    return out


def _fuse(per_expert: dict[str, torch.Tensor], transposed: bool) -> dict[str, torch.Tensor]:
    """`per_expert` stacked as gate_up (gate, then up) and down, each expert transposed when `transposed`."""
    out = {}
    for suffix in ("weight", "weight_scale_inv"):
        if f"{BASE}experts.0.gate_proj.{suffix}" not in per_expert:
            continue
        tail = "" if suffix == "weight" else "_scale_inv"

        def stack(projs: tuple[str, ...]) -> torch.Tensor:
            mats = [torch.cat([per_expert[f"{BASE}experts.{j}.{p}_proj.{suffix}"] for p in projs]) for j in range(E)]
            return torch.stack([m.t() if transposed else m for m in mats]).contiguous()

        out[f"{BASE}experts.gate_up_proj{tail}"] = stack(("gate", "up"))
        out[f"{BASE}experts.down_proj{tail}"] = stack(("down",))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "x_at_w"])
@pytest.mark.parametrize("fp8", [False, True], ids=["f32", "fp8"])
def test_fused_experts_are_served_as_per_expert_slices(tmp_path, fp8, transposed):
    per_expert = _per_expert(fp8)
    fused = _fuse(per_expert, transposed)
    save_file(fused | {"lm_head.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    assert set(reader.names()) == set(per_expert) | {"lm_head.weight"}
    assert not any(name in reader for name in fused)
    for name, want in per_expert.items():
        assert reader.shape(name) == tuple(want.shape), name
        assert reader.dtype(name) == ("F8_E4M3" if want.dtype == torch.float8_e4m3fn else "F32"), name
        got = reader.get(name)
        assert got.dtype == want.dtype and torch.equal(_bits(got), _bits(want)), name
    # Parts, as tensor and expert parallel loading ask for them: only the part is read.
    for name, dim, start, stop in ((f"{BASE}experts.1.up_proj.weight", 0, 32, 96),
                                   (f"{BASE}experts.2.down_proj.weight", 1, 64, 128),
                                   (f"{BASE}experts.0.gate_proj.weight", 1, 100, 300)):
        before = reader.bytes_read
        got = reader.get(name, dim, start, stop)
        want = per_expert[name].narrow(dim, start, stop - start)
        assert torch.equal(_bits(got), _bits(want)), (name, dim)
        assert reader.bytes_read - before == want.nbytes


def _write_fused(folder: Path, fused: dict[str, torch.Tensor]) -> Path:
    save_file(fused, str(folder / "model.safetensors"))
    return folder


def test_fused_shapes_that_fit_neither_orientation_are_named(tmp_path):
    fused = _fuse(_per_expert(fp8=False), transposed=False)
    fused[f"{BASE}experts.down_proj"] = fused[f"{BASE}experts.down_proj"][:, :, :-1].contiguous()
    expected = r"expected \[E, 2\*I, H\] with \[E, H, I\] \(nn.Linear orientation\) or \[E, H, 2\*I\] with \[E, I, H\]"
    with pytest.raises(CheckpointError, match=rf"'{BASE}experts.gate_up_proj' \[3, 256, 320\] and "
                                              rf"'{BASE}experts.down_proj' \[3, 320, 127\]: {expected}"):
        CheckpointReader(_write_fused(tmp_path, fused))


def test_fused_fp8_scale_of_wrong_shape_is_named(tmp_path):
    fused = _fuse(_per_expert(fp8=True), transposed=True)
    fused[f"{BASE}experts.down_proj_scale_inv"] = torch.ones(E, 3, 1)
    with pytest.raises(CheckpointError, match=rf"'{BASE}experts.down_proj_scale_inv' has shape \[3, 3, 1\], "
                                              r"expected \[3, 1, 3\] \(128x128 blocks of \[3, 128, 320\]\)"):
        CheckpointReader(_write_fused(tmp_path, fused))


def test_fused_fp8_gate_up_needs_whole_scale_blocks_per_projection(tmp_path):
    inter = 64  # gate and up would share each scale block
    gate_up = torch.zeros(E, 2 * inter, H, dtype=torch.float8_e4m3fn)
    fused = {
        f"{BASE}experts.gate_up_proj": gate_up,
        f"{BASE}experts.gate_up_proj_scale_inv": torch.ones(E, 1, 3),
        f"{BASE}experts.down_proj": torch.zeros(E, H, inter, dtype=torch.float8_e4m3fn),
    }
    with pytest.raises(CheckpointError, match=rf"'{BASE}experts.gate_up_proj_scale_inv': .* I % 128 == 0 .* I = 64"):
        CheckpointReader(_write_fused(tmp_path, fused))


def test_fused_and_per_expert_copies_of_one_expert_are_refused(tmp_path):
    per_expert = _per_expert(fp8=False)
    name = f"{BASE}experts.1.up_proj.weight"
    with pytest.raises(CheckpointError, match=f"'{name}' is stored both on its own and in a fused expert tensor"):
        CheckpointReader(_write_fused(tmp_path, _fuse(per_expert, transposed=False) | {name: per_expert[name]}))
