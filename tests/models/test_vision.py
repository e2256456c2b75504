"""s1serve's vision tower and multimodal forward against golden outputs of the model authors' reference code.

The goldens (tests/fixtures/multimodal/, made by make_golden.py there; see its README) hold, for one picture, two
pictures in one message and a short video on the make-tiny checkpoint (preset tiny, seed 0): the reference
processor's input ids and pixel values, the reference vision tower's float32 features and 24 greedy ids.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file

from media_forward import media_greedy_ids
from s1serve.models.registry import load_model
from test_golden import _tensor_digests

TOL = 1e-4
GOLDEN_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "multimodal"
GOLDEN = json.loads((GOLDEN_DIR / "golden_mm_tiny_seed0.json").read_text())
FEATURES = load_file(str(GOLDEN_DIR / GOLDEN["features_file"]))
PIXELS = load(gzip.decompress((GOLDEN_DIR / GOLDEN["pixels_file"]).read_bytes()))
PROMPTS = {p["name"]: p for p in GOLDEN["prompts"]}
MEDIA_KEY = {file: key for key, file in GOLDEN["media"].items()}
REGENERATE = "regenerate the goldens as tests/fixtures/multimodal/README.md says"


def prompt_pixels(p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's pixel_values (its media items' rows, in order) and grid_thw, as the reference processor gave."""
    pixels = torch.cat([PIXELS[MEDIA_KEY[f]] for f in p["images"] + p["videos"]])
    return pixels, torch.tensor(p["grid_thw"])


@pytest.fixture(scope="module")
def mm_checkpoint(tiny_checkpoint: Path, tiny_checkpoint_spec: dict) -> Path:
    """The session's tiny checkpoint, after checking it is the one the goldens were made on (vision included)."""
    made_on = {k: GOLDEN[k] for k in ("preset", "seed", "arch")}
    if made_on != tiny_checkpoint_spec:
        pytest.fail(f"goldens were made on {made_on}, the tiny_checkpoint fixture is {tiny_checkpoint_spec}")
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    for key in ("text_config", "vision_config"):
        if config[key] != GOLDEN["checkpoint"][key]:
            pytest.fail(f"make-tiny's {key} changed since the multimodal goldens were made; {REGENERATE}")
    weight_map = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    digests: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        digests.update(_tensor_digests(tiny_checkpoint / shard, ("model.language_model.", "lm_head.", "model.visual.")))
    want = GOLDEN["checkpoint"]["tensor_sha256"]
    differing = sorted(n for n in set(digests) | set(want) if digests.get(n) != want.get(n))
    if differing:
        pytest.fail(f"make-tiny's weights changed since the goldens were made ({len(differing)} tensors differ, "
                    f"e.g. {differing[:3]}); {REGENERATE}")
    return tiny_checkpoint


@pytest.fixture(scope="module")
def mm_model(mm_checkpoint: Path):
    return load_model(mm_checkpoint, "float32")


def test_golden_fixture_is_well_formed():
    assert set(PROMPTS) == {"one_image", "two_images", "video"}
    for name, p in PROMPTS.items():
        pixels, grid = prompt_pixels(p)
        assert list(pixels.shape) == p["pixel_values_shape"] and pixels.dtype == torch.float32, name
        assert hashlib.sha256(pixels.numpy().tobytes()).hexdigest() == p["pixel_values_sha256"], name
        assert p["prompt_ids"].count(p["pad_token_id"]) == p["pad_count"] == int(grid.prod(-1).sum()) // 4, name
        assert FEATURES[name].shape == (p["pad_count"], GOLDEN["checkpoint"]["vision_config"]["out_hidden_size"])
        assert len(p["greedy_ids"]) == GOLDEN["new_tokens"] and p["generate_ids"] == p["greedy_ids"], name
    assert len(PROMPTS["two_images"]["grid_thw"]) == 2 and PROMPTS["video"]["grid_thw"][0][0] > 1
    for key, file in GOLDEN["media"].items():
        assert hashlib.sha256((GOLDEN_DIR / file).read_bytes()).hexdigest() == GOLDEN["media_sha256"][key], file


@pytest.mark.parametrize("name", list(PROMPTS))
def test_vision_features_equal_reference(name, mm_model):
    pixels, grid = prompt_pixels(PROMPTS[name])
    got = mm_model.encode_images(pixels, grid)
    assert got.dtype == torch.float32 and got.shape == FEATURES[name].shape
    diff = float((got - FEATURES[name]).abs().max())
    print(f"{name}: max|s1serve - reference| vision features = {diff:.3e} (features up to "
          f"{float(FEATURES[name].abs().max()):.2f})")
    assert diff <= TOL, f"{name}: vision features differ from the reference's by {diff:.3e} > {TOL}"


def test_items_encoded_together_equal_items_encoded_alone(mm_model):
    """Attention stays inside each picture and each frame group: batching items changes nothing."""
    panda, crop, clip = (PIXELS[k] for k in ("panda", "crop", "clip"))
    grids = [*PROMPTS["two_images"]["grid_thw"], PROMPTS["video"]["grid_thw"][0]]
    together = mm_model.encode_images(torch.cat([panda, crop, clip]), torch.tensor(grids))
    alone = torch.cat([mm_model.encode_images(px, torch.tensor([g])) for px, g in zip((panda, crop, clip), grids)])
    assert float((together - alone).abs().max()) <= 1e-5


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_ids_with_media_equal_reference(name, mm_model):
    p = PROMPTS[name]
    pixels, grid = prompt_pixels(p)
    got = media_greedy_ids(mm_model, p["prompt_ids"], pixels, grid, p["pad_token_id"], GOLDEN["new_tokens"])
    assert got == p["greedy_ids"], f"{name}: greedy ids with media differ from the reference's"


def test_bad_vision_inputs_are_refused_with_what_is_wrong(mm_model):
    pixels, grid = prompt_pixels(PROMPTS["one_image"])
    with pytest.raises(ValueError, match=r"pixel_values must be \[288, 1536\]"):
        mm_model.encode_images(pixels[:-1], grid)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size 2"):
        mm_model.encode_images(pixels, torch.tensor([[1, 9, 32]]))
    with pytest.raises(ValueError, match="media_embeds must be"):
        ids = torch.tensor(PROMPTS["one_image"]["prompt_ids"])
        mm_model.embed(ids, torch.nonzero(ids == 151655).flatten(), torch.zeros(3, 64))
