"""A long prompt arriving while other sequences decode: it is prefilled in small chunks (the scheduler's bounds
while decoding), the decodes get a token in every step meanwhile, and its output is the prompt's output alone."""

from __future__ import annotations

from pathlib import Path

from engine_testing import make_llm, random_prompts

from s1serve import SamplingParams

LONG, SHORT = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), SamplingParams(
    temperature=0, max_tokens=200, ignore_eos=True
)


def test_long_prompt_beside_decodes_keeps_them_going_and_matches_the_prompt_alone(tiny_checkpoint: Path):
    llm = make_llm(
        tiny_checkpoint, enable_prefix_caching=False, max_num_batched_tokens=512,
        max_prefill_tokens_while_decoding=64, max_prefill_pairs_while_decoding=1 << 14,
    )
    engine = llm.engine
    long_prompt = random_prompts(1, 1200, 1200, seed=3)[0]
    for i, prompt in enumerate(random_prompts(4, 10, 30, seed=4)):
        engine.add_request(f"short{i}", prompt, SHORT)
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                          for s in engine.scheduler.running):
        engine.step()  # until all four decode
    engine.add_request("long", long_prompt, LONG)

    chunks, long_ids = [], []
    while not long_ids:
        long_seq = next((s for s in engine.scheduler.running if s.request.request_id == "long"), None)
        before = long_seq.num_computed_tokens if long_seq else 0
        deltas = engine.step()
        long_seq = next(s for s in engine.scheduler.running if s.request.request_id == "long")
        chunks.append((before, long_seq.num_computed_tokens - before))
        tokens = {d.request_id: len(d.token_ids) for d in deltas}
        assert all(tokens.get(f"short{i}") == 1 for i in range(4)), tokens  # every decode advanced this step
        long_ids += [t for d in deltas if d.request_id == "long" for t in d.token_ids]
    assert all(0 < n <= 64 and n * (context + n) <= 1 << 14 for context, n in chunks)
    assert chunks[-1][1] < 20 and len(chunks) > 1200 // 64  # small chunks deep into the prompt
    while "long" in engine.requests:
        long_ids += [t for d in engine.step() if d.request_id == "long" for t in d.token_ids]
    for request_id in list(engine.requests):
        engine.abort(request_id)

    alone = llm.generate(prompt_token_ids=[long_prompt], sampling_params=LONG, use_tqdm=False)[0].token_ids
    assert long_ids == alone and len(alone) == 8
