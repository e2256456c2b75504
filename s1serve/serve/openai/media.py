"""Images and video in a chat request: content parts -> placeholders, fetch + process, engine media inputs.

A MediaError (bad or refused item, a limit passed) becomes a 400 or 413 with its message, which names the item
and the limit; a server whose checkpoint has no vision tower answers a media part with 400 before fetching.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from s1serve.engine.media import MediaInput
from s1serve.multimodal.chat import MediaPipeline, MediaRef, extract_media
from s1serve.multimodal.errors import MediaError
from s1serve.serve.openai.errors import APIError

NO_VISION = ("this model takes text only: its checkpoint has no vision tower (no vision_config), so {label} "
             "cannot be used; send text content parts only")


def media_parts(messages: list[dict[str, Any]], pipeline: MediaPipeline | None) -> tuple[list[dict], list[MediaRef]]:
    """The messages as the chat template takes them and the media items to fetch, in prompt order."""
    try:
        messages, refs = extract_media(messages)
    except MediaError as exc:
        raise APIError(exc.status, exc.message, "messages") from None
    if refs and pipeline is None:
        raise APIError(400, NO_VISION.format(label=refs[0].label), "messages")
    return messages, refs


async def process_media(
    pipeline: MediaPipeline, prompt: str, refs: Sequence[MediaRef], mm_processor_kwargs: Mapping[str, Any] | None
) -> tuple[list[int], tuple[MediaInput, ...]]:
    """The expanded prompt ids and the engine's media inputs."""
    try:
        processed = await pipeline.process(prompt, refs, mm_processor_kwargs)
    except MediaError as exc:
        raise APIError(exc.status, exc.message, "messages") from None
    return processed.token_ids, tuple(MediaInput.of(item) for item in processed.items)
