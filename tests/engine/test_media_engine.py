"""Images and video through the engine (LLM.chat: content parts -> fetch -> processor -> engine -> vision tower).

Against the goldens of tests/fixtures/multimodal/ (the model authors' processor + model, on the make-tiny
checkpoint): one picture, two pictures in one message, a short video, each with the reference's prompt ids and
24 greedy ids. Then what the engine adds: prefill chunks that cut through a picture, a batch of all of them, the
prefix cache keyed on the picture's content, the vision-feature cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from s1serve import LLM, SamplingParams
from s1serve.engine.media import MediaInput
from s1serve.sampling_params import InvalidParameterError

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "multimodal"
GOLDEN = json.loads((GOLDEN_DIR / "golden_mm_tiny_seed0.json").read_text())
PROMPTS = {p["name"]: p for p in GOLDEN["prompts"]}
GREEDY24 = SamplingParams(temperature=0, max_tokens=GOLDEN["new_tokens"], ignore_eos=True)


def file_url(name: str) -> str:
    return (GOLDEN_DIR / name).as_uri()


def chat_messages(name: str, images: list[str] | None = None) -> list[dict]:
    """The golden prompt's messages with its media as OpenAI content parts (file:// URLs of the fixtures)."""
    p = PROMPTS[name]
    files = iter(images or p["images"] + p["videos"])
    content = []
    for part in p["messages"][0]["content"]:
        if part["type"] == "image":
            content.append({"type": "image_url", "image_url": {"url": file_url(next(files))}})
        elif part["type"] == "video":
            content.append({"type": "video_url", "video_url": {"url": file_url(next(files))}})
        else:
            content.append(part)
    return [{"role": "user", "content": content}]


def make_mm_llm(checkpoint: Path, **engine_args) -> LLM:
    engine_args.setdefault("block_size", 16)
    engine_args.setdefault("num_kv_blocks", 256)
    return LLM(str(checkpoint), dtype="float32", allowed_local_media_path=str(GOLDEN_DIR), **engine_args)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path) -> LLM:
    return make_mm_llm(tiny_checkpoint, enable_prefix_caching=False)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_golden_prompt_ids_and_greedy_ids_through_the_engine(name, llm):
    p = PROMPTS[name]
    out = llm.chat(chat_messages(name), GREEDY24, use_tqdm=False)[0]
    assert len(out.prompt_token_ids) == p["prompt_len"] and out.prompt_token_ids == p["prompt_ids"], name
    assert out.token_ids == p["greedy_ids"], f"{name}: greedy ids through the engine differ from the reference's"


def test_batch_with_prefill_chunks_cutting_through_media_equals_goldens(tiny_checkpoint):
    """All three prompts at once, 40 tokens a step: chunks end inside pictures and inside the video."""
    llm = make_mm_llm(tiny_checkpoint, enable_prefix_caching=False, max_num_batched_tokens=40)
    names = list(PROMPTS)
    outs = llm.chat([chat_messages(n) for n in names], GREEDY24, use_tqdm=False)
    for name, out in zip(names, outs):
        assert out.token_ids == PROMPTS[name]["greedy_ids"], name
    assert not llm.engine.requests and llm.engine.feature_cache.queries == 4  # one look-up per item: 3 pictures, 1 video


def test_prefix_cache_keys_on_the_picture_and_feature_cache_skips_the_encoder(tiny_checkpoint):
    """Same pad ids, other picture: no KV block of the picture is reused. Same picture again: the blocks before
    the last (partial) block come from the prefix cache; that block still holds pads, whose features come from
    the feature cache instead of the encoder."""
    llm = make_mm_llm(tiny_checkpoint, block_size=32)
    blocks, cache = llm.engine.blocks, llm.engine.feature_cache
    panda = llm.chat(chat_messages("one_image"), GREEDY24, use_tqdm=False)[0]
    assert panda.token_ids == PROMPTS["one_image"]["greedy_ids"]
    first_pad = panda.prompt_token_ids.index(PROMPTS["one_image"]["pad_token_id"])
    assert (cache.queries, cache.hits, blocks.prefix_hits) == (1, 0, 0)

    crop = llm.chat(chat_messages("one_image", ["crop_288x256.png"]), GREEDY24, use_tqdm=False)[0]
    assert crop.prompt_token_ids == panda.prompt_token_ids  # equal ids: only the content hash tells them apart
    assert blocks.prefix_hits == first_pad // 32 * 32 == 0, "blocks holding the panda's pads were reused"
    assert (cache.queries, cache.hits) == (2, 0)
    alone = make_mm_llm(tiny_checkpoint, enable_prefix_caching=False)
    assert crop.token_ids == alone.chat(chat_messages("one_image", ["crop_288x256.png"]), GREEDY24,
                                        use_tqdm=False)[0].token_ids
    assert crop.token_ids != panda.token_ids

    again = llm.chat(chat_messages("one_image"), GREEDY24, use_tqdm=False)[0]
    hit = (len(panda.prompt_token_ids) - 1) // 32 * 32
    last_pad = len(panda.prompt_token_ids) - 1 - panda.prompt_token_ids[::-1].index(PROMPTS["one_image"]["pad_token_id"])
    assert last_pad >= hit, "the test needs pads in the recomputed block"
    assert blocks.prefix_hits == hit and (cache.queries, cache.hits) == (3, 1)
    assert again.token_ids == panda.token_ids
    stats = llm.engine.stats()
    assert (stats.mm_cache_queries, stats.mm_cache_hits) == (3, 1)


def test_feature_cache_is_bounded_and_off_at_zero(tiny_checkpoint):
    llm = make_mm_llm(tiny_checkpoint, enable_prefix_caching=False, mm_processor_cache_gb=0)
    for _ in range(2):
        out = llm.chat(chat_messages("one_image"), GREEDY24, use_tqdm=False)[0]
        assert out.token_ids == PROMPTS["one_image"]["greedy_ids"]
    cache = llm.engine.feature_cache
    assert (cache.queries, cache.hits, len(cache), cache.size_bytes) == (2, 0, 0, 0)


def test_engine_refuses_media_that_do_not_match_the_prompt(llm):
    p = PROMPTS["one_image"]
    ids = p["prompt_ids"]
    start = ids.index(p["pad_token_id"])
    item = MediaInput("k", torch.zeros(288, 1536), (1, 18, 16), ((start, 72),))
    llm.engine.check_request(ids, GREEDY24, [item])  # well-formed
    with pytest.raises(InvalidParameterError, match="prompt holds 72 image/video pad tokens, its media items 0"):
        llm.engine.check_media(ids, [])
    with pytest.raises(InvalidParameterError, match="holds tokens other than the image/video pad ids"):
        llm.engine.check_request(ids, GREEDY24, [MediaInput("k", item.pixel_values, (1, 18, 16), ((start - 1, 72),))])
    with pytest.raises(InvalidParameterError, match="it needs t\\*h\\*w/4"):
        llm.engine.check_request(ids, GREEDY24, [MediaInput("k", item.pixel_values, (1, 18, 16), ((start, 71),))])


def test_text_only_checkpoint_refuses_media(tmp_path):
    from s1serve.checkpoint.tiny import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "text_only", preset="tiny", seed=0, arch="qwen3_moe")
    llm = LLM(str(checkpoint), dtype="float32", block_size=16, num_kv_blocks=64, allowed_local_media_path=str(GOLDEN_DIR))
    with pytest.raises(InvalidParameterError, match="no vision tower"):
        llm.chat(chat_messages("one_image"), GREEDY24, use_tqdm=False)
