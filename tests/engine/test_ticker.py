"""EngineTicker hands freed host memory back to the OS once, as the last request ends, and not while work goes on."""

from __future__ import annotations

from engine_testing import make_llm, random_prompts

from s1serve import SamplingParams
from s1serve.engine import ticker as ticker_module
from s1serve.engine.step_clock import StepClock
from s1serve.engine.ticker import EngineTicker


def test_free_memory_is_released_once_when_the_last_request_ends(tiny_checkpoint, monkeypatch):
    engine = make_llm(tiny_checkpoint, num_kv_blocks=64).engine
    open_at_release: list[int] = []
    monkeypatch.setattr(ticker_module, "release_free_memory", lambda: open_at_release.append(len(engine.requests)))
    ticker = EngineTicker(engine, StepClock())
    short, long = random_prompts(2, 5, 20, seed=3)
    engine.add_request("short", short, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    engine.add_request("long", long, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    steps = 0
    while engine.has_unfinished_requests():
        ticker.tick()
        steps += 1
        if engine.has_unfinished_requests():
            assert open_at_release == [], f"released while requests ran (step {steps})"
    assert steps >= 6 and open_at_release == [0]
    ticker.tick()  # nothing to do: no step, nothing released again
    assert open_at_release == [0]
