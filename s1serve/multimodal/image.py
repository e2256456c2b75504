"""Images: decode with checks, then the reference's resize / normalise / patch layout (Qwen2-VL fast processor).

The reference (`Qwen2VLImageProcessorFast`, named by preprocessor_config.json) resizes uint8 tensors with
torchvision's bicubic antialiased resize, which on CPU is torch's own uint8 `interpolate(..., antialias=True)`;
we call that directly, so no torchvision is needed. tests/multimodal/test_image_golden.py measures the distance.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from s1serve.multimodal.config import VisionProcessingConfig
from s1serve.multimodal.errors import MediaError

# The reference refuses a more elongated image in its smart resize.
MAX_ASPECT_RATIO = 200

# PIL warns on open for images between its limit and twice it; check_image_size refuses them with a clear error
# right after, so the warning would only be noise in the server's log.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class ImageLimits:
    """Limits checked on an image's declared size, before its pixels are decoded.

    max_pixels: PIL's own decompression-bomb warning level (89,478,485 pixels, ~ a 9459x9459 image) by default.
    min_side: the reference's video processor refuses frames with a side under its factor (32); the image
    processor would upscale a 1x1 image to a 256x256 block of one colour, so s1serve refuses both alike.
    """

    max_pixels: int = 89_478_485
    min_side: int = 32


@dataclass(frozen=True)
class VisualPatches:
    """One image or video ready for the vision tower."""

    pixel_values: torch.Tensor  # float32 [t*h*w, 3 * temporal_patch * patch * patch], in 2x2-merge-block order
    grid_thw: tuple[int, int, int]  # in patches

    def num_tokens(self, merge_size: int) -> int:
        """Placeholder tokens this item takes in the prompt (t*h*w / merge_size**2)."""
        t, h, w = self.grid_thw
        return t * h * w // (merge_size * merge_size)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The reference image processor's target size: sides multiples of `factor`, area within the bounds.

    Python's round (half to even) as in the reference: 720 / 32 = 22.5 rounds to 22.
    """
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def check_image_size(width: int, height: int, label: str, limits: ImageLimits) -> None:
    """Refuse a size before any pixel is decoded: 413 over the pixel cap, 400 for the shape rules."""
    if width * height > limits.max_pixels:
        raise MediaError(
            f"{label}: {width}x{height} = {width * height} pixels is over the limit of {limits.max_pixels} pixels",
            status=413,
        )
    if min(width, height) == 0 or max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise MediaError(
            f"{label}: {width}x{height} has an aspect ratio over the allowed {MAX_ASPECT_RATIO}:1"
        )
    if min(width, height) < limits.min_side:
        raise MediaError(f"{label}: {width}x{height} is too small; each side must be at least {limits.min_side} pixels")


def decode_image(data: bytes, label: str, limits: ImageLimits) -> Image.Image:
    """Bytes -> RGB PIL image, as transformers' load_image does it (EXIF orientation applied, then RGB)."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise MediaError(f"{label}: refused before decoding ({e}); the limit is {limits.max_pixels} pixels", 413) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise MediaError(f"{label}: not a readable image ({type(e).__name__}: {e})") from e
    check_image_size(image.width, image.height, label, limits)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        rgb = image.convert("RGB") if image.mode != "RGB" else image
    except Image.DecompressionBombError as e:
        raise MediaError(f"{label}: refused ({e}); the limit is {limits.max_pixels} pixels", 413) from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise MediaError(f"{label}: the image data is corrupt or truncated ({type(e).__name__}: {e})") from e
    return rgb


def rgb_to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB image (PIL or HWC uint8 array) -> uint8 [3, H, W]."""
    array = np.array(image, dtype=np.uint8)  # a writable copy: torch refuses to wrap read-only memory silently
    return torch.from_numpy(array).permute(2, 0, 1)


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> uint8 [N, 3, height, width]: bicubic with antialiasing (the reference's resize)."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    return F.interpolate(frames, size=[height, width], mode="bicubic", align_corners=False, antialias=True)


def normalize_frames(frames: torch.Tensor, config: VisionProcessingConfig) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32: (x / 255 - mean) / std, computed as the reference's fused form."""
    mean = torch.tensor(config.image_mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(config.image_std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return frames.to(torch.float32).sub_(mean).div_(std)


def frames_to_patches(frames: torch.Tensor, config: VisionProcessingConfig) -> VisualPatches:
    """float [T, 3, H, W] (H, W multiples of the factor) -> the reference's flattened patches and grid.

    T is padded to a multiple of temporal_patch_size by repeating the last frame (a still image becomes two
    identical frames). Rows come in (t, h-block, w-block, 2x2-within-block) order; each row is
    (channel, temporal, patch_row, patch_col).
    """
    tp, p, m = config.temporal_patch_size, config.patch_size, config.merge_size
    if frames.shape[0] % tp:
        repeats = frames[-1:].expand(tp - frames.shape[0] % tp, -1, -1, -1)
        frames = torch.cat([frames, repeats], dim=0)
    num_frames, channels, height, width = frames.shape
    grid_t, grid_h, grid_w = num_frames // tp, height // p, width // p
    patches = frames.reshape(grid_t, tp, channels, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = patches.reshape(grid_t * grid_h * grid_w, channels * tp * p * p)
    return VisualPatches(pixel_values=pixel_values, grid_thw=(grid_t, grid_h, grid_w))


def process_image(
    image: Image.Image, config: VisionProcessingConfig, min_pixels: int | None = None, max_pixels: int | None = None
) -> VisualPatches:
    """RGB PIL image -> patches, exactly as the reference image processor (bounds overridable per request)."""
    height, width = smart_resize(
        image.height,
        image.width,
        config.factor,
        config.min_pixels if min_pixels is None else min_pixels,
        config.max_pixels if max_pixels is None else max_pixels,
    )
    frames = resize_frames(rgb_to_tensor(image).unsqueeze(0), height, width)
    return frames_to_patches(normalize_frames(frames, config), config)
