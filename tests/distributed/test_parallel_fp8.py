"""One FP8 checkpoint (make-tiny `edge --fp8`: hidden 320, so partial 128-blocks) under tp=2, ep=2 and
dp=2 + ep=2, as real processes over gloo, gives the greedy ids of one process: TP shards each FP8 weight and its
scale blocks consistently, EP and DP+EP partition whole FP8 experts."""

from __future__ import annotations

from pathlib import Path

import pytest
from parallel_testing import ENGINE_ARGS, GREEDY, completions, launch, prompts, reference, stop, wait_healthy

from s1serve import LLM
from s1serve.checkpoint.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def edge_fp8(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("edge_fp8"), preset="edge", seed=5, fp8=True)


@pytest.mark.parametrize("shape", [dict(tp=2), dict(ep=2)], ids=["tp2", "ep2"])
def test_fp8_greedy_ids_equal_one_process(edge_fp8, shape):
    want_ids, _ = reference(str(edge_fp8))
    llm = LLM(str(edge_fp8), dtype="float32", **shape, **ENGINE_ARGS)
    try:
        model = llm.engine.runner.model
        assert model.layers[0].self_attn.q_proj.weight.dtype.itemsize == 1
        outs = llm.generate(prompt_token_ids=prompts(), sampling_params=GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()
    assert [tuple(o.outputs[0].token_ids) for o in outs] == list(want_ids)


def test_fp8_dp2_ep2_servers_equal_one_process(edge_fp8, tmp_path):
    want = list(reference(str(edge_fp8))[1])
    server = launch(edge_fp8, tmp_path / "dp.log", "--dp", "2", "--ep", "2", ports=2)
    try:
        wait_healthy(server)
        assert completions(server.urls, prompts()) == want
    finally:
        code = stop(server)
    assert code == 0, server.log()
