"""Aborting requests anywhere in their life frees all their blocks; the others finish as asked."""

from __future__ import annotations

import random

from engine_testing import make_llm, random_prompts

from s1serve import SamplingParams


def test_200_requests_with_random_aborts_leak_no_blocks(tiny_checkpoint):
    engine = make_llm(tiny_checkpoint, num_kv_blocks=48, max_num_batched_tokens=96, max_num_seqs=12).engine
    total = engine.num_free_blocks
    rng = random.Random(5)
    pending = list(enumerate(random_prompts(200, 1, 150, seed=9)))
    max_tokens: dict[str, int] = {}
    samples: dict[str, int] = {}
    generated: dict[str, int] = {}
    aborted_waiting = aborted_running = 0
    finished = set()
    while pending or engine.has_unfinished_requests():
        for _ in range(rng.randint(0, 3)):
            if pending:
                i, prompt = pending.pop(0)
                params = SamplingParams(max_tokens=rng.randint(1, 24), n=rng.choice([1, 1, 2]), seed=i, ignore_eos=True)
                engine.add_request(str(i), prompt, params)
                max_tokens[str(i)] = params.max_tokens
                samples[str(i)] = params.n
        for request_id in list(engine.requests):
            if rng.random() < 0.04:
                sequences = engine.requests[request_id].sequences
                running = any(s.num_computed_tokens for s in sequences)
                aborted_waiting += not running
                aborted_running += running
                engine.abort(request_id)
                del max_tokens[request_id]
        for delta in engine.step():
            key = f"{delta.request_id}/{delta.index}"
            generated[key] = generated.get(key, 0) + len(delta.token_ids)
            if delta.finish_reason is not None:
                assert delta.finish_reason == "length"
                finished.add(key)
        stats = engine.stats()
        assert 0 <= stats.num_free_blocks <= total
    assert aborted_waiting > 0 and aborted_running > 20
    assert engine.num_preemptions > 0
    assert engine.num_free_blocks == total
    for request_id, count in max_tokens.items():
        keys = [k for k in finished if k.split("/")[0] == request_id]
        assert len(keys) == samples[request_id] and all(generated[k] == count for k in keys), request_id
