"""Processing parameters from a checkpoint's preprocessor_config.json and video_preprocessor_config.json."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from s1serve.errors import ConfigError


@dataclass(frozen=True)
class VisionProcessingConfig:
    """One modality's resize/normalise/patch parameters (the reference's processor attributes).

    `min_pixels`/`max_pixels` are the config's `size.shortest_edge`/`size.longest_edge`: for images they bound
    one resized image, for video the resized clip (frames x height x width).
    """

    min_pixels: int
    max_pixels: int
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # Video only (the reference's class defaults; the published config does not override them).
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged 2x2 block of patches."""
        return self.patch_size * self.merge_size

    @property
    def tokens_per_merge(self) -> int:
        return self.merge_size * self.merge_size

    def with_overrides(self, **changes: Any) -> "VisionProcessingConfig":
        return replace(self, **changes)


@dataclass(frozen=True)
class MediaProcessingConfig:
    image: VisionProcessingConfig
    video: VisionProcessingConfig


# The reference's class defaults, used for keys a config file leaves out.
_IMAGE_DEFAULT_PIXELS = (56 * 56, 28 * 28 * 1280)
_VIDEO_DEFAULT_PIXELS = (128 * 32 * 32, 32 * 32 * 768)


def _read(folder: Path, name: str) -> Mapping[str, Any]:
    path = folder / name
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _vision(data: Mapping[str, Any], default_pixels: tuple[int, int], source: str) -> VisionProcessingConfig:
    size = data.get("size") or {}
    min_pixels = data.get("min_pixels", size.get("shortest_edge", default_pixels[0]))
    max_pixels = data.get("max_pixels", size.get("longest_edge", default_pixels[1]))
    fields: dict[str, Any] = {"min_pixels": int(min_pixels), "max_pixels": int(max_pixels)}
    for key in ("patch_size", "temporal_patch_size", "merge_size", "min_frames", "max_frames"):
        if key in data:
            fields[key] = int(data[key])
    if "fps" in data:
        fields["fps"] = float(data["fps"])
    for key in ("image_mean", "image_std"):
        if key in data:
            value = tuple(float(v) for v in data[key])
            if len(value) != 3:
                raise ConfigError(f"{source}: {key} must have 3 values, got {len(value)}")
            fields[key] = value
    config = VisionProcessingConfig(**fields)
    if not 0 < config.min_pixels <= config.max_pixels:
        raise ConfigError(f"{source}: need 0 < size.shortest_edge <= size.longest_edge, got {min_pixels}, {max_pixels}")
    return config


def load_media_processing_config(model_dir: str | os.PathLike[str]) -> MediaProcessingConfig:
    """Read both processor configs of a checkpoint folder (a missing file means the reference defaults)."""
    folder = Path(model_dir)
    return MediaProcessingConfig(
        image=_vision(_read(folder, "preprocessor_config.json"), _IMAGE_DEFAULT_PIXELS, "preprocessor_config.json"),
        video=_vision(
            _read(folder, "video_preprocessor_config.json"), _VIDEO_DEFAULT_PIXELS, "video_preprocessor_config.json"
        ),
    )


def per_kind_flag(flag: str, value: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """A flag whose value is a JSON object keyed by media kind ('image' and/or 'video'); {} when not given."""
    if value is None:
        return {}
    try:
        data = json.loads(value) if isinstance(value, str) else dict(value)
    except ValueError as e:
        raise ConfigError(f"{flag}: not JSON ({e})") from e
    if not isinstance(data, dict) or set(data) - {"image", "video"}:
        raise ConfigError(f"{flag}: expected an object with keys 'image' and/or 'video', got {data!r}")
    return data
