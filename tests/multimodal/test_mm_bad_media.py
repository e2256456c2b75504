"""Bad images and videos: each refused with a MediaError (400, or 413 over a size limit) naming the item and
the limit, before expensive work where possible, and without leaving files behind."""

from __future__ import annotations

import os
import tempfile
import time

import pytest

from conftest import fixture_bytes
from media_samples import clip_bytes, png_bytes, png_header_only
from s1serve.multimodal import MediaError, MediaItem, MediaOptions, MultimodalProcessor
from s1serve.multimodal.image import ImageLimits
from s1serve.multimodal.video import VideoLimits

IMAGE_PROMPT = "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>What?<|im_end|>\n"
VIDEO_PROMPT = "<|im_start|>user\nVideo 1: <|vision_start|><|video_pad|><|vision_end|>What?<|im_end|>\n"


def refused(processor, prompt: str, items: list[MediaItem], kwargs=None) -> MediaError:
    with pytest.raises(MediaError) as info:
        processor.process(prompt, items, kwargs)
    return info.value


def image(data: bytes) -> MediaItem:
    return MediaItem.from_bytes("image", data)


def video(data: bytes) -> MediaItem:
    return MediaItem.from_bytes("video", data)


def test_corrupt_png(mm_processor):
    data = bytearray(fixture_bytes("upscale.png"))
    data[2000:2400] = bytes(400)  # inside the compressed pixel data
    error = refused(mm_processor, IMAGE_PROMPT, [image(bytes(data))])
    assert error.status == 400 and error.message.startswith("image 1: ") and "corrupt" in error.message


def test_truncated_png(mm_processor):
    data = fixture_bytes("upscale.png")
    error = refused(mm_processor, IMAGE_PROMPT, [image(data[: len(data) // 2])])
    assert error.status == 400 and "image 1" in error.message and "truncated" in error.message


def test_not_an_image(mm_processor):
    error = refused(mm_processor, IMAGE_PROMPT, [image(b"<html>not found</html>")])
    assert error.status == 400 and "image 1: not a readable image" in error.message


def test_one_pixel_image(mm_processor):
    error = refused(mm_processor, IMAGE_PROMPT, [image(png_bytes(1, 1))])
    assert error.status == 400 and "1x1" in error.message and "at least 32 pixels" in error.message


def test_extreme_strip(mm_processor):
    error = refused(mm_processor, IMAGE_PROMPT, [image(png_bytes(100_000, 1))])
    assert error.status == 400 and "100000x1" in error.message and "aspect ratio over the allowed 200:1" in error.message


@pytest.mark.parametrize("side", [30_000, 12_000])  # over twice PIL's own limit, and between ours and PIL's
def test_decompression_bomb_refused_before_decoding(mm_processor, side):
    started = time.perf_counter()
    error = refused(mm_processor, IMAGE_PROMPT, [image(png_header_only(side, side))])
    assert time.perf_counter() - started < 1.0  # decoding 30000x30000 RGB would take seconds and 2.7 GB
    assert error.status == 413 and "image 1" in error.message and "89478485 pixels" in error.message


def test_second_image_is_named(mm_processor):
    prompt = IMAGE_PROMPT.replace("What?", "Picture 2: <|vision_start|><|image_pad|><|vision_end|>")
    error = refused(mm_processor, prompt, [image(fixture_bytes("upscale.png")), image(png_bytes(1, 1))])
    assert error.message.startswith("image 2: ")


def test_truncated_mp4_without_index(mm_processor):
    data = fixture_bytes("clip.mp4")  # index (moov) at the end: a cut file cannot be opened
    error = refused(mm_processor, VIDEO_PROMPT, [video(data[: len(data) // 2])])
    assert error.status == 400 and error.message.startswith("video 1: not a readable video")


def test_truncated_mp4_with_index_first(mm_processor):
    data = clip_bytes(40, faststart=True)  # opens, declares 40 frames, holds about half of them
    error = refused(mm_processor, VIDEO_PROMPT, [video(data[: len(data) // 2])])
    assert error.status == 400 and "video 1" in error.message and "truncated or corrupt" in error.message


def test_single_frame_video(mm_processor):
    error = refused(mm_processor, VIDEO_PROMPT, [video(clip_bytes(1))])
    assert error.status == 400 and "1 frame(s) sampled; at least 2 are needed" in error.message


def test_tiny_video_frames(mm_processor):
    error = refused(mm_processor, VIDEO_PROMPT, [video(clip_bytes(8, width=32, height=16))])
    assert error.status == 400 and "32x16 frames are too small" in error.message


def test_frame_caps(mm_tokenizer, mm_processor):
    from s1serve.assets import ASSETS_DIR

    strict = MultimodalProcessor.from_model_dir(
        ASSETS_DIR, mm_tokenizer, MediaOptions(video_limits=VideoLimits(max_source_frames=20, max_frame_pixels=10_000))
    )
    error = refused(strict, VIDEO_PROMPT, [video(clip_bytes(30, width=64, height=64))])
    assert error.status == 413 and "30 frames is over the limit of 20 frames" in error.message
    error = refused(strict, VIDEO_PROMPT, [video(clip_bytes(4, width=128, height=96))])
    assert error.status == 413 and "128x96 frames are over the limit of 10000 pixels" in error.message
    error = refused(mm_processor, VIDEO_PROMPT, [video(clip_bytes(4))], {"num_frames": 769})
    assert error.status == 413 and "num_frames 769 is over the limit of 768 frames" in error.message


def test_image_pixel_cap_is_configurable(mm_tokenizer):
    from s1serve.assets import ASSETS_DIR

    strict = MultimodalProcessor.from_model_dir(ASSETS_DIR, mm_tokenizer, MediaOptions(image_limits=ImageLimits(max_pixels=10_000)))
    error = refused(strict, IMAGE_PROMPT, [image(png_bytes(150, 100))])
    assert error.status == 413 and "150x100 = 15000 pixels is over the limit of 10000 pixels" in error.message


def test_no_temporary_files_left(mm_processor):
    cut_clip = video(clip_bytes(40, faststart=True)[:3000])
    before = set(os.listdir(tempfile.gettempdir()))
    for item in (image(png_header_only(30_000, 30_000)), image(b"junk")):
        refused(mm_processor, IMAGE_PROMPT, [item])
    refused(mm_processor, VIDEO_PROMPT, [cut_clip])
    mm_processor.process(VIDEO_PROMPT, [video(fixture_bytes("clip.mp4"))])
    assert set(os.listdir(tempfile.gettempdir())) - before == set()
