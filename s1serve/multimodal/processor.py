"""Prompt + media items -> expanded prompt ids and per-item patches: the reference InternS1ProProcessor's job.

The chat template renders each image as `<|vision_start|><|image_pad|><|vision_end|>` and each video as
`<|vision_start|><|video_pad|><|vision_end|>`. The reference widens each image's pad to t*h*w/4 pads and
replaces each video's three tokens by, per temporal group, `<{t:.1f} seconds><|vision_start|>` + pads +
`<|vision_end|>`, then tokenises the whole text. Pads are added tokens (the tokenizer cuts text at them), so
tokenising one pad per run and widening the run in the id list gives the same ids at a fraction of the work.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch

from s1serve.errors import ConfigError
from s1serve.multimodal.config import MediaProcessingConfig, load_media_processing_config, per_kind_flag
from s1serve.multimodal.errors import MediaError
from s1serve.multimodal.image import ImageLimits, VisualPatches, decode_image, process_image
from s1serve.multimodal.video import ProcessedVideo, VideoLimits, VideoSampling, decode_video, video_prompt
from s1serve.tokenizer import Tokenizer

MediaKind = Literal["image", "video"]

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

# Per-request mm_processor_kwargs s1serve takes (vLLM hands these to the HF processor): video sampling, and
# the image pixel bounds (within the checkpoint's own bounds).
REQUEST_KWARGS = ("fps", "num_frames", "min_pixels", "max_pixels")


@dataclass(frozen=True)
class MediaItem:
    """Fetched media bytes and their sha256 (the identity the prefix and feature caches key on)."""

    kind: MediaKind
    data: bytes
    content_hash: str

    @classmethod
    def from_bytes(cls, kind: MediaKind, data: bytes) -> "MediaItem":
        return cls(kind=kind, data=data, content_hash=hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class ProcessedItem:
    kind: MediaKind
    label: str  # "image 2": the kind and its 1-based place among the prompt's items of that kind
    content_hash: str
    pixel_values: torch.Tensor  # float32 [t*h*w, 1536]
    grid_thw: tuple[int, int, int]
    pad_ranges: tuple[tuple[int, int], ...]  # (start, length) runs of pad ids in the prompt: one per image,
    # one per temporal group of a video
    timestamps: tuple[float, ...] = ()  # video: seconds per temporal group
    frame_indices: tuple[int, ...] = ()  # video: the sampled source frames

    @property
    def num_pad_tokens(self) -> int:
        return sum(length for _, length in self.pad_ranges)

    @property
    def feature_key(self) -> str:
        """What the vision features depend on: the bytes, the resized grid and (video) the sampled frames."""
        key = json.dumps([self.kind, self.content_hash, self.grid_thw, self.frame_indices])
        return hashlib.sha256(key.encode()).hexdigest()

    def pad_positions(self) -> torch.Tensor:
        return torch.cat([torch.arange(start, start + length) for start, length in self.pad_ranges])


@dataclass(frozen=True)
class ProcessedPrompt:
    token_ids: list[int]
    items: list[ProcessedItem]


@dataclass(frozen=True)
class MediaOptions:
    """Server-wide media settings (flags): limits, default video sampling, items per prompt."""

    image_limits: ImageLimits = field(default_factory=ImageLimits)
    video_limits: VideoLimits = field(default_factory=VideoLimits)
    video_fps: float | None = None  # None: the video config's fps (2)
    video_max_frames: int | None = None  # None: the video config's max_frames (768)
    limit_per_prompt: Mapping[str, int] = field(default_factory=dict)  # kind -> most items; absent: no limit


def parse_media_io_kwargs(value: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """`--media-io-kwargs` JSON -> MediaOptions fields. As in vLLM's video loader, `num_frames` caps the frames
    sampled and `fps` is the sampling rate: `{"video": {"num_frames": 768, "fps": 2}}` (the deployment guide's
    values) is the reference processor's default sampling."""
    data = per_kind_flag("--media-io-kwargs", value)
    if data.get("image"):
        raise ConfigError(f"--media-io-kwargs: no image options are supported, got {data['image']!r}")
    video = data.get("video") or {}
    if not isinstance(video, dict) or set(video) - {"num_frames", "fps"}:
        raise ConfigError(f"--media-io-kwargs: video takes 'num_frames' and 'fps', got {video!r}")
    fields: dict[str, Any] = {}
    if "fps" in video:
        fps = video["fps"]
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
            raise ConfigError(f"--media-io-kwargs: video fps must be a positive number, got {fps!r}")
        fields["video_fps"] = float(fps)
    if "num_frames" in video:
        frames = video["num_frames"]
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
            raise ConfigError(f"--media-io-kwargs: video num_frames must be an integer >= 2, got {frames!r}")
        fields["video_max_frames"] = frames
    return fields


