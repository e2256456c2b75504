"""Bad input is a ValueError naming the field, raised before the engine takes the request; others go on."""

from __future__ import annotations

import pytest
from engine_testing import make_llm

from s1serve import SamplingParams
from s1serve.sampling_params import InvalidParameterError


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("max_tokens", dict(max_tokens=0)),
        ("max_tokens", dict(max_tokens=-3)),
        ("top_p", dict(top_p=0.0)),
        ("top_p", dict(top_p=1.5)),
        ("temperature", dict(temperature=-0.1)),
        ("temperature", dict(temperature=float("nan"))),
        ("n", dict(n=0)),
        ("n", dict(n=2, temperature=0)),
        ("top_k", dict(top_k=-2)),
        ("min_p", dict(min_p=1.5)),
        ("repetition_penalty", dict(repetition_penalty=0)),
        ("presence_penalty", dict(presence_penalty=3)),
        ("frequency_penalty", dict(frequency_penalty=-2.5)),
        ("logprobs", dict(logprobs=-1)),
        ("prompt_logprobs", dict(prompt_logprobs=21)),
        ("prompt_logprobs", dict(prompt_logprobs=-1)),
        ("stop", dict(stop=[""])),
        ("stop_token_ids", dict(stop_token_ids=[-1])),
        ("seed", dict(seed="7")),
    ],
)
def test_bad_sampling_params_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, InvalidParameterError) and info.value.param == field


def test_bad_prompts_are_rejected_and_the_engine_keeps_serving(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint, max_model_len=128, num_kv_blocks=64)
    engine = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request("ok", [1000, 2000, 3000], greedy)
    ids = [t for d in engine.step() for t in d.token_ids]
    for prompt, needle in [([], "prompt is empty"), ([5] * 128, "max_model_len is 128"), ([10**9], "vocabulary")]:
        with pytest.raises(ValueError, match=needle) as info:
            engine.add_request("bad", prompt, greedy)
        assert info.value.param == "prompt"
    with pytest.raises(ValueError, match="stop"):
        engine.add_request("bad", [1000], SamplingParams(stop=["x"]))  # no tokenizer: no stop strings
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok", [1000], greedy)
    assert list(engine.requests) == ["ok"]
    while engine.has_unfinished_requests():
        ids += [t for d in engine.step() for t in d.token_ids]
    alone = llm.generate(prompt_token_ids=[[1000, 2000, 3000]], sampling_params=greedy, use_tqdm=False)[0]
    assert ids == alone.token_ids and len(ids) == 6
    with pytest.raises(ValueError, match="max_model_len is 128"):
        llm.generate(prompt_token_ids=[[1000], [7] * 200], sampling_params=greedy, use_tqdm=False)
    assert not engine.has_unfinished_requests()  # nothing of a rejected batch was queued
    assert engine.num_free_blocks == 64


def test_engine_flags_parse_into_the_config():
    import argparse

    from s1serve.engine.config import EngineConfig, add_engine_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int)  # a command's own sampling seed
    add_engine_args(parser, exclude=("seed",))
    args = parser.parse_args(
        "--block-size 32 --num-kv-blocks 100 --cache-max-entry-count 0.5 --max-num-batched-tokens 512 "
        "--max-num-seqs 8 --max-model-len 1024 --no-enable-prefix-caching --seed 7".split()
    )
    config = EngineConfig.from_namespace(args, exclude=("seed",))
    assert config == EngineConfig(
        block_size=32, num_kv_blocks=100, cache_max_entry_count=0.5, max_num_batched_tokens=512,
        max_num_seqs=8, max_model_len=1024, enable_prefix_caching=False,
    )
    with pytest.raises(ValueError, match="--max-num-seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="--cache-max-entry-count"):
        EngineConfig(cache_max_entry_count=1.5)
