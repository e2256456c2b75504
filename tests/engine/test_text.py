"""Text through the real tokenizer: detokenized output, stop strings, streamed deltas, prompts and chat."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from engine_testing import make_llm

from s1serve import SamplingParams
from s1serve.engine.async_engine import AsyncEngine

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return make_llm(tiny_checkpoint, skip_tokenizer_init=False)


def known(llm, ids: list[int]) -> list[int]:
    return [i for i in ids if i < llm.tokenizer.vocab_size]  # the model's padded ids carry no text


@pytest.fixture(scope="module")
def reference(llm):
    prompt = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY, use_tqdm=False)[0]
    return prompt, out


def test_text_is_the_decoded_output(llm, reference):
    _, out = reference
    assert len(out.token_ids) == 40
    assert out.text == llm.tokenizer.decode(known(llm, out.token_ids)) and len(out.text) > 20


def test_a_stop_string_ends_the_text_before_it(llm, reference):
    prompt, full = reference
    stop = full.text[len(full.text) // 2 :][:3]
    assert len(stop) == 3
    first = full.text.index(stop)
    params = dataclasses.replace(GREEDY, stop=(stop, "\x00never"))
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0]
    assert out.text == full.text[:first]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.token_ids == full.token_ids[: len(out.token_ids)] and len(out.token_ids) < 40
    # The token that completed the stop string is the last one: one id fewer decodes to text without it.
    assert stop not in llm.tokenizer.decode(known(llm, out.token_ids[:-1]))


def test_streamed_deltas_add_up_and_never_show_a_stop_string(llm, reference):
    prompt, full = reference
    stop = full.text[len(full.text) // 2 :][:4]
    engine = AsyncEngine(llm.engine)
    try:

        async def main():
            plain = [d async for d in engine.generate(prompt, GREEDY, "plain")]
            stopped = [d async for d in engine.generate(prompt, dataclasses.replace(GREEDY, stop=(stop,)), "stopped")]
            return plain, stopped

        plain, stopped = asyncio.run(main())
    finally:
        engine.shutdown()
    assert "".join(d.text for d in plain) == full.text
    streamed = "".join(d.text for d in stopped)
    assert streamed == full.text[: full.text.index(stop)] and stop not in streamed
    assert stopped[-1].finish_reason == "stop" and stopped[-1].stop_reason == stop


def test_text_prompts_are_encoded_with_the_tokenizer(llm):
    out = llm.generate("Hello, world", SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert out.prompt_token_ids == llm.tokenizer.encode("Hello, world")


def test_chat_renders_the_template_with_its_kwargs(llm):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    params = SamplingParams(temperature=0, max_tokens=6)
    for thinking in (True, False):
        out = llm.chat(messages, params, chat_template_kwargs={"enable_thinking": thinking}, use_tqdm=False)[0]
        rendered = llm.tokenizer.apply_chat_template(messages, enable_thinking=thinking)
        assert out.prompt_token_ids == llm.tokenizer.encode(rendered)
        assert rendered.endswith("<think>" if thinking else "<think></think>\n\n")
    longer = messages + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "5?"}]
    both = llm.chat([messages, longer], params, use_tqdm=False)
    assert len(both) == 2 and len(both[1].prompt_token_ids) > len(both[0].prompt_token_ids)
