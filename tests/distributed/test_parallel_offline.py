"""TP, EP and TP+EP engines (this process is rank 0, the other ranks are real worker processes) give the greedy
ids and prompt logprobs of one process; shutting down leaves no worker behind; without the Ray backend nothing
imports Ray."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from parallel_testing import ENGINE_ARGS, GREEDY, alive, prompts, reference, reference_logits

from s1serve import LLM, SamplingParams


@pytest.mark.parametrize("shape", [dict(tp=2), dict(ep=2), dict(tp=2, ep=2)], ids=["tp2", "ep2", "tp2-ep2"])
def test_greedy_ids_equal_one_process(tiny_checkpoint, shape):
    want_ids, want_texts = reference(str(tiny_checkpoint))
    llm = LLM(str(tiny_checkpoint), dtype="float32", **shape, **ENGINE_ARGS)
    workers = llm.engine.runner.workers.processes
    try:
        outs = llm.generate(prompt_token_ids=prompts(), sampling_params=GREEDY, use_tqdm=False)
        logits = llm.prompt_logits(prompts()[3])
        scored = llm.generate(prompt_token_ids=[prompts()[3]], use_tqdm=False,
                              sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=3))[0].prompt_logprobs
    finally:
        llm.shutdown()
    assert [tuple(o.outputs[0].token_ids) for o in outs] == list(want_ids)
    assert [o.outputs[0].text for o in outs] == list(want_texts)
    assert torch.allclose(logits, reference_logits(str(tiny_checkpoint)), atol=1e-4, rtol=0)
    # Prompt logprobs come from the full-vocabulary logits (the lm_head's all-gather), as one process's do.
    want = torch.log_softmax(reference_logits(str(tiny_checkpoint)), -1)
    prompt = prompts()[3]
    assert scored[0] is None and [e.token_id for e in scored[1:]] == prompt[1:]
    got = torch.tensor([e.logprob for e in scored[1:]])
    assert torch.allclose(got, want[torch.arange(len(prompt) - 1), prompt[1:]], atol=1e-4, rtol=0)
    assert [[t for t, _ in e.top] for e in scored[1:]] == want[:-1].topk(3).indices.tolist()
    assert len(workers) == 1 and workers[0].exitcode == 0 and not alive(workers[0].pid)


def test_a_tp_engine_imports_no_ray(tiny_checkpoint):
    script = f"""
import json, sys
from s1serve.engine.config import EngineConfig
from s1serve.entrypoints.engine import build_engine
from s1serve.parallel.config import ParallelConfig
engine = build_engine({str(tiny_checkpoint)!r}, "float32", "cpu", EngineConfig(num_kv_blocks=8),
                     parallel=ParallelConfig(tp=2))
loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
engine.shutdown()
print(json.dumps(loaded))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_llm_refuses_data_parallelism_and_headless(tiny_checkpoint):
    with pytest.raises(ValueError, match="api_server MODEL --dp 2"):
        LLM(str(tiny_checkpoint), dp=2)
    with pytest.raises(ValueError, match="LLM hosts rank 0"):
        LLM(str(tiny_checkpoint), tp=2, nnodes=2, node_rank=1, headless=True, dist_init_addr="127.0.0.1:1")
