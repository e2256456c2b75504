"""s1serve and the naive reference against golden outputs of the model authors' reference code.

The goldens (tests/fixtures/model/, made by make_golden.py there; see its README) hold, for a few prompts on
the make-tiny checkpoint (preset tiny, seed 0), the authors' greedy ids and last-position float32 logits.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reference_model import naive_logits

TOL = 1e-4
GOLDEN_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "model"
GOLDEN = json.loads((GOLDEN_DIR / "golden_tiny_seed0.json").read_text())
GOLDEN_LOGITS = load_file(str(GOLDEN_DIR / GOLDEN["logits_file"]))
PROMPTS = {p["name"]: p for p in GOLDEN["prompts"]}
STOP_IDS = (151645, 151643)
REGENERATE = "regenerate the goldens as tests/fixtures/model/README.md says"


def _tensor_digests(path: Path, prefixes: tuple[str, ...]) -> dict[str, str]:
    """sha256 over (name, dtype, shape, raw bytes) of each tensor of a safetensors file with one of prefixes."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        out = {}
        for name, info in header.items():
            if name == "__metadata__" or not name.startswith(prefixes):
                continue
            start, end = info["data_offsets"]
            f.seek(8 + header_len + start)
            h = hashlib.sha256(f"{name}|{info['dtype']}|{info['shape']}|".encode())
            h.update(f.read(end - start))
            out[name] = h.hexdigest()
    return out


@pytest.fixture(scope="module")
def golden_checkpoint(tiny_checkpoint: Path, tiny_checkpoint_spec: dict) -> Path:
    """The session's tiny checkpoint, after checking it is the very checkpoint the goldens were made on."""
    made_on = {k: GOLDEN[k] for k in ("preset", "seed", "arch")}
    if made_on != tiny_checkpoint_spec:
        pytest.fail(f"goldens were made on {made_on}, the tiny_checkpoint fixture is {tiny_checkpoint_spec}")
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    expected = GOLDEN["checkpoint"]
    if config["text_config"] != expected["text_config"]:
        changed = sorted(k for k in set(config["text_config"]) | set(expected["text_config"])
                         if config["text_config"].get(k) != expected["text_config"].get(k))
        pytest.fail(f"make-tiny's text config changed ({', '.join(changed)}) since the goldens were made; {REGENERATE}")
    weight_map = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    digests: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        digests.update(_tensor_digests(tiny_checkpoint / shard, ("model.language_model.", "lm_head.")))
    want = expected["tensor_sha256"]
    differing = sorted(n for n in set(digests) | set(want) if digests.get(n) != want.get(n))
    if differing:
        pytest.fail(f"make-tiny's weights changed since the goldens were made ({len(differing)} tensors differ, "
                    f"e.g. {differing[:3]}); {REGENERATE}")
    return tiny_checkpoint


def test_golden_fixture_is_well_formed():
    assert len(PROMPTS) >= 6 and any(len(p["prompt_ids"]) > 300 for p in PROMPTS.values())
    for name, p in PROMPTS.items():
        assert len(p["greedy_ids"]) == GOLDEN["new_tokens"], name
        assert not set(p["greedy_ids"]) & set(STOP_IDS), f"{name}: a stop id in the golden greedy ids"
        assert GOLDEN_LOGITS[name].dtype == torch.float32 and GOLDEN_LOGITS[name].shape == (155008,)
        assert int(GOLDEN_LOGITS[name].argmax()) == p["greedy_ids"][0], name


def test_checkpoint_is_the_one_the_goldens_were_made_on(golden_checkpoint):
    assert golden_checkpoint.is_dir()


@pytest.mark.parametrize("name", list(PROMPTS))
def test_naive_reference_reproduces_golden(name, golden_checkpoint):
    """Cross-checks the naive reference against the authors' code: last logits and greedy ids (teacher forced)."""
    p = PROMPTS[name]
    prompt, greedy = p["prompt_ids"], p["greedy_ids"]
    steps = list(range(len(prompt) - 1, len(prompt) + len(greedy) - 1))
    logits = naive_logits(golden_checkpoint, prompt + greedy[:-1], positions=steps)
    diff = float((logits[0] - GOLDEN_LOGITS[name]).abs().max())
    print(f"{name}: max|naive - golden| last-position logits = {diff:.3e}")
    assert diff <= TOL, f"{name}: naive reference vs authors' code: max |logit diff| {diff:.3e} > {TOL}"
    assert logits.argmax(-1).tolist() == greedy, f"{name}: naive greedy ids differ from the authors'"


def test_s1serve_greedy_ids_equal_golden(golden_checkpoint, tiny_llm):
    from s1serve import SamplingParams

    names = list(PROMPTS)
    outs = tiny_llm.generate(
        prompt_token_ids=[PROMPTS[n]["prompt_ids"] for n in names],
        sampling_params=SamplingParams(temperature=0, max_tokens=GOLDEN["new_tokens"]),
    )
    assert len(outs) == len(names)
    for name, out in zip(names, outs):
        assert list(out.token_ids) == PROMPTS[name]["greedy_ids"], f"{name}: greedy ids differ from the authors'"


@pytest.mark.parametrize("name", list(PROMPTS))
def test_s1serve_last_logits_match_golden(name, golden_checkpoint, tiny_llm):
    got = tiny_llm.prompt_logits(PROMPTS[name]["prompt_ids"])[-1]
    diff = float((got.float() - GOLDEN_LOGITS[name]).abs().max())
    print(f"{name}: max|s1serve - golden| last-position logits = {diff:.3e}")
    assert diff <= TOL, f"{name}: max |logit diff| {diff:.3e} > {TOL}"


@pytest.mark.parametrize("name", list(PROMPTS))
def test_s1serve_prompt_logprobs_match_golden(name, golden_checkpoint, tiny_llm):
    """Prompt + the authors' greedy ids as one prompt: the position before the first greedy id is scored by the
    golden logits (value and top 5), and each greedy id, the argmax of the authors' full forward, ranks first."""
    from s1serve import SamplingParams

    p = PROMPTS[name]
    prompt, greedy = p["prompt_ids"], p["greedy_ids"]
    params = SamplingParams(max_tokens=1, prompt_logprobs=5)
    out = tiny_llm.generate(prompt_token_ids=[prompt + greedy], sampling_params=params, use_tqdm=False)[0]
    entries = out.prompt_logprobs[len(prompt):]
    golden = torch.log_softmax(GOLDEN_LOGITS[name], -1)
    first = entries[0]
    assert first.token_id == greedy[0] and abs(first.logprob - float(golden[greedy[0]])) <= 2 * TOL
    assert torch.allclose(torch.tensor([v for _, v in first.top]), golden.topk(5).values, atol=2 * TOL, rtol=0)
    assert all(abs(v - float(golden[t])) <= 2 * TOL for t, v in first.top)
    assert [e.rank for e in entries] == [1] * len(greedy), f"{name}: a greedy id is not the most likely"
