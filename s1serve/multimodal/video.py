"""Video: PyAV decode, the reference's frame sampling and clip-level smart resize, timestamps for the prompt.

Reference: the authors' video_processing_interns1_pro.py (sample_frames, smart_resize, _preprocess) and
processing_interns1_pro.py (_calculate_timestamps, the per-group prompt), with frames read as transformers'
read_video_pyav reads them (declared frame count and average rate of the first video stream, rgb24 frames).
Sampled frames are resized as they are decoded, so memory holds the resized clip, not the source frames.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import av
import numpy as np
import torch

from s1serve.multimodal.config import VisionProcessingConfig
from s1serve.multimodal.errors import MediaError
from s1serve.multimodal.image import (
    MAX_ASPECT_RATIO,
    VisualPatches,
    frames_to_patches,
    normalize_frames,
    resize_frames,
    rgb_to_tensor,
)


RESIZE_BATCH = 8  # decoded frames resized together


@dataclass(frozen=True)
class VideoSampling:
    """How frames are chosen: `num_frames` exactly (spread evenly), else `fps` frames a second clamped to
    [min_frames, max_frames] and to the source's frame count (the reference's sample_frames)."""

    fps: float | None = 2.0
    num_frames: int | None = None
    min_frames: int = 4
    max_frames: int = 768

    def __post_init__(self) -> None:
        if self.fps is not None and self.num_frames is not None:
            raise MediaError("video options: fps and num_frames are mutually exclusive; give one")
        if self.fps is None and self.num_frames is None:
            raise MediaError("video options: give fps or num_frames")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise MediaError(f"video options: fps must be a positive number, got {self.fps}")
        if self.num_frames is not None and self.num_frames < 1:
            raise MediaError(f"video options: num_frames must be at least 1, got {self.num_frames}")


@dataclass(frozen=True)
class VideoLimits:
    """Limits checked from the container's header, before decoding frames."""

    max_frame_pixels: int = 89_478_485  # per frame, the image cap
    max_source_frames: int = 216_000  # one hour at 60 frames/s: decoding runs up to the last sampled frame
    max_sampled_frames: int = 768  # the guide's cap (num_frames 768)


@dataclass(frozen=True)
class ProcessedVideo:
    patches: VisualPatches
    timestamps: list[float]  # seconds, one per temporal group
    frame_indices: list[int]  # sampled source frames
    source_fps: float
    source_frames: int


def sample_frame_indices(total_frames: int, source_fps: float, sampling: VideoSampling) -> np.ndarray:
    """The reference's sample_frames: evenly spaced indices, rounded (half to even, as numpy rounds)."""
    num_frames = sampling.num_frames
    if num_frames is None:
        num_frames = int(total_frames / source_fps * sampling.fps)
        num_frames = min(max(num_frames, sampling.min_frames), sampling.max_frames, total_frames)
    return np.linspace(0, total_frames - 1, num_frames).round().astype(int)


def group_timestamps(indices: list[int], source_fps: float, merge_size: int) -> list[float]:
    """Seconds per temporal group: the mean of the group's first and last frame times (the reference's
    _calculate_timestamps, which pads the index list with its last index to a multiple of merge_size)."""
    padded = list(indices)
    if len(padded) % merge_size:
        padded.extend(padded[-1] for _ in range(merge_size - len(padded) % merge_size))
    times = [i / source_fps for i in padded]
    return [(times[i] + times[i + merge_size - 1]) / 2 for i in range(0, len(times), merge_size)]


def smart_resize_video(
    num_frames: int, height: int, width: int, config: VisionProcessingConfig, label: str
) -> tuple[int, int]:
    """The reference video processor's target frame size: the pixel bounds apply to the whole clip."""
    temporal, factor = config.temporal_patch_size, config.factor
    if num_frames < temporal:
        raise MediaError(f"{label}: {num_frames} frame(s) sampled; at least {temporal} are needed")
    if height < factor or width < factor:
        raise MediaError(f"{label}: {width}x{height} frames are too small; each side must be at least {factor} pixels")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise MediaError(f"{label}: {width}x{height} frames have an aspect ratio over the allowed {MAX_ASPECT_RATIO}:1")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal) * temporal
    if t_bar * h_bar * w_bar > config.max_pixels:
        beta = math.sqrt((num_frames * height * width) / config.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < config.min_pixels:
        beta = math.sqrt(config.min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _open(data: bytes, label: str) -> av.container.InputContainer:
    try:
        return av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"{label}: not a readable video ({type(e).__name__}: {e})") from e


def _count_packets(container: av.container.InputContainer, stream: av.VideoStream) -> int:
    """Frame count for containers that do not declare one (e.g. WebM): one packet per frame."""
    count = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0)
    return count


