"""s1serve's processor against the authors' reference processors (tests/fixtures/multimodal_processing/).

The reference is the processor preprocessor_config.json names (Qwen2VLImageProcessorFast, torchvision resize)
and the authors' InternS1ProVideoProcessor. On CPU, s1serve's output is bitwise equal: the bound on pixel
values is 0 (docs/multimodal.md quotes it), checked on the sha256 of every value and on the stored rows.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from conftest import FIXTURES, fixture_bytes
from s1serve.multimodal import MediaItem

PIXEL_VALUE_BOUND = 0.0  # max |s1serve - reference| over pixel values; docs/multimodal.md quotes this figure

CASES = ["panda", "two_images", "exif_rotated", "downscale", "panda_max_pixels", "video_fps2",
         "video_num_frames5", "image_and_video"]


def _unrle(runs: list[list[int]]) -> list[int]:
    return [token for token, count in runs for _ in range(count)]


def _request_kwargs(case: dict) -> dict:
    kwargs = dict(case["video_kwargs"])
    if size := case["image_kwargs"].get("size"):
        kwargs.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    return kwargs


@pytest.fixture(scope="module")
def processed(mm_processor, goldens):
    out = {}
    for name in CASES:
        case = goldens["cases"][name]
        items = [MediaItem.from_bytes(p["type"], fixture_bytes(p[p["type"]])) for p in case["parts"] if p["type"] != "text"]
        out[name] = mm_processor.process(case["text"], items, _request_kwargs(case))
    return out


def test_fixture_inputs_are_the_ones_the_reference_saw(goldens):
    for name, digest in goldens["provenance"]["inputs_sha256"].items():
        assert hashlib.sha256(fixture_bytes(name)).hexdigest() == digest, name


@pytest.mark.parametrize("name", CASES)
def test_prompt_ids_grids_and_pad_counts(name, goldens, processed):
    case, result = goldens["cases"][name], processed[name]
    assert result.token_ids == _unrle(case["prompt_ids_rle"])
    images = [item for item in result.items if item.kind == "image"]
    videos = [item for item in result.items if item.kind == "video"]
    assert [list(i.grid_thw) for i in images] == case.get("image_grid_thw", [])
    assert [list(v.grid_thw) for v in videos] == case.get("video_grid_thw", [])
    assert sum(i.num_pad_tokens for i in images) == case["image_pad_count"]
    assert sum(v.num_pad_tokens for v in videos) == case["video_pad_count"]
    pad_ids = goldens["provenance"]["pad_ids"]
    for item in result.items:
        t, h, w = item.grid_thw
        assert item.num_pad_tokens == t * h * w // 4
        positions = item.pad_positions()
        assert all(result.token_ids[p] == pad_ids[item.kind] for p in positions.tolist())
    for video, indices, timestamps in zip(videos, case.get("video_frame_indices", []), case.get("video_timestamps", [])):
        assert list(video.frame_indices) == indices
        assert list(video.timestamps) == timestamps
        assert len(video.pad_ranges) == video.grid_thw[0]  # one run per temporal group


@pytest.mark.parametrize("name", CASES)
def test_pixel_values_equal_the_reference(name, goldens, processed):
    case, result = goldens["cases"][name], processed[name]
    levels = np.load(FIXTURES / "pixels.npz")
    for kind in ("image", "video"):
        items = [item for item in result.items if item.kind == kind]
        if not items:
            continue
        ref = case[f"{kind}_pixel_values"]
        values = torch.cat([item.pixel_values for item in items])
        assert values.dtype == torch.float32 and list(values.shape) == ref["shape"]
        stored = (torch.from_numpy(levels[f"{name}/{kind}"].astype(np.float32)) - 127.5) / 127.5
        assert (values[ref["rows_stored"]] - stored).abs().max().item() <= PIXEL_VALUE_BOUND
        assert values.double().sum().item() == pytest.approx(ref["sum"], abs=1e-6 * values.numel())
        assert hashlib.sha256(values.contiguous().numpy().tobytes()).hexdigest() == ref["sha256_float32"]