class MultimodalProcessor:
    """Expands a rendered prompt's media placeholders and processes its items (reference-equal output)."""

    def __init__(self, tokenizer: Tokenizer, config: MediaProcessingConfig, options: MediaOptions | None = None):
        self.tokenizer = tokenizer
        self.config = config
        self.options = options or MediaOptions()
        ids = {t: tokenizer.token_to_id(t) for t in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)}
        if None in ids.values():
            raise ConfigError(f"the tokenizer lacks vision tokens: {[t for t, i in ids.items() if i is None]}")
        self.image_pad_id, self.video_pad_id = ids[IMAGE_PAD], ids[VIDEO_PAD]
        max_frames = self.options.video_max_frames or config.video.max_frames
        self.default_sampling = VideoSampling(
            fps=self.options.video_fps or config.video.fps, min_frames=config.video.min_frames, max_frames=max_frames
        )
        self.video_limits = self.options.video_limits
        if max_frames > self.video_limits.max_sampled_frames:
            self.video_limits = VideoLimits(
                max_frame_pixels=self.video_limits.max_frame_pixels,
                max_source_frames=self.video_limits.max_source_frames,
                max_sampled_frames=max_frames,
            )

    @classmethod
    def from_model_dir(
        cls, model_dir: str | os.PathLike[str], tokenizer: Tokenizer, options: MediaOptions | None = None
    ) -> "MultimodalProcessor":
        return cls(tokenizer, load_media_processing_config(model_dir), options)

    def process(
        self, prompt: str, items: Sequence[MediaItem], mm_processor_kwargs: Mapping[str, Any] | None = None
    ) -> ProcessedPrompt:
        images = [item for item in items if item.kind == "image"]
        videos = [item for item in items if item.kind == "video"]
        self._check_counts(prompt, len(images), len(videos))
        image_bounds, sampling = self._request_options(mm_processor_kwargs or {})

        # Decode and process in prompt order; labels count within each kind ("image 2", "video 1").
        done: list[tuple[MediaItem, str, VisualPatches, ProcessedVideo | None]] = []
        for item in items:
            label = f"{item.kind} {1 + sum(1 for other, _, _, _ in done if other.kind == item.kind)}"
            if item.kind == "image":
                rgb = decode_image(item.data, label, self.options.image_limits)
                done.append((item, label, process_image(rgb, self.config.image, **image_bounds), None))
            else:
                video = decode_video(item.data, label, self.config.video, sampling, self.video_limits)
                done.append((item, label, video.patches, video))

        # One pad per image and per video group in the text; each is widened to its run in the ids.
        text, cursor = prompt, 0  # text before the cursor holds expanded videos, never searched again
        runs: dict[MediaKind, list[list[int]]] = {"image": [], "video": []}
        for item, _, patches, video in done:
            t, h, w = patches.grid_thw
            if video is None:
                runs["image"].append([t * h * w // self.config.image.tokens_per_merge])
                continue
            runs["video"].append([h * w // self.config.video.tokens_per_merge] * len(video.timestamps))
            groups = video_prompt(video.timestamps, 1, VISION_START, VIDEO_PAD, VISION_END)
            target = VISION_START + VIDEO_PAD + VISION_END
            if text.find(target, cursor) < 0:
                target = VIDEO_PAD  # a bare pad, as vLLM may render it
            at = text.find(target, cursor)
            text = text[:at] + groups + text[at + len(target) :]
            cursor = at + len(groups)
        token_ids, ranges = self._widen(self.tokenizer.encode(text), runs)

        out = []
        taken: dict[MediaKind, int] = {"image": 0, "video": 0}
        for item, label, patches, video in done:
            item_ranges = ranges[item.kind][taken[item.kind]]
            taken[item.kind] += 1
            extra = {} if video is None else {
                "timestamps": tuple(video.timestamps), "frame_indices": tuple(video.frame_indices)
            }
            out.append(ProcessedItem(
                item.kind, label, item.content_hash, patches.pixel_values, patches.grid_thw, item_ranges, **extra
            ))
        return ProcessedPrompt(token_ids=token_ids, items=out)

    def check_item_counts(self, num_images: int, num_videos: int) -> None:
        """413 when a prompt carries more items of a kind than --limit-mm-per-prompt allows (call before fetching)."""
        for kind, count in (("image", num_images), ("video", num_videos)):
            limit = self.options.limit_per_prompt.get(kind)
            if limit is not None and count > limit:
                raise MediaError(f"{count} {kind}s in the prompt; at most {limit} allowed (--limit-mm-per-prompt)", 413)

    def _check_counts(self, prompt: str, num_images: int, num_videos: int) -> None:
        self.check_item_counts(num_images, num_videos)
        for kind, pad, count in (("image", IMAGE_PAD, num_images), ("video", VIDEO_PAD, num_videos)):
            placeholders = prompt.count(pad)
            if placeholders != count:
                raise MediaError(
                    f"the prompt has {placeholders} {kind} placeholder(s) ({pad}) but {count} {kind}(s) were given"
                )

    def _request_options(self, kwargs: Mapping[str, Any]) -> tuple[dict[str, int], VideoSampling]:
        if unknown := sorted(set(kwargs) - set(REQUEST_KWARGS)):
            raise MediaError(f"mm_processor_kwargs: unknown key(s) {unknown}; allowed: {list(REQUEST_KWARGS)}")
        image = self.config.image
        bounds: dict[str, int] = {}
        for key in ("min_pixels", "max_pixels"):
            if key in kwargs:
                value = kwargs[key]
                if isinstance(value, bool) or not isinstance(value, int):
                    raise MediaError(f"mm_processor_kwargs: {key} must be an integer, got {value!r}")
                bounds[key] = value
        low, high = bounds.get("min_pixels", image.min_pixels), bounds.get("max_pixels", image.max_pixels)
        if not (image.factor**2 <= low <= high <= image.max_pixels):
            raise MediaError(
                f"mm_processor_kwargs: need {image.factor**2} <= min_pixels <= max_pixels <= {image.max_pixels}, "
                f"got min_pixels={low}, max_pixels={high}"
            )
        sampling = self.default_sampling
        if "fps" in kwargs and "num_frames" in kwargs:
            raise MediaError("mm_processor_kwargs: fps and num_frames are mutually exclusive; give one")
        if "fps" in kwargs:
            fps = kwargs["fps"]
            if isinstance(fps, bool) or not isinstance(fps, (int, float)):
                raise MediaError(f"mm_processor_kwargs: fps must be a number, got {fps!r}")
            sampling = VideoSampling(fps=float(fps), min_frames=sampling.min_frames, max_frames=sampling.max_frames)
        if "num_frames" in kwargs:
            frames = kwargs["num_frames"]
            if isinstance(frames, bool) or not isinstance(frames, int):
                raise MediaError(f"mm_processor_kwargs: num_frames must be an integer, got {frames!r}")
            sampling = VideoSampling(
                fps=None, num_frames=frames, min_frames=sampling.min_frames, max_frames=sampling.max_frames
            )
        return bounds, sampling

    def _widen(
        self, ids: list[int], runs: Mapping[MediaKind, list[list[int]]]
    ) -> tuple[list[int], dict[MediaKind, list[tuple[tuple[int, int], ...]]]]:
        """Replace each single pad id by its run; return the ids and, per kind, each item's (start, length) runs."""
        pad_kind: dict[int, MediaKind] = {self.image_pad_id: "image", self.video_pad_id: "video"}
        lengths = {kind: [n for item in item_runs for n in item] for kind, item_runs in runs.items()}
        for pad, kind in pad_kind.items():
            found = ids.count(pad)
            if found != len(lengths[kind]):
                raise MediaError(
                    f"the prompt holds {found} {kind} pad token(s) after expansion but {len(lengths[kind])} were "
                    "expected: media tokens must not appear in message text"
                )
        out: list[int] = []
        spans: dict[MediaKind, list[tuple[int, int]]] = {"image": [], "video": []}
        for token in ids:
            kind = pad_kind.get(token)
            if kind is None:
                out.append(token)
                continue
            length = lengths[kind][len(spans[kind])]
            spans[kind].append((len(out), length))
            out.extend([token] * length)
        per_item: dict[MediaKind, list[tuple[tuple[int, int], ...]]] = {}
        for kind, item_runs in runs.items():
            per_item[kind], i = [], 0
            for item in item_runs:
                per_item[kind].append(tuple(spans[kind][i : i + len(item)]))
                i += len(item)
        return out, per_item