def decode_video(
    data: bytes,
    label: str,
    config: VisionProcessingConfig,
    sampling: VideoSampling,
    limits: VideoLimits,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> ProcessedVideo:
    """Bytes -> sampled, resized, normalised patches and the per-group timestamps."""
    if sampling.num_frames is not None and sampling.num_frames > limits.max_sampled_frames:
        raise MediaError(
            f"{label}: num_frames {sampling.num_frames} is over the limit of {limits.max_sampled_frames} frames", 413
        )
    if min_pixels is not None or max_pixels is not None:
        config = config.with_overrides(
            min_pixels=config.min_pixels if min_pixels is None else min_pixels,
            max_pixels=config.max_pixels if max_pixels is None else max_pixels,
        )
    container = _open(data, label)
    try:
        if not container.streams.video:
            raise MediaError(f"{label}: the file has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > limits.max_frame_pixels:
            raise MediaError(
                f"{label}: {width}x{height} frames are over the limit of {limits.max_frame_pixels} pixels", 413
            )
        if stream.average_rate is None or stream.average_rate <= 0:
            raise MediaError(f"{label}: the video stream declares no frame rate")
        source_fps = float(stream.average_rate)
        total = stream.frames or _count_packets(container, stream)
        if total > limits.max_source_frames:
            raise MediaError(f"{label}: {total} frames is over the limit of {limits.max_source_frames} frames", 413)
        if total == 0:
            raise MediaError(f"{label}: the video has no frames")
        indices = sample_frame_indices(total, source_fps, sampling).tolist()
        target_h, target_w = smart_resize_video(len(indices), height, width, config, label)
        frames = _decode_frames(container, stream, indices, target_h, target_w, label)
    except av.FFmpegError as e:
        raise MediaError(f"{label}: the video data is corrupt or truncated ({type(e).__name__}: {e})") from e
    finally:
        container.close()
    patches = frames_to_patches(normalize_frames(frames, config), config)
    return ProcessedVideo(
        patches=patches,
        timestamps=group_timestamps(indices, source_fps, config.merge_size),
        frame_indices=indices,
        source_fps=source_fps,
        source_frames=total,
    )


def _decode_frames(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    indices: list[int],
    height: int,
    width: int,
    label: str,
) -> torch.Tensor:
    """uint8 [len(indices), 3, height, width]: the listed frames (repeats allowed), resized as decoded."""
    last = indices[-1]
    stream.thread_type = "AUTO"
    frames = torch.empty((len(indices), 3, height, width), dtype=torch.uint8)
    slots: dict[int, list[int]] = {}
    for slot, index in enumerate(indices):
        slots.setdefault(index, []).append(slot)
    pending: list[tuple[int, torch.Tensor]] = []

    def resize_pending() -> None:
        # A few frames per call: torch parallelises over the batch (about 3x faster than one frame at a time)
        # while memory holds at most RESIZE_BATCH source frames. Results do not depend on the batching.
        batch = resize_frames(torch.stack([rgb for _, rgb in pending]), height, width)
        for (index, _), resized in zip(pending, batch):
            frames[slots.pop(index)] = resized
        pending.clear()

    decoded = 0
    for i, frame in enumerate(container.decode(stream)):
        if i > last:
            break
        decoded = i + 1
        if i in slots:
            pending.append((i, rgb_to_tensor(frame.to_ndarray(format="rgb24"))))
            if len(pending) == RESIZE_BATCH:
                resize_pending()
    if pending:
        resize_pending()
    if slots:
        raise MediaError(
            f"{label}: only {decoded} frames could be decoded but frame {min(slots)} was needed "
            f"(the header declares {stream.frames}): the file is truncated or corrupt"
        )
    return frames


def video_prompt(timestamps: list[float], tokens_per_group: int, start: str, pad: str, end: str) -> str:
    """The text that replaces one video's `<|vision_start|><|video_pad|><|vision_end|>`."""
    group = start + pad * tokens_per_group + end
    return "".join(f"<{t:.1f} seconds>" + group for t in timestamps)
