"""An exception while handling one request (its sampler row, grammar, detokenizer, stop strings) fails that request
only, with finish_reason "error" and a message naming the stage; the other requests of the same steps give the ids
they give alone, and every KV block is free afterwards. Faults come from the test-only S1SERVE_TEST_FAULT hook."""

from __future__ import annotations

from dataclasses import replace

import pytest
from engine_testing import GREEDY, make_llm, random_prompts

from s1serve.serve.openai.grammars import json_constraint

MARKERS = {"sampler": 1001, "grammar": 1002, "detokenizer": 1003, "stop": 1004}


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("S1SERVE_TEST_FAULT", ",".join(f"{stage}:{marker}" for stage, marker in MARKERS.items()))
        return make_llm(tiny_checkpoint, skip_tokenizer_init=False)


def test_each_failing_stage_fails_its_request_only(llm) -> None:
    others = [p for p in random_prompts(8, 5, 60, seed=3) if not set(p) & set(MARKERS.values())]
    alone = [llm.generate(prompt_token_ids=[p], sampling_params=GREEDY, use_tqdm=False)[0].token_ids for p in others]
    constrained = replace(GREEDY, constraint=json_constraint(None, starts_in_reasoning=False))
    faulty = {stage: ([5000, marker, 6000], replace(GREEDY, n=2, temperature=1.0, seed=0, stop=["zz"])) for stage, marker in MARKERS.items()}
    faulty["grammar"] = (faulty["grammar"][0], replace(constrained, n=2, temperature=1.0, seed=0))
    prompts = [ids for ids, _ in faulty.values()] + others
    params = [p for _, p in faulty.values()] + [GREEDY] * len(others)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    for (stage, _), out in zip(faulty.items(), outs):
        assert [o.finish_reason for o in out.outputs] == ["error", "error"], stage
        assert out.outputs[0].error.startswith(f"internal error in {stage} for this request: InjectedFault: "), out.outputs[0].error
    assert [out.token_ids for out in outs[len(faulty):]] == alone
    assert [out.finish_reason for out in outs[len(faulty):]] == ["length"] * len(others)
    assert llm.engine.num_free_blocks == llm.engine.blocks.num_blocks and not llm.engine.requests
    # The engine goes on: a request after the failures gives the same ids as before them.
    assert llm.generate(prompt_token_ids=[others[0]], sampling_params=GREEDY, use_tqdm=False)[0].token_ids == alone[0]
