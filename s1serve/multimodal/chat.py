"""OpenAI chat messages with media: content parts -> template placeholders + the items to fetch, and the whole
way from a rendered prompt and its items' URLs to the processed prompt (fetch, then process off the event loop).

Used alike by the HTTP server and the offline `LLM.chat`, so that both give the model the same input.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from s1serve.errors import ConfigError
from s1serve.multimodal.config import per_kind_flag
from s1serve.multimodal.errors import MediaError
from s1serve.multimodal.fetch import FetchPolicy, MediaFetcher
from s1serve.multimodal.processor import MediaKind, MediaOptions, MultimodalProcessor, ProcessedPrompt, parse_media_io_kwargs

# Content part type -> the media kind it carries and the field holding its URL (an object with "url", or the URL
# itself as in the Responses API's input_image).
MEDIA_PARTS: dict[str, tuple[MediaKind, str]] = {
    "image_url": ("image", "image_url"), "input_image": ("image", "image_url"), "video_url": ("video", "video_url"),
}
TEXT_PARTS = ("text", "input_text", "output_text", "refusal")


@dataclass(frozen=True)
class MediaRef:
    kind: MediaKind
    url: str
    label: str  # "image 2": its kind and 1-based place among the conversation's items of that kind


def extract_media(messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[MediaRef]]:
    """Messages whose media parts are the chat template's `{"type": "image"}` / `{"type": "video"}`, and the
    items in the order the template renders them. Raises MediaError for an unknown part type or a part without
    a URL."""
    out: list[dict[str, Any]] = []
    refs: list[MediaRef] = []
    counts = {"image": 0, "video": 0}
    for m, message in enumerate(messages, 1):
        content = message.get("content")
        if not isinstance(content, list):
            out.append(dict(message))
            continue
        parts = []
        for p, part in enumerate(content, 1):
            kind_name = part.get("type") if isinstance(part, Mapping) else None
            if kind_name in TEXT_PARTS:
                parts.append(dict(part))
                continue
            if kind_name not in MEDIA_PARTS:
                allowed = ", ".join(TEXT_PARTS + tuple(MEDIA_PARTS))
                raise MediaError(f"message {m} content part {p}: unknown type {kind_name!r}; allowed: {allowed}")
            kind, field = MEDIA_PARTS[kind_name]
            value = part.get(field)
            url = value.get("url") if isinstance(value, Mapping) else value
            counts[kind] += 1
            label = f"{kind} {counts[kind]}"
            if not isinstance(url, str) or not url:
                raise MediaError(f"{label} (message {m} content part {p}): {kind_name} needs a URL in "
                                 f"'{field}' (data:, http(s):// or file://)")
            refs.append(MediaRef(kind, url, label))
            parts.append({"type": kind})
        out.append({**message, "content": parts})
    return out, refs


def parse_limit_mm_per_prompt(value: str | Mapping[str, Any] | None) -> dict[str, int]:
    """`--limit-mm-per-prompt '{"image": 4, "video": 1}'` -> most items of each kind in one prompt."""
    data = per_kind_flag("--limit-mm-per-prompt", value)
    for kind, limit in data.items():
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigError(f"--limit-mm-per-prompt: {kind} must be an integer >= 0, got {limit!r}")
    return dict(data)


@dataclass(frozen=True)
class MediaArgs:
    """The media flags of the server (and keyword arguments of LLM)."""

    allowed_local_media_path: str | None = None
    allowed_media_domains: tuple[str, ...] = ()
    allow_private_media_addresses: bool = False
    limit_mm_per_prompt: str | Mapping[str, Any] | None = None
    media_io_kwargs: str | Mapping[str, Any] | None = None


class MediaPipeline:
    """Fetch and process the media of one prompt under the server's policy."""

    def __init__(self, processor: MultimodalProcessor, fetcher: MediaFetcher):
        self.processor = processor
        self.fetcher = fetcher

    @classmethod
    def build(cls, model_dir: str | Path, tokenizer: Any, args: MediaArgs = MediaArgs()) -> "MediaPipeline":
        local = Path(args.allowed_local_media_path).resolve() if args.allowed_local_media_path else None
        policy = FetchPolicy(
            allowed_domains=frozenset(args.allowed_media_domains),
            allow_private_addresses=args.allow_private_media_addresses,
            allowed_local_media_path=local,
        )
        options = MediaOptions(
            limit_per_prompt=parse_limit_mm_per_prompt(args.limit_mm_per_prompt),
            **parse_media_io_kwargs(args.media_io_kwargs),
        )
        return cls(MultimodalProcessor.from_model_dir(model_dir, tokenizer, options), MediaFetcher(policy))

    async def process(
        self, prompt: str, refs: Sequence[MediaRef], mm_processor_kwargs: Mapping[str, Any] | None = None
    ) -> ProcessedPrompt:
        """The expanded prompt ids and processed items. Counts are checked before anything is fetched; the
        decoding and resizing run in a worker thread."""
        self.processor.check_item_counts(
            sum(r.kind == "image" for r in refs), sum(r.kind == "video" for r in refs)
        )
        items = [await self.fetcher.fetch(r.url, r.kind, r.label) for r in refs]
        return await asyncio.to_thread(self.processor.process, prompt, items, mm_processor_kwargs)
