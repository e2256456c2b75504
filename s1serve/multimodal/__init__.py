"""Images and video for Intern-S1-Pro: safe fetching, the reference's processing, prompt expansion."""

from s1serve.multimodal.errors import MediaError
from s1serve.multimodal.processor import (
    MediaItem,
    MediaOptions,
    MultimodalProcessor,
    ProcessedItem,
    ProcessedPrompt,
    parse_media_io_kwargs,
)

__all__ = [
    "MediaError",
    "MediaItem",
    "MediaOptions",
    "MultimodalProcessor",
    "ProcessedItem",
    "ProcessedPrompt",
    "parse_media_io_kwargs",
]
