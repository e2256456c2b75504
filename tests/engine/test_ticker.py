"""EngineTicker hands freed host memory back to the OS once the engine has stayed without requests for
RELEASE_AFTER_IDLE_S: not while work goes on, not as a burst drains (the next one would fault the heap in again),
and once only; the loop is told how long it may block so that the release comes on time."""

from __future__ import annotations

import time

from engine_testing import make_llm, random_prompts

from s1serve import SamplingParams
from s1serve.engine import ticker as ticker_module
from s1serve.engine.step_clock import StepClock
from s1serve.engine.ticker import EngineTicker

DELAY_S = 0.3


def run_to_end(engine, ticker: EngineTicker, released: list[int], prompts: list[list[int]]) -> None:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{time.monotonic()}-{i}", prompt,
                           SamplingParams(temperature=0, max_tokens=2 + 4 * i, ignore_eos=True))
    while engine.has_unfinished_requests():
        assert ticker.wait_s() == 0  # work to do: the loop must not block
        ticker.tick()
        assert released == [] or not engine.has_unfinished_requests(), "released while requests ran"


def test_free_memory_is_released_once_after_the_engine_stays_idle(tiny_checkpoint, monkeypatch):
    engine = make_llm(tiny_checkpoint, num_kv_blocks=64).engine
    released: list[int] = []
    monkeypatch.setattr(ticker_module, "release_free_memory", lambda: released.append(len(engine.requests)))
    monkeypatch.setattr(ticker_module, "RELEASE_AFTER_IDLE_S", DELAY_S)
    ticker = EngineTicker(engine, StepClock())
    assert ticker.wait_s() is None  # idle from the start, nothing to release: block without limit
    prompts = random_prompts(2, 5, 20, seed=3)

    run_to_end(engine, ticker, released, prompts)
    ticker.tick()
    assert released == [] and 0 < ticker.wait_s() <= DELAY_S  # drained: the release waits

    run_to_end(engine, ticker, released, prompts)  # a new burst within the delay: nothing was released
    assert released == []
    wait = ticker.wait_s()
    assert 0 < wait <= DELAY_S
    time.sleep(wait)
    ticker.tick()
    assert released == [0] and ticker.wait_s() is None
    time.sleep(DELAY_S)
    ticker.tick()  # idle again: nothing more to release
    assert released == [0]
