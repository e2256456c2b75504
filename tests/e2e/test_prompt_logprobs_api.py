"""vLLM's prompt_logprobs through the real `openai` SDK against a real server (float32): completions (per choice)
and chat (top level), streamed (first chunk) and not, and completions echo + logprobs. Values are checked against
a full forward of the same checkpoint in this process: log_softmax of the logits at position i - 1 scores
prompt token i."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from s1serve import LLM

MODEL = "intern-s1-pro"
TOL = 1e-4
GOLDEN = json.loads((Path(__file__).parents[1] / "fixtures/model/golden_tiny_seed0.json").read_text())
PROMPT = [9707, 11, 1246, 525, 498, 3351, 30, 358, 1079, 7199, 264, 6438, 911, 279, 9396, 13]


class Reference:
    """The checkpoint in this process, in the server's dtype."""

    def __init__(self, checkpoint: Path):
        self.llm = LLM(str(checkpoint), dtype="float32", block_size=16, num_kv_blocks=64)

    def __call__(self, prompt: list[int]) -> torch.Tensor:
        """log_softmax of one full forward at every position of `prompt`."""
        return torch.log_softmax(self.llm.prompt_logits(prompt), dim=-1)

    def token_text(self, token_id: int) -> str:
        tokenizer = self.llm.tokenizer
        return "" if token_id >= tokenizer.vocab_size else tokenizer.decode([token_id], skip_special_tokens=False)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint) -> Reference:
    return Reference(tiny_checkpoint)


def assert_prompt_logprobs(reference: Reference, prompt: list[int], got: list | None, k: int) -> None:
    """vLLM's shape: None, then per token {str(id): {logprob, rank, decoded_token}}: the prompt token and the top k."""
    assert got is not None and len(got) == len(prompt) and got[0] is None
    full = reference(prompt)
    for i in range(1, len(prompt)):
        row, position = full[i - 1], got[i]
        top = row.topk(k).indices.tolist()
        assert set(position) == {str(t) for t in [prompt[i], *top]}, i
        mine = position[str(prompt[i])]
        assert abs(mine["logprob"] - float(row[prompt[i]])) <= TOL, i
        assert mine["rank"] == int((row >= row[prompt[i]]).sum()), i
        for rank, t in enumerate(top, 1):
            entry = position[str(t)]
            assert abs(entry["logprob"] - float(row[t])) <= TOL and (t == prompt[i] or entry["rank"] == rank), i
        for t, entry in position.items():
            assert entry["decoded_token"] == reference.token_text(int(t))


@pytest.mark.parametrize("k", [0, 3])
def test_completions_prompt_logprobs_per_choice(client, reference, k):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, n=2, seed=1,
                                    extra_body={"prompt_logprobs": k})
    assert len(out.choices) == 2
    for choice in out.choices:
        assert_prompt_logprobs(reference, PROMPT, choice.prompt_logprobs, k)
        assert choice.logprobs is None


def test_completions_stream_carries_them_on_each_choices_first_chunk(client, reference):
    firsts: dict[int, object] = {}
    later = []
    for chunk in client.completions.create(model=MODEL, prompt=["Hello there", "The sky is"], max_tokens=3, stream=True,
                                           extra_body={"prompt_logprobs": 2, "return_token_ids": True}):
        for c in chunk.choices:
            if c.index in firsts:
                later.append(getattr(c, "prompt_logprobs", None))
            else:
                firsts[c.index] = c
    assert sorted(firsts) == [0, 1] and later and not any(later)
    for c in firsts.values():
        assert c.text == "" and c.logprobs is None
        assert_prompt_logprobs(reference, c.prompt_token_ids, c.prompt_logprobs, 2)
    assert firsts[0].prompt_token_ids != firsts[1].prompt_token_ids


def test_chat_prompt_logprobs_at_top_level(client, reference):
    messages = [{"role": "user", "content": "What is the boiling point of water?"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                         extra_body={"prompt_logprobs": 4, "return_token_ids": True})
    assert_prompt_logprobs(reference, out.prompt_token_ids, out.prompt_logprobs, 4)

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, stream=True,
                                                 extra_body={"prompt_logprobs": 4}))
    assert [getattr(c, "prompt_logprobs", None) is not None for c in chunks] == [True] + [False] * (len(chunks) - 1)
    assert_prompt_logprobs(reference, out.prompt_token_ids, chunks[0].prompt_logprobs, 4)


def test_completions_echo_with_logprobs_fills_the_prompts_logprobs(client, reference):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, echo=True, logprobs=2, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    logprobs, choice = out.choices[0].logprobs, out.choices[0]
    full = reference(PROMPT)
    assert len(logprobs.tokens) == len(PROMPT) + 3 == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for i in range(1, len(PROMPT)):
        assert logprobs.tokens[i] == reference.token_text(PROMPT[i])
        assert abs(logprobs.token_logprobs[i] - float(full[i - 1, PROMPT[i]])) <= TOL, i
        want = {reference.token_text(t): float(v) for v, t in zip(*full[i - 1].topk(2))}
        assert logprobs.top_logprobs[i].keys() == want.keys(), i
    generated = reference(PROMPT + choice.token_ids[:-1])[len(PROMPT) - 1:]
    for j, t in enumerate(choice.token_ids):
        assert abs(logprobs.token_logprobs[len(PROMPT) + j] - float(generated[j, t])) <= TOL
    assert getattr(choice, "prompt_logprobs", None) is None  # not asked for: echo shows them in logprobs only

    chunks = [c for c in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, echo=True, logprobs=2,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True})
              if c.choices]
    echoed = chunks[0].choices[0]
    assert echoed.logprobs.token_logprobs[0] is None and len(echoed.logprobs.tokens) == len(PROMPT)
    assert echoed.logprobs.token_logprobs[1:] == pytest.approx(logprobs.token_logprobs[1:len(PROMPT)], abs=TOL)


def test_padding_ids_are_candidates_with_empty_text(client, reference):
    """The golden `text_short` greedy ids hold 154929, a padding row of the lm_head (past the tokenizer's 154766
    entries) and that step's argmax: as a prompt token it comes back ranked first with decoded_token ''."""
    p = next(p for p in GOLDEN["prompts"] if p["name"] == "text_short")
    step = next(i for i, t in enumerate(p["greedy_ids"]) if t >= 154766)
    prompt = p["prompt_ids"] + p["greedy_ids"][: step + 1]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={"prompt_logprobs": 5})
    padding = out.choices[0].prompt_logprobs[-1][str(prompt[-1])]
    assert padding["rank"] == 1 and padding["decoded_token"] == ""
    assert_prompt_logprobs(reference, prompt, out.choices[0].prompt_logprobs, 5)
