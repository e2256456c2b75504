"""Prompt/item bookkeeping and options: placeholders vs items, --limit-mm-per-prompt, mm_processor_kwargs,
--media-io-kwargs, the content hash and feature key."""

from __future__ import annotations

import pytest

from conftest import fixture_bytes
from media_samples import clip_bytes
from s1serve.assets import ASSETS_DIR
from s1serve.errors import ConfigError
from s1serve.multimodal import MediaError, MediaItem, MediaOptions, MultimodalProcessor, parse_media_io_kwargs
from s1serve.multimodal.video import VideoSampling, group_timestamps, sample_frame_indices

PICTURE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def image(name: str = "upscale.png") -> MediaItem:
    return MediaItem.from_bytes("image", fixture_bytes(name))


def test_placeholders_must_match_items(mm_processor):
    with pytest.raises(MediaError, match=r"2 image placeholder\(s\) .* but 1 image\(s\) were given") as info:
        mm_processor.process(f"{PICTURE} and {PICTURE}", [image()])
    assert info.value.status == 400
    with pytest.raises(MediaError, match=r"0 video placeholder\(s\)"):
        mm_processor.process("no video here", [MediaItem.from_bytes("video", fixture_bytes("clip.mp4"))])


def test_limit_per_prompt(mm_tokenizer):
    limited = MultimodalProcessor.from_model_dir(ASSETS_DIR, mm_tokenizer, MediaOptions(limit_per_prompt={"image": 2}))
    with pytest.raises(MediaError, match=r"3 images in the prompt; at most 2 allowed \(--limit-mm-per-prompt\)") as info:
        limited.process(PICTURE * 3, [image()] * 3)
    assert info.value.status == 413
    limited.check_item_counts(2, 5)  # videos are not limited here
    assert len(limited.process(PICTURE * 2, [image()] * 2).items) == 2


def test_same_image_twice_gets_two_runs(mm_processor):
    result = mm_processor.process(f"A {PICTURE} B {PICTURE}", [image(), image()])
    first, second = result.items
    assert first.label == "image 1" and second.label == "image 2"
    assert first.content_hash == second.content_hash and first.feature_key == second.feature_key
    assert first.pad_ranges[0][0] + first.pad_ranges[0][1] < second.pad_ranges[0][0]


def test_feature_key_follows_what_changes_the_features(mm_processor):
    default = mm_processor.process(PICTURE, [image("panda.jpg")]).items[0]
    smaller = mm_processor.process(PICTURE, [image("panda.jpg")], {"max_pixels": 262144}).items[0]
    assert default.content_hash == smaller.content_hash
    assert default.feature_key != smaller.feature_key
    clip = MediaItem.from_bytes("video", fixture_bytes("clip.mp4"))
    two_fps = mm_processor.process(VIDEO, [clip]).items[0]
    five = mm_processor.process(VIDEO, [clip], {"num_frames": 5}).items[0]
    assert two_fps.grid_thw == five.grid_thw and two_fps.feature_key != five.feature_key


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"resize": True}, r"unknown key\(s\) \['resize'\]; allowed: \['fps', 'num_frames', 'min_pixels', 'max_pixels'\]"),
        ({"fps": 1, "num_frames": 4}, "mutually exclusive"),
        ({"fps": 0}, "fps must be a positive number"),
        ({"fps": "2"}, "fps must be a number"),
        ({"max_pixels": 10**9}, r"need 1024 <= min_pixels <= max_pixels <= 16777216"),
        ({"min_pixels": 500_000, "max_pixels": 400_000}, "min_pixels <= max_pixels"),
    ],
)
def test_bad_request_kwargs(mm_processor, kwargs, message):
    with pytest.raises(MediaError, match=message) as info:
        mm_processor.process(PICTURE, [image()], kwargs)
    assert info.value.status == 400


def test_media_tokens_in_message_text_are_refused(mm_processor):
    # The user typed a video placeholder inside an image prompt's text: counts disagree, refused.
    with pytest.raises(MediaError, match="video placeholder"):
        mm_processor.process(f"{PICTURE} look: <|video_pad|>", [image()])


def test_media_io_kwargs_from_the_guide_are_the_reference_defaults(mm_tokenizer, mm_processor):
    fields = parse_media_io_kwargs('{"video": {"num_frames": 768, "fps": 2}}')
    assert fields == {"video_fps": 2.0, "video_max_frames": 768}
    guided = MultimodalProcessor.from_model_dir(ASSETS_DIR, mm_tokenizer, MediaOptions(**fields))
    assert guided.default_sampling == mm_processor.default_sampling == VideoSampling(fps=2.0, min_frames=4, max_frames=768)
    slow = MultimodalProcessor.from_model_dir(ASSETS_DIR, mm_tokenizer, MediaOptions(**parse_media_io_kwargs(
        {"video": {"fps": 1, "num_frames": 4}})))
    clip = MediaItem.from_bytes("video", clip_bytes(100, fps=10))  # 10 s: 1 fps gives 10 frames, capped at 4
    assert slow.process(VIDEO, [clip]).items[0].frame_indices == (0, 33, 66, 99)


@pytest.mark.parametrize(
    "value", ['{"video": {"frames": 3}}', '{"audio": {}}', '{"video": {"fps": -1}}', '{"video": {"num_frames": 1}}', "[1"]
)
def test_bad_media_io_kwargs(value):
    with pytest.raises(ConfigError, match="--media-io-kwargs"):
        parse_media_io_kwargs(value)


def test_sampling_follows_the_reference_formula():
    # 72 frames at 24 fps, 2 fps wanted: int(72 / 24 * 2) = 6 frames, evenly spread and rounded half to even.
    assert sample_frame_indices(72, 24.0, VideoSampling()).tolist() == [0, 14, 28, 43, 57, 71]
    # A 1 s clip still gets min_frames (4); a 3-frame clip gets all 3; a long clip is capped at max_frames.
    assert sample_frame_indices(30, 30.0, VideoSampling()).tolist() == [0, 10, 19, 29]
    assert sample_frame_indices(3, 30.0, VideoSampling()).tolist() == [0, 1, 2]
    assert len(sample_frame_indices(30 * 3600, 30.0, VideoSampling())) == 768
    # num_frames is taken as given (the reference does not clamp it; repeats are allowed).
    assert sample_frame_indices(3, 30.0, VideoSampling(fps=None, num_frames=5)).tolist() == [0, 0, 1, 2, 2]
    # Timestamps: mean of each pair's first and last frame times; an odd count repeats the last index.
    assert group_timestamps([0, 12, 24], 24.0, 2) == [0.25, 1.0]


def test_batched_resize_equals_one_frame_at_a_time():
    # Video frames are resized RESIZE_BATCH at a time; the reference resizes the whole clip in one call.
    import torch

    from s1serve.multimodal.image import resize_frames

    frames = torch.randint(0, 256, (11, 3, 90, 170), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = resize_frames(frames, 64, 128)
    one_by_one = torch.cat([resize_frames(frames[i : i + 1], 64, 128) for i in range(11)])
    by_eight = torch.cat([resize_frames(frames[:8], 64, 128), resize_frames(frames[8:], 64, 128)])
    assert torch.equal(whole, one_by_one) and torch.equal(whole, by_eight)


def test_long_clip_sampled_across_resize_batches(mm_processor):
    clip = MediaItem.from_bytes("video", clip_bytes(30, fps=10))  # 3 s at 2 fps: 6 frames; 20 asked: 3 batches
    result = mm_processor.process(VIDEO, [clip], {"num_frames": 20}).items[0]
    assert result.grid_thw[0] == 10 and len(result.frame_indices) == 20
