"""Engine-level sampling and stopping: seeds, n > 1 sharing the prompt's blocks, checkpoint defaults, logprobs,
stop tokens, eos, max_tokens and max_model_len."""

from __future__ import annotations

import dataclasses

import torch
from engine_testing import make_llm, random_prompts

from s1serve import SamplingParams
from s1serve.engine.config import EngineConfig
from s1serve.engine.engine import Engine
from s1serve.engine.model_runner import ModelRunner, kv_blocks_for


def test_a_seed_gives_the_same_tokens_alone_or_in_a_batch_of_16(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint, max_num_batched_tokens=128)
    prompts = random_prompts(16, 1, 200, seed=11)
    seeded = SamplingParams(seed=1234, max_tokens=20, ignore_eos=True, top_k=0)
    others = [
        SamplingParams(
            max_tokens=5 + i,
            seed=None if i % 2 else i,
            temperature=[0, 0.7, 1.3][i % 3],
            top_k=[0, 20][i % 2],
            repetition_penalty=1.2 if i % 4 == 1 else None,
            ignore_eos=True,
        )
        for i in range(15)
    ]
    alone = llm.generate(prompt_token_ids=[prompts[7]], sampling_params=seeded, use_tqdm=False)[0].token_ids
    batch = llm.generate(prompt_token_ids=prompts, sampling_params=others[:7] + [seeded] + others[7:], use_tqdm=False)
    assert batch[7].token_ids == alone
    other_seed = dataclasses.replace(seeded, seed=4321)
    assert llm.generate(prompt_token_ids=[prompts[7]], sampling_params=other_seed, use_tqdm=False)[0].token_ids != alone


def test_n_samples_are_distinct_and_share_the_prompt_blocks(tiny_checkpoint):
    engine = make_llm(tiny_checkpoint, num_kv_blocks=64).engine
    prompt = random_prompts(1, 100, 100, seed=12)[0]  # 6 full blocks of 16 and 4 tokens
    engine.add_request("r", prompt, SamplingParams(n=4, seed=3, max_tokens=16, ignore_eos=True))
    outputs: dict[int, list[int]] = {}
    shared_seen = False
    while engine.has_unfinished_requests():
        for delta in engine.step():
            outputs.setdefault(delta.index, []).extend(delta.token_ids)
        request = engine.requests.get("r")
        if request and len(request.sequences) == 4 and not shared_seen:
            tables = [s.block_table for s in request.sequences]
            assert all(t[:6] == tables[0][:6] for t in tables)
            assert len({b for t in tables for b in t[6:]}) == sum(len(t) - 6 for t in tables)  # own tails
            shared_seen = True
            assert engine.num_free_blocks == 64 - 6 - sum(len(t) - 6 for t in tables)
    assert shared_seen and sorted(outputs) == [0, 1, 2, 3]
    assert all(len(ids) == 16 for ids in outputs.values())
    assert len({tuple(ids) for ids in outputs.values()}) == 4
    assert engine.num_free_blocks == 64


def test_requests_that_set_nothing_get_the_checkpoint_defaults(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint)
    d = llm.engine.defaults
    assert (d.temperature, d.top_p, d.top_k) == (0.8, 0.95, 50)
    prompt = random_prompts(1, 30, 30, seed=13)
    implicit = SamplingParams(seed=5, max_tokens=12)
    explicit = SamplingParams(seed=5, max_tokens=12, temperature=0.8, top_p=0.95, top_k=50, min_p=0.0)
    outs = [llm.generate(prompt_token_ids=prompt, sampling_params=p, use_tqdm=False)[0] for p in (implicit, explicit)]
    assert outs[0].token_ids == outs[1].token_ids
    llm.engine.add_request("x", prompt[0], SamplingParams())
    filled = llm.engine.requests["x"].params
    assert (filled.temperature, filled.top_p, filled.top_k, filled.repetition_penalty) == (0.8, 0.95, 50, 1.0)


def test_logprobs_are_those_of_a_full_forward(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint)
    prompt = random_prompts(1, 40, 40, seed=14)[0]
    params = SamplingParams(seed=1, max_tokens=8, logprobs=2, ignore_eos=True)
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0]
    full = torch.log_softmax(llm.prompt_logits(prompt + out.token_ids[:-1]), -1)[len(prompt) - 1 :]
    assert len(out.outputs[0].logprobs) == 8
    for i, lp in enumerate(out.outputs[0].logprobs):
        assert lp.token_id == out.token_ids[i]
        assert abs(lp.logprob - float(full[i, lp.token_id])) < 1e-4
        assert [t for t, _ in lp.top] == full[i].topk(2).indices.tolist()


def test_stop_token_ids_end_with_stop_and_max_tokens_with_length(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint)
    prompt = random_prompts(1, 20, 20, seed=15)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    ids = llm.generate(prompt_token_ids=prompt, sampling_params=greedy, use_tqdm=False)[0].token_ids
    target = ids[4]
    first = ids.index(target)
    with_stop = dataclasses.replace(greedy, stop_token_ids=(target,))
    stopped = llm.generate(prompt_token_ids=prompt, sampling_params=with_stop, use_tqdm=False)[0]
    assert stopped.token_ids == ids[: first + 1]
    assert stopped.finish_reason == "stop" and stopped.outputs[0].stop_reason == target
    assert llm.generate(prompt_token_ids=prompt, sampling_params=greedy, use_tqdm=False)[0].finish_reason == "length"


def test_eos_ids_come_from_the_checkpoint_and_ignore_eos_skips_them(tiny_checkpoint):
    base = make_llm(tiny_checkpoint)
    assert base.engine.eos_ids == frozenset(base.engine.defaults.eos_token_ids) == {151645, 151643}
    prompt = random_prompts(1, 20, 20, seed=16)[0]
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    ids = base.generate(prompt_token_ids=[prompt], sampling_params=greedy, use_tqdm=False)[0].token_ids
    defaults = dataclasses.replace(base.engine.defaults, eos_token_ids=(ids[3],))
    config = EngineConfig(block_size=16, num_kv_blocks=32)
    model = base.engine.runner.model
    engine = Engine(ModelRunner(model, kv_blocks_for(model, config), config.block_size), config, defaults)
    engine.add_request("eos", prompt, dataclasses.replace(greedy, ignore_eos=False))
    engine.add_request("ignored", prompt, greedy)
    got: dict[str, list] = {"eos": [], "ignored": []}
    reasons = {}
    while engine.has_unfinished_requests():
        for d in engine.step():
            got[d.request_id] += d.token_ids
            reasons[d.request_id] = (d.finish_reason, d.stop_reason)
    assert got["eos"] == ids[: ids.index(ids[3]) + 1] and reasons["eos"] == ("stop", None)
    assert got["ignored"] == ids and reasons["ignored"] == ("length", None)


def test_max_model_len_caps_prompt_plus_output(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint, max_model_len=40)
    prompt = random_prompts(1, 35, 35, seed=17)
    for max_tokens in (100, None):
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        out = llm.generate(prompt_token_ids=prompt, sampling_params=params, use_tqdm=False)[0]
        assert len(out.token_ids) == 5 and out.finish_reason == "length"
